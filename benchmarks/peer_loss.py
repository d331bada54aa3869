"""How long the rest of a `slkd train` run takes to stop when one of its processes is lost.

    python benchmarks/peer_loss.py [--peer-timeout 4] [--repeat 2] [--no-save]

Two ranks started as srun starts them (``megatron_slkd.testing.lose_a_process``) train a
small student on a Markov corpus with its RS cache; after step 7 one process is lost:
rank 1 killed (SIGKILL) or stopped (SIGSTOP: a hung process or machine), a data-loader
worker of rank 0 killed or stopped, or megatron-core's checkpoint writer process of rank 0
killed (the out-of-memory killer's usual victims). One JSON line per loss: seconds until every
other rank had written its ``slkd`` line, and had exited (``null``: still running after
90 s), their exit statuses, and whether each wrote exactly one such line and no traceback.
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from _common import record  # noqa: E402
from helpers import write_markov_corpus  # noqa: E402

from megatron_slkd.testing import LOST, lose_a_process  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer-timeout", type=float, default=4.0,
                    help="--parallel-peer-timeout of the run (seconds)")  # fmt: skip
    ap.add_argument("--loader-timeout", type=float, default=3.0,
                    help="--data-loader-timeout of the run (seconds)")  # fmt: skip
    ap.add_argument("--repeat", type=int, default=2, help="runs per kind of loss")
    ap.add_argument("--no-save", action="store_true", help="print, do not append to results/")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prefix, cache = write_markov_corpus(root / "markov")
        for lost in LOST:
            for i in range(a.repeat):
                run = root / f"{lost.replace(' ', '-')}-{i}"
                args = [
                    "train", "--data-path", prefix, "--kd-caches", f"{prefix}={cache}",
                    "--data-split", "90,10,0", "--model-num-layers", "2",
                    "--model-hidden-size", "64", "--model-ffn-hidden-size", "128",
                    "--model-seq-length", "64", "--train-steps", "40",
                    "--train-micro-batch-size", "2", "--train-global-batch-size", "8",
                    "--checkpoint-interval", "5", "--eval-interval", "0", "--eval-batches", "1",
                    "--checkpoint-dir", run, "--data-num-workers", "1",
                    "--parallel-peer-timeout", a.peer_timeout,
                    "--data-loader-timeout", a.loader_timeout,
                ]  # fmt: skip
                r = lose_a_process(args, lost, run / "logs")
                others = [i for i, p in enumerate(r["procs"]) if p is not r["victim"]]
                record(
                    "peer_loss", "slkd train, 2 ranks (srun-like), CPU, gloo",
                    save=not a.no_save, lost=lost, peer_timeout_s=a.peer_timeout,
                    loader_timeout_s=a.loader_timeout,
                    seconds_to_line=round(max(r["said"].values()), 2) if r["said"] else None,
                    seconds_to_exit=None if r["waited"] is None else round(r["waited"], 2),
                    exit_statuses=[r["procs"][i].returncode for i in others],
                    one_line_each=all(len(r["lines"][i]) == 1 for i in others),
                    traceback=any("Traceback" in r["errs"][i] for i in others),
                    line_rank0=r["lines"][0][-1] if r["lines"][0] else None,
                )  # fmt: skip


if __name__ == "__main__":
    main()
