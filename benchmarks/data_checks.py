"""Pre-training data checks on a large dataset: the token-id scan and the content check.

    python benchmarks/data_checks.py [--tokens 1000000000] [--dir /tmp/slkd-bench] [--keep]
        [--no-save]

Writes a synthetic IndexedDataset of ``--tokens`` tokens (uint16 ids, document
lengths 64..4095) with megatron-core's ``IndexedDatasetBuilder`` (says how
large before writing it, refuses when the disk lacks room, deletes it after
unless ``--keep``), then measures, from page cache, on this machine:

- ``check_dataset``'s full scan for the largest token id and the ids the
  documents end with (target: at least 100M tokens/s on one core);
- the hashes themselves, GB/s on one core over 256 MiB in memory: CRC-32
  (zlib-ng), XXH3-128 (the content identity), SHA-256 (teacher files);
- ``token_identities`` over 64 shard ranges: the first start of ``slkd train``
  on a (dataset, cache) pair reads every token once (later starts find the
  verdict), with one thread and with every CPU;
- ``check_content`` with a verdict recorded: what every later start costs;
- ``document_keys``, the per-document 128-bit keys ``remap-cache`` matches by;
- ``index_key``, the digest of the document layout every rank of ``slkd train``
  (and every SparseKDGPTDataset config) takes for megatron-core's sample-index
  key: from a cold page cache (as root: the caches are dropped first) and warm.
"""

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import record  # noqa: E402


def write_dataset(prefix: str, tokens: int, seed: int = 0) -> None:
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    done, block = 0, 1 << 24
    while done < tokens:
        n = min(block, tokens - done)
        lengths = rng.integers(64, 4096, size=n // 2000 + 2)
        lengths = lengths[np.cumsum(lengths) <= n]
        lengths = np.append(lengths, n - lengths.sum()) if lengths.sum() < n else lengths
        ids = rng.integers(0, 49151, size=n, dtype=np.uint16)
        ends = np.cumsum(lengths) - 1
        ids[ends] = 49151  # every document ends with the EOD id
        start = len(builder.sequence_lengths)
        builder.add_document(torch.from_numpy(ids.astype(np.int32)), lengths.tolist())
        # One document per sequence, as add_item + end_document would record them
        # (a call per document would dominate the write time).
        builder.document_indices[-1:] = range(start + 1, len(builder.sequence_lengths) + 1)
        done += n
    builder.finalize(prefix + ".idx")


def hash_rates(save: bool) -> None:
    """GB/s of each hash on one core, over 256 MiB already in memory."""
    import hashlib

    import xxhash

    from megatron_slkd.cache.format import crc32

    data = np.random.default_rng(0).integers(0, 256, 1 << 28, dtype=np.uint8).tobytes()
    for name, fn in (("crc32", crc32), ("xxh3_128", xxhash.xxh3_128_digest),
                     ("sha256", lambda b: hashlib.sha256(b).digest())):  # fmt: skip
        dt = min(_timed(fn, data) for _ in range(3))
        record("data_checks", "hash_rate", save, hash=name, gb_per_s=round(len(data) / dt / 1e9, 2))


def verdict_path(prefix, ds, ranges, save: bool, tokens: int) -> None:
    """A cache of ``ranges`` on the dataset (sidecar records only: the check reads the
    manifest's shard list and the index), then ``check_content`` twice: the first reads
    every token and records the verdict, the second finds it."""
    import tempfile

    from megatron_slkd.cache.manifest import Manifest
    from megatron_slkd.data.verify import check_content, token_identities

    class _Cache:  # what the content check reads of an open cache
        def __init__(self, manifest, path):
            self.manifest, self.path = manifest, Path(path)
            self.num_documents = len(ds.sequence_lengths)
            self.shards = [_Shard(ds, a, b) for a, b in ranges]

    class _Shard:
        def __init__(self, ds, a, b):
            offsets = np.concatenate([[0], np.cumsum(ds.sequence_lengths[a:b])])
            self.doc_offsets, self.path = offsets.astype(np.uint64), f"shard {a}..{b}"

    found = token_identities(ds, ranges)
    shards = [dict(file=f"s{i}", doc_start=a, doc_end=b, token_crc32=h.crc32,
                   token_xxh128=h.xxh128(), file_crc32=0, num_tokens=0)
              for i, ((a, b), h) in enumerate(zip(ranges, found, strict=True))]  # fmt: skip
    with tempfile.TemporaryDirectory() as home:
        os.environ["SLKD_CACHE_HOME"] = home
        m = Manifest(dataset={}, tokenizer={}, teacher={}, sampling={}, encoding=None,
                     shards=shards)  # fmt: skip
        cache = _Cache(m, Path(home) / "cache")
        for ext in (".bin", ".idx"):  # settled: written more than two seconds ago
            st = os.stat(prefix + ext)
            os.utime(prefix + ext, ns=(st.st_atime_ns, st.st_mtime_ns - 10**10))
        first = _timed(lambda: check_content(cache, prefix, ds) == [] or sys.exit("misaligned"))
        later = min(_timed(lambda: check_content(cache, prefix, ds)) for _ in range(3))
    record("data_checks", "content_check", save, tokens=tokens, shards=len(ranges),
           first_start_seconds=round(first, 3), later_start_seconds=round(later, 4))


def _timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, default=1_000_000_000)
    p.add_argument("--dir", default="/tmp/slkd-bench")
    p.add_argument("--keep", action="store_true", help="keep the dataset for a rerun")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    from megatron_slkd.data.describe import scan_dataset
    from megatron_slkd.data.indexed import open_dataset
    from megatron_slkd.data.remap import document_keys
    from megatron_slkd.data.verify import token_identities

    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = str(out / f"synthetic-{args.tokens}")
    need = args.tokens * 2 + args.tokens // 500
    if not Path(prefix + ".idx").exists():
        free = shutil.disk_usage(out).free
        print(f"writing a {need / 1e9:.2f} GB dataset to {prefix} ({free / 1e9:.0f} GB free)")
        if need > 0.9 * free:
            sys.exit(f"not enough room in {out}: {need / 1e9:.2f} GB needed")
        t = time.perf_counter()
        write_dataset(prefix, args.tokens)
        print(f"written in {time.perf_counter() - t:.1f} s")
    # Page cache warm-up: the figures are for data already in memory.
    with open(prefix + ".bin", "rb") as f:
        while f.read(1 << 26):
            pass
    save = not args.no_save
    t = time.perf_counter()
    scan = scan_dataset(prefix, progress=False)
    dt = time.perf_counter() - t
    assert scan["max_token_id"] == 49151 and scan["documents_end_with"] == 49151
    record("data_checks", "max_id_scan", save, tokens=args.tokens, seconds=round(dt, 3),
           tokens_per_s=round(args.tokens / dt), documents=scan["num_documents"],
           target_tokens_per_s=100_000_000)  # fmt: skip
    hash_rates(save)
    ds = open_dataset(prefix)
    n = len(ds.sequence_lengths)
    cuts = np.linspace(0, n, 65).astype(int)
    ranges = list(zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True))
    for workers in (1, len(os.sched_getaffinity(0))):
        t = time.perf_counter()
        token_identities(ds, ranges, workers=workers)
        dt = time.perf_counter() - t
        record("data_checks", "token_identities", save, tokens=args.tokens, shards=64,
               threads=workers, seconds=round(dt, 3), tokens_per_s=round(args.tokens / dt),
               seconds_per_1t_tokens_one_process=round(dt * 1000))  # fmt: skip
    verdict_path(prefix, ds, ranges, save, args.tokens)
    t = time.perf_counter()
    keys = document_keys(ds, 0, min(n, 200_000))
    dt = time.perf_counter() - t
    record("data_checks", "document_keys", save, documents=len(keys), seconds=round(dt, 3),
           documents_per_s=round(len(keys) / dt))  # fmt: skip
    from megatron_slkd.data.indexed import index_key

    cold = None
    if os.geteuid() == 0:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        t = time.perf_counter()
        index_key(prefix)
        cold = round(time.perf_counter() - t, 4)
    warm = min(_timed(index_key, prefix) for _ in range(5))
    record("data_checks", "index_key", save, tokens=args.tokens, sequences=n,
           idx_bytes=os.path.getsize(prefix + ".idx"), cold_seconds=cold,
           warm_seconds=round(warm, 4))  # fmt: skip
    if not args.keep:
        for suffix in (".bin", ".idx"):
            Path(prefix + suffix).unlink()


if __name__ == "__main__":
    main()
