"""remap-cache throughput: copying packed entries into a re-ordered dataset's cache.

    python benchmarks/remap_cache.py [--tokens 10000000] [--dir /dev/shm] [--repeat 3] [--no-save]

A source RS cache (N = 50, V = 49152, about 12 entries per position, the
SmolLM2 teacher's figure) over a synthetic dataset, and a new dataset holding
the same documents shuffled (written with megatron-core's IndexedDatasetBuilder).
Measures one process: the content keys of both datasets and the source check
(total), and the copy of every document's entries into the new shards
(target: at least 20M tokens/s per core), the median of ``--repeat`` runs into a
fresh output. The copy checks every source chunk's CRC, then writes each shard
file in one pass (entries CRC-ed once, fsynced), so on a disk the figure is
bounded by its write bandwidth (measured here too, 256 MB fsynced);
``--dir /dev/shm`` measures the CPU's share alone.
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import record  # noqa: E402

from megatron_slkd.cache import Manifest, ShardWriter, encoding_for  # noqa: E402
from megatron_slkd.cache.format import _crc32  # noqa: E402
from megatron_slkd.cache.manifest import MANIFEST_NAME  # noqa: E402
from megatron_slkd.data.remap import remap_cache  # noqa: E402

crc32_impl = _crc32.__module__

VOCAB, N = 49152, 50


def _write(prefix, docs):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for d in docs:
        builder.add_item(torch.from_numpy(d.astype(np.int64)))
        builder.end_document()
    builder.finalize(prefix + ".idx")


def _source(root: Path, tokens: int, rng):
    lengths = rng.integers(200, 4000, tokens // 2000 + 1)
    lengths = lengths[np.cumsum(lengths) <= tokens]
    docs = [rng.integers(0, VOCAB, n).astype(np.uint16) for n in lengths]
    prefix = str(root / "src")
    _write(prefix, docs)
    enc = encoding_for("rs", VOCAB, num_samples=N)
    w = ShardWriter.open(root / "cache" / "shard-00000.slkd", encoding=enc, vocab_size=VOCAB,
                         doc_start=0, doc_end=len(docs))  # fmt: skip
    for d in docs:
        n = len(d)
        k = 12
        ids = rng.integers(0, VOCAB, (n, k))
        counts = np.full((n, k), N // k)
        counts[:, 0] += N - counts.sum(-1)
        w.add_document(d, ids, counts / N, np.full(n, k), counts)
    rec = w.finalize()
    m = Manifest(
        dataset=dict(prefix=prefix, num_documents=len(docs), num_tokens=int(lengths.sum())),
        tokenizer=dict(fingerprint="synthetic", vocab_size=VOCAB), teacher={},
        sampling=dict(method="rs", num_samples=N), encoding=enc, shards=[rec],
    )  # fmt: skip
    (root / "cache" / MANIFEST_NAME).write_text(m.to_json())
    return prefix, docs


def _disk_write_mb_per_s(root: Path) -> float:
    """Durable sequential write bandwidth of ``root``'s file system (256 MB, fsynced)."""
    import os

    block = np.zeros(1 << 24, np.uint8).tobytes()
    t = time.perf_counter()
    with open(root / "dd", "wb") as f:
        for _ in range(16):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    dt = time.perf_counter() - t
    (root / "dd").unlink()
    return round(256 / dt, 1)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, default=10_000_000)
    p.add_argument("--dir", default=None, help="where to write (default: the temp directory)")
    p.add_argument("--repeat", type=int, default=3, help="remap runs; the median is recorded")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        (root / "cache").mkdir()
        _, docs = _source(root, args.tokens, rng)
        _write(str(root / "new"), [docs[i] for i in rng.permutation(len(docs))])
        runs = []
        for i in range(args.repeat):
            t = time.perf_counter()
            r = remap_cache([root / "cache"], str(root / "new"), root / f"out{i}", num_shards=4,
                            progress=False)  # fmt: skip
            runs.append((r["copy_seconds"], time.perf_counter() - t))
            assert r["complete"] and not r["missing_documents"]
            shutil.rmtree(root / f"out{i}")
        copy, total = sorted(runs)[len(runs) // 2]
        record("remap_cache", "remap_shuffled", not args.no_save, tokens=r["tokens"],
               documents=r["documents"], entries_per_token=12, seconds=round(total, 3),
               copy_seconds=copy, copy_seconds_runs=[c for c, _ in runs],
               copy_tokens_per_s=round(r["tokens"] / copy),
               total_tokens_per_s=round(r["tokens"] / total),
               target_copy_tokens_per_s=20_000_000, directory=args.dir or tempfile.gettempdir(),
               crc32=crc32_impl, disk_write_mb_per_s=_disk_write_mb_per_s(root))  # fmt: skip


if __name__ == "__main__":
    main()
