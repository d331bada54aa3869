"""Student step time with RS-KD against cross-entropy only, and time waiting for data.

    python benchmarks/train_step.py [--tp 2] [--steps 14] [--repeats 2] [--no-save]

Both runs are ``slkd train`` under torchrun on the same model, data and seed at
the given tensor-parallel size: one reads sparse targets from an RS cache and
trains with the sparse KD loss (alpha 0), the other trains with megatron-core's
vocab-parallel cross-entropy and reads no cache. The corpus is synthetic (random
tokens, vocabulary 49152 like SmolLM2's) with an RS N=50 cache of about 12
unique ids per position: the cost measured is the cache read, the batch
broadcast and the loss, which do not depend on what the ids are.

Step time is the median over the steps after the first ``--warmup`` (worker
start-up and first-touch allocation); data wait is the time the data-reading
ranks spent blocked on the loader, over the same steps, as a share of step time.
Runs alternate (CE, KD, CE, KD, ...) and the medians of the repeats are reported.

Targets (issue "Student pretraining on megatron-core"): KD / CE step time at most
1.10 on CPU at TP=2; data wait at most 2% of step time.

Each record names the Python, torch and megatron-core it ran on and the loss of
the last step of each mode (the same seed in every repeat), so two releases of
megatron-core can be compared on one interpreter and torch build, e.g. with an
older release first on the path: ``PYTHONPATH=DIR python benchmarks/train_step.py``
where ``pip install --no-deps --target DIR megatron-core==0.16.1``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import record  # noqa: E402

VOCAB = 49152


def write_corpus(root: Path, docs: int, seed: int = 0) -> tuple[str, Path]:
    """Random-token documents, their meta.json and an RS N=50 cache (about 12 ids each)."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_slkd.cache import Manifest, ShardWriter, encoding_for
    from megatron_slkd.cache.manifest import MANIFEST_NAME
    from megatron_slkd.data.prepare import META_SUFFIX

    rng = np.random.default_rng(seed)
    prefix = str(root / "tokens")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(VOCAB))
    lengths = rng.integers(200, 1200, size=docs)
    documents = [rng.integers(0, VOCAB - 1, size=n) for n in lengths]
    import torch

    for d in documents:
        builder.add_item(torch.from_numpy(d))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    tok = {"fingerprint": "synthetic-49152", "vocab_size": VOCAB, "eod": VOCAB - 1}
    Path(prefix + META_SUFFIX).write_text(json.dumps({"tokenizer": tok}))
    cache = root / "cache"
    cache.mkdir()
    enc = encoding_for("rs", VOCAB, num_samples=50)
    w = ShardWriter.open(cache / "shard-00000.slkd", encoding=enc, vocab_size=VOCAB,
                         doc_start=0, doc_end=docs)  # fmt: skip
    for d in documents:
        n = len(d)
        ids = rng.integers(0, VOCAB - 1, size=(n, 16))
        ids.sort(axis=1)
        counts = np.stack([rng.multinomial(50, rng.dirichlet(np.full(16, 0.3))) for _ in range(n)])
        # drop duplicate ids (merge their counts) and zero-count entries, largest first
        order = np.argsort(-counts, axis=1, kind="stable")
        counts = np.take_along_axis(counts, order, 1)
        ids = np.take_along_axis(ids, order, 1)
        k = (counts > 0).sum(1)
        w.add_document(d, ids, counts / 50.0, k, counts)
    rec = w.finalize()
    manifest = Manifest(
        dataset=dict(prefix=prefix, num_documents=docs, num_tokens=int(lengths.sum())),
        tokenizer=dict(fingerprint=tok["fingerprint"], vocab_size=VOCAB),
        teacher=dict(name="synthetic"),
        sampling=dict(method="rs", num_samples=50, k=None, temperature=1.0, seed=seed),
        encoding=enc,
        shards=[rec],
    )
    (cache / MANIFEST_NAME).write_text(manifest.to_json())
    return prefix, cache


def versions() -> dict:
    """The interpreter, torch and megatron-core (as imported: PYTHONPATH first) measured."""
    import platform

    import torch

    from megatron_slkd.compat.megatron import installed_version

    return dict(python=platform.python_version(), torch=torch.__version__,
                megatron_core=installed_version())  # fmt: skip


def run(mode: str, prefix: str, cache: Path, work: Path, args) -> list[dict]:
    run_dir = work / f"{mode}-{len(list(work.glob(mode + '-*')))}"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.tp),
        "--master-port", "29731", "-m", "megatron_slkd.training",
        "--data-path", prefix, "--data-split", "100,0,0",
        "--data-index-cache", str(work / "index-cache"), "--data-num-workers", str(args.workers),
        "--parallel-tensor", str(args.tp), "--model-num-layers", str(args.layers),
        "--model-hidden-size", str(args.hidden), "--model-ffn-hidden-size", str(3 * args.hidden),
        "--model-num-attention-heads", "8", "--model-seq-length", str(args.seq),
        "--train-steps", str(args.steps), "--train-micro-batch-size", str(args.micro),
        "--train-global-batch-size", str(args.micro * args.accumulate),
        "--eval-batches", "0", "--eval-interval", "0", "--checkpoint-interval", "0",
        "--checkpoint-dir", str(run_dir), "--no-log-tensorboard",
    ]  # fmt: skip
    cmd += ["--kd-caches", f"{prefix}={cache}"] if mode == "kd" else ["--kd-ce-only"]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.tp)))
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    rows = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train" and r["step"] > args.warmup]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size (processes)")
    p.add_argument("--steps", type=int, default=14, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=4, help="first steps left out of the figures")
    p.add_argument("--repeats", type=int, default=2, help="runs per mode, alternating")
    p.add_argument("--layers", type=int, default=4, help="student layers")
    p.add_argument("--hidden", type=int, default=256, help="student width")
    p.add_argument("--seq", type=int, default=512, help="sequence length")
    p.add_argument("--micro", type=int, default=4, help="micro-batch size")
    p.add_argument("--accumulate", type=int, default=2, help="micro-batches per step")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers per reading rank")
    p.add_argument("--docs", type=int, default=300, help="documents in the synthetic corpus")
    p.add_argument("--no-save", action="store_true", help="print only, do not append results")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prefix, cache = write_corpus(work, args.docs)
        times: dict[str, list[float]] = {"ce": [], "kd": []}
        waits: dict[str, list[float]] = {"ce": [], "kd": []}
        losses: dict[str, list[float]] = {"ce": [], "kd": []}
        for _ in range(args.repeats):
            for mode in ("ce", "kd"):
                rows = run(mode, prefix, cache, work, args)
                times[mode].append(statistics.median(r["step_time"] for r in rows))
                losses[mode].append(rows[-1]["loss"])
                total = sum(r["step_time"] for r in rows)
                waits[mode].append(sum(r["data_wait"] * r["step_time"] for r in rows) / total)
    ce, kd = statistics.median(times["ce"]), statistics.median(times["kd"])
    tokens = args.micro * args.accumulate * args.seq
    common = dict(tp=args.tp, layers=args.layers, hidden=args.hidden, seq=args.seq,
                  global_batch=args.micro * args.accumulate, vocab=VOCAB, workers=args.workers,
                  steps_measured=args.steps - args.warmup, repeats=args.repeats,
                  **versions())  # fmt: skip
    save = not args.no_save
    record("train_step", "step_time_ce", save, seconds=ce, tokens_per_s=tokens / ce,
           runs=times["ce"], last_loss=losses["ce"], **common)  # fmt: skip
    record("train_step", "step_time_rs_kd", save, seconds=kd, tokens_per_s=tokens / kd,
           runs=times["kd"], last_loss=losses["kd"], **common)  # fmt: skip
    record("train_step", "kd_over_ce", save, ratio=kd / ce, target=1.10, **common)
    for mode in ("ce", "kd"):
        record("train_step", f"data_wait_{mode}", save, share=statistics.median(waits[mode]),
               runs=waits[mode], target=0.02, **common)  # fmt: skip


if __name__ == "__main__":
    main()
