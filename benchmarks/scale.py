"""Scale rehearsal: a synthetic RS cache at 10M, 100M and 1B tokens, written, merged,
verified, opened and read the way a pretraining run would.

    python benchmarks/scale.py [--tokens 10000000 100000000 1000000000] [--dir DIR]
                               [--writers 8] [--shards-per-writer 8] [--no-save]

For each size: a synthetic IndexedDataset (uint16 tokens, documents of 200 to
4000 tokens) written with megatron-core's IndexedDatasetBuilder; an RS cache
over it (N = 50, V = 49152, rows with the entry statistics of a real teacher:
about 12 distinct ids per position, from a per-position Zipf draw of 50
samples) written by ``--writers`` concurrent processes through the library's
shard writer (resumable partial state, commits, one-pass finalize, sidecars);
``slkd merge-cache`` in place; ``slkd verify-cache`` under ``mpirun -n 2``
(every chunk and file CRC, token checksums against the dataset); opening the
cache (time and memory, in a fresh process); random 4096-token span reads
through a DataLoader with 4 workers. Then a line fit of each figure against
the token count. Each size's files are deleted before the next one starts;
the size needed is printed first and the run refuses when the disk lacks
room. One JSON line per size and one for the fit go to
``benchmarks/results/scale.jsonl``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import record  # noqa: E402

VOCAB, N = 49152, 50
POOL = 1 << 16  # rows of synthetic teacher samples that documents draw from
CACHE_BYTES_PER_TOKEN = 12 * 3 + 1  # entries, plus counts and index with room to spare
DATA_BYTES_PER_TOKEN = 2


def _need_bytes(tokens: int, writers: int, num_shards: int) -> int:
    """Peak disk use: dataset, finished shards, and each writer's partial state and
    finalize copy of one shard."""
    shard = tokens / num_shards * CACHE_BYTES_PER_TOKEN
    return int(tokens * (DATA_BYTES_PER_TOKEN + CACHE_BYTES_PER_TOKEN) + 2 * writers * shard)


def _write_dataset(prefix: str, tokens: int, seed: int) -> np.ndarray:
    """A synthetic dataset of ``tokens`` tokens (megatron-core's builder); its lengths."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    lengths = rng.integers(200, 4001, tokens // 200 + 1)
    lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), tokens, side="right"))]
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    step = 2048  # documents per builder call
    for i in range(0, len(lengths), step):
        part = lengths[i : i + step]
        data = rng.integers(0, VOCAB, int(part.sum()), dtype=np.uint16)
        builder.add_document(torch.from_numpy(data.astype(np.int32)), part.tolist())
    builder.finalize(prefix + ".idx")
    return lengths


def _pool(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[POOL, K]`` ids and counts and ``[POOL]`` entries of RS rows: 50 draws per
    position from a Zipf law whose exponent varies by position (confident and uncertain
    positions), over a random id order; about 12 distinct ids per position."""
    rng = np.random.default_rng(seed)
    draws = rng.zipf(rng.uniform(1.4, 2.3, (POOL, 1)), (POOL, N))
    drawn = np.sort(rng.permutation(VOCAB)[np.minimum(draws, VOCAB) - 1], axis=1)
    first = np.ones_like(drawn, dtype=bool)
    first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    slot = np.cumsum(first, axis=1) - 1  # each draw's distinct-id column
    num = first.sum(1)
    rows = np.repeat(np.arange(POOL), N).reshape(POOL, N)
    ids = np.zeros((POOL, int(num.max())), np.int64)
    counts = np.zeros_like(ids)
    ids[rows[first], slot[first]] = drawn[first]
    np.add.at(counts, (rows.ravel(), slot.ravel()), 1)
    return ids, counts, num


def _writer(rank: int, writers: int, prefix: str, out: str, num_shards: int, seed: int) -> None:
    """One writer process: shards ``rank, rank + writers, ...`` through ShardWriter."""
    from megatron_slkd.cache import ShardWriter
    from megatron_slkd.data.indexed import open_dataset
    from megatron_slkd.teacher.build import plan_shards, shard_file_name

    base = _manifest(prefix, out)
    ds = open_dataset(prefix)
    lengths = np.asarray(ds.sequence_lengths, np.int64)
    ids, counts, num = _pool(seed)
    rng = np.random.default_rng(seed + 1 + rank)
    plan = plan_shards(lengths, num_shards)
    for i in range(rank, num_shards, writers):
        a, b = plan[i]
        w = ShardWriter.open(Path(out) / shard_file_name(i, num_shards), encoding=base.encoding,
                             vocab_size=VOCAB, doc_start=a, doc_end=b,
                             key=base.compatibility_key())  # fmt: skip
        since = 0
        for d in range(a, b):
            n = int(lengths[d])
            o = int(rng.integers(0, POOL - n)) if n < POOL else 0
            shift = int(rng.integers(0, VOCAB))
            rows = slice(o, o + n)
            c = counts[rows]
            w.add_document(ds.get(d), (ids[rows] + shift) % VOCAB, c / N, num[rows], c)
            since += n
            if since >= 1 << 22:
                w.commit()
                since = 0
        w.finalize(sidecar=base)


def _manifest(prefix: str, out: str):
    from megatron_slkd.cache import Manifest, encoding_for
    from megatron_slkd.data.indexed import dataset_fingerprint, open_dataset

    return Manifest(
        dataset=dataset_fingerprint(prefix, open_dataset(prefix)),
        tokenizer=dict(fingerprint="synthetic", vocab_size=VOCAB),
        teacher=dict(name="synthetic (benchmarks/scale.py)"),
        sampling=dict(method="rs", num_samples=N, temperature=1.0, seed=0),
        encoding=encoding_for("rs", VOCAB, num_samples=N),
        shards=[],
    )


def _slkd(*args, mpirun: int = 0) -> float:
    """Run an slkd command (under ``mpirun -n K`` when K); its wall time."""
    cmd = [sys.executable, "-m", "megatron_slkd", *map(str, args)]
    env = dict(os.environ)
    if mpirun:
        launcher = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or "mpirun"
        cmd = [launcher, "--allow-run-as-root", "--oversubscribe", "-n", str(mpirun), *cmd]
        env.update(OMPI_MCA_btl="self,tcp", OMPI_MCA_btl_tcp_if_include="lo")
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        tail = (r.stdout + r.stderr)[-3000:]
        raise SystemExit(f"scale: {' '.join(cmd[-6:])} failed:\n{tail}")
    return time.perf_counter() - t


_OPEN = """
import json, resource, sys, time
from megatron_slkd.cache import open_cache
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
before = rss()
t = time.perf_counter()
c = open_cache(sys.argv[1])
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "rss_mb": rss() - before, "shards": len(c.shards)}))
"""


def _open_figures(cache: Path) -> dict:
    import json

    r = subprocess.run([sys.executable, "-c", _OPEN, str(cache)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"scale: opening {cache} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


class _Spans:
    """Random 4096-token spans of a cache (a Dataset for the DataLoader)."""

    def __init__(self, path: str, count: int, span: int = 4096):
        self.path, self.count, self.span, self.cache = path, count, span, None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> int:
        from megatron_slkd.cache import open_cache

        if self.cache is None:
            self.cache = open_cache(self.path)
        rng = np.random.default_rng(i)
        start = int(rng.integers(0, self.cache.num_tokens - self.span))
        rows = self.cache.read_tokens(start, self.span)
        return int(rows.num_entries.sum())


def _span_reads(cache: Path, seconds: float = 10.0) -> float:
    """Random 4096-token span reads per second through a DataLoader with 4 workers."""
    import torch

    loader = torch.utils.data.DataLoader(
        _Spans(str(cache), 1 << 20), batch_size=None, num_workers=4, prefetch_factor=4
    )
    it, n = iter(loader), 0
    for _ in range(16):  # workers started, caches opened
        next(it)
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        next(it)
        n += 1
    rate = n / (time.perf_counter() - t)
    del it
    return rate


def _drop_page_cache() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def run_size(tokens: int, root: Path, args) -> dict:
    num_shards = args.writers * args.shards_per_writer
    prefix, out = str(root / "data"), root / "cache"
    out.mkdir()
    t = time.perf_counter()
    lengths = _write_dataset(prefix, tokens, seed=tokens % 1000)
    data_s = time.perf_counter() - t
    ctx = mp.get_context("spawn")
    t = time.perf_counter()
    procs = [ctx.Process(target=_writer, args=(r, args.writers, prefix, str(out), num_shards, 0))
             for r in range(args.writers)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    write_s = time.perf_counter() - t
    if any(p.exitcode for p in procs):
        raise SystemExit(f"scale: a writer failed (exit codes {[p.exitcode for p in procs]})")
    merge_s = _slkd("merge-cache", out, "--output", out)
    cache_bytes = sum(f.stat().st_size for f in out.glob("*.slkd"))
    dropped = _drop_page_cache()
    verify_s = _slkd("verify-cache", out, "--data-prefix", prefix, mpirun=2)
    opened = _open_figures(out)
    spans = _span_reads(out)
    from megatron_slkd.cache import open_cache

    entries = sum(s["num_entries"] for s in open_cache(out).manifest.shards)
    return dict(
        tokens=int(lengths.sum()), documents=len(lengths), shards=num_shards,
        writers=args.writers, cache_bytes=cache_bytes,
        bytes_per_token=round(cache_bytes / int(lengths.sum()), 3),
        entries_per_position=round(entries / (int(lengths.sum()) - len(lengths)), 2),
        dataset_seconds=round(data_s, 2), write_seconds=round(write_s, 2),
        write_tokens_per_s=round(int(lengths.sum()) / write_s),
        write_mb_per_s=round(cache_bytes / write_s / 1e6, 1),
        merge_seconds=round(merge_s, 2), verify_seconds=round(verify_s, 2),
        verify_mb_per_s=round(cache_bytes / verify_s / 1e6, 1),
        verify_page_cache_dropped=dropped, open_seconds=round(opened["seconds"], 4),
        open_rss_mb=round(opened["rss_mb"], 1), span_reads_per_s=round(spans, 1),
    )  # fmt: skip


def _fit(rows: list[dict]) -> dict:
    """Least-squares line (seconds = a + b * tokens) of each timed figure, and how the
    per-token cost at the largest size compares with the line through the others."""
    x = np.array([r["tokens"] for r in rows], float)
    out = {}
    for key in ("dataset_seconds", "write_seconds", "merge_seconds", "verify_seconds",
                "open_seconds", "open_rss_mb"):  # fmt: skip
        y = np.array([r[key] for r in rows], float)
        b, a = np.polyfit(x, y, 1) if len(rows) > 1 else (y[0] / x[0], 0.0)
        per_token = y / x
        out[key] = dict(intercept=round(float(a), 4), per_billion_tokens=round(float(b) * 1e9, 2),
                        per_token_ratio_largest_to_smallest=round(
                            float(per_token[-1] / per_token[0]), 3))  # fmt: skip
    out["span_reads_per_s"] = [r["span_reads_per_s"] for r in rows]
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, nargs="+",
                   default=[10_000_000, 100_000_000, 1_000_000_000],
                   help="dataset sizes to rehearse, in tokens")  # fmt: skip
    p.add_argument("--dir", default=None, help="where to write (default: the temp directory)")
    p.add_argument("--writers", type=int, default=8, help="concurrent writer processes")
    p.add_argument("--shards-per-writer", type=int, default=8,
                   help="shards per writer (bounds each writer's partial state)")  # fmt: skip
    p.add_argument("--no-save", action="store_true", help="print, do not append to results/")
    args = p.parse_args()
    where = Path(args.dir or tempfile.gettempdir())
    rows = []
    for tokens in sorted(args.tokens):
        need = _need_bytes(tokens, args.writers, args.writers * args.shards_per_writer)
        free = shutil.disk_usage(where).free
        print(f"scale: {tokens:,} tokens need about {need / 1e9:.1f} GB in {where} "
              f"(free: {free / 1e9:.1f} GB)", flush=True)  # fmt: skip
        if need > free * 0.95:
            raise SystemExit(
                f"scale: {where} has {free / 1e9:.1f} GB free, {tokens:,} tokens need about "
                f"{need / 1e9:.1f} GB; give --dir on a larger file system or fewer --tokens"
            )
        root = Path(tempfile.mkdtemp(prefix="slkd-scale-", dir=where))
        try:
            row = run_size(tokens, root, args)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        rows.append(record("scale", f"rehearsal_{tokens}", not args.no_save, **row))
    record("scale", "fit", not args.no_save, sizes=[r["tokens"] for r in rows], **_fit(rows))


if __name__ == "__main__":
    main()
