"""Cache storage, decode speed and open time.

    python benchmarks/cache_io.py [--tokens 2000000] [--no-save]

Targets (issue "Foundation"):
- at most 3.0 bytes per stored entry plus 1.0 byte per token of overhead for an
  RS cache with V <= 131072 and N <= 127;
- decoding into padded [L, K] at least 2M tokens/s per core for contiguous
  4096-token reads and 1M tokens/s for random 4096-token spans;
- opening a cache of 1,000 shards and 10M documents in under 2 s.

Storage uses the real sampler (N=50, V=131072) on Zipf-shaped logits tuned to
about 16 unique ids per position, the figure the SmolLM2 teacher gives on
English text. Decode and open use caches packed directly from numpy (the
writer's per-document path is not what is measured there).
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import record  # noqa: E402

from megatron_slkd.cache import Manifest, ShardWriter, encoding_for, open_cache  # noqa: E402
from megatron_slkd.cache.format import pack_entries  # noqa: E402
from megatron_slkd.cache.manifest import MANIFEST_NAME  # noqa: E402
from megatron_slkd.cache.writer import write_shard_file  # noqa: E402
from megatron_slkd.sampling import sample_sparse_targets  # noqa: E402

VOCAB = 131072


def _zipf_logits(rows: int, gen: torch.Generator) -> torch.Tensor:
    # Zipf(1.6) over a fixed random id order, rotated per row: ~16 unique ids in
    # 50 draws and 2.7 nats of entropy, like SmolLM2 on English text.
    ranks = torch.arange(1, VOCAB + 1, dtype=torch.float32)
    base = (-1.6 * torch.log(ranks))[torch.randperm(VOCAB, generator=gen)]
    shift = torch.randint(0, VOCAB, (rows, 1), generator=gen)
    idx = (torch.arange(VOCAB).unsqueeze(0) + shift) % VOCAB
    return base[idx] + 0.3 * torch.randn(rows, VOCAB, generator=gen)


def storage(tmp: Path, tokens: int, save: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(int(np.clip(rng.lognormal(6.5, 0.8), 16, 8192)))
    enc = encoding_for("rs", VOCAB, num_samples=50)
    w = ShardWriter.open(
        tmp / "s.slkd", encoding=enc, vocab_size=VOCAB, doc_start=0, doc_end=len(lengths)
    )
    pos = 0
    for n in lengths:
        t = sample_sparse_targets(
            _zipf_logits(n, gen), method="rs", seed=0, positions=torch.arange(pos, pos + n)
        )
        w.add_document(
            rng.integers(0, VOCAB, n),
            t.ids.numpy(),
            t.weights.numpy(),
            t.num_valid.numpy(),
            t.counts.numpy(),
        )
        pos += n
    rec = w.finalize()
    size, e, n = rec["size_bytes"], rec["num_entries"], rec["num_tokens"]
    record(
        "cache_io",
        "storage_rs_n50_v131072",
        save=save,
        tokens=n,
        documents=len(lengths),
        mean_doc_tokens=round(n / len(lengths), 1),
        entries=e,
        bytes=size,
        entry_bytes=enc.entry_bytes,
        bytes_per_token=round(size / n, 4),
        unique_ids_per_position=round(e / (n - len(lengths)), 2),
        overhead_bytes_per_token=round((size - enc.entry_bytes * e) / n, 4),
        gb_per_billion_tokens=round(size / n, 3),
        target="entry_bytes <= 3.0 and overhead_bytes_per_token <= 1.0",
    )


def _pack_shard(
    path: Path, doc_start: int, lengths: np.ndarray, counts: np.ndarray, enc, rng
) -> dict:
    """A shard straight from numpy arrays (not through the per-document writer)."""
    nent = int(counts.sum())
    entries = np.frombuffer(
        pack_entries(rng.integers(0, VOCAB, nent), rng.integers(1, enc.num_samples + 1, nent), enc),
        np.uint8,
    )
    return write_shard_file(path, encoding=enc, vocab_size=VOCAB, chunk_tokens=4096,
                            doc_start=doc_start, lengths=lengths, counts=counts,
                            entries=[entries], token_crc=0,
                            token_xxh128=None)  # fmt: skip


def _manifest(directory: Path, enc, records: list, ndocs: int, ntok: int) -> None:
    m = Manifest(
        dataset=dict(prefix="bench", num_documents=ndocs, num_tokens=ntok),
        tokenizer=dict(fingerprint="bench", vocab_size=VOCAB),
        teacher={},
        sampling=dict(method="rs", num_samples=50),
        encoding=enc,
        shards=records,
    )
    (directory / MANIFEST_NAME).write_text(m.to_json())


def decode(tmp: Path, tokens: int, save: bool) -> None:
    rng = np.random.default_rng(1)
    enc = encoding_for("rs", VOCAB, num_samples=50)
    lengths = np.clip(rng.lognormal(6.5, 0.8, size=tokens // 500), 16, 8192).astype(np.int64)
    counts = np.clip(rng.poisson(16, size=int(lengths.sum())), 1, 50).astype(np.uint8)
    counts[np.cumsum(lengths) - 1] = 0
    d = tmp / "decode"
    d.mkdir()
    half = len(lengths) // 2
    split = int(lengths[:half].sum())
    recs = [
        _pack_shard(d / "a.slkd", 0, lengths[:half], counts[:split], enc, rng),
        _pack_shard(d / "b.slkd", half, lengths[half:], counts[split:], enc, rng),
    ]
    _manifest(d, enc, recs, len(lengths), int(lengths.sum()))
    cache = open_cache(d)
    cache.read_tokens(0, cache.num_tokens)  # compile the kernels, check every chunk CRC once
    span, total = 4096, cache.num_tokens
    for kind, starts in (
        ("contiguous", np.arange(0, total - span, span)),
        ("random", rng.integers(0, total - span, size=(total - span) // span)),
    ):
        t = time.perf_counter()
        for s in starts:
            r = cache.read_tokens(int(s), span)
        secs = time.perf_counter() - t
        record(
            "cache_io",
            f"decode_{kind}_4096",
            save=save,
            reads=len(starts),
            span_tokens=span,
            tokens_per_second=round(len(starts) * span / secs),
            mean_k=round(float(r.num_entries.mean()), 2),
            threads=1,
            target=">= 2M/s" if kind == "contiguous" else ">= 1M/s",
        )


def open_time(tmp: Path, shards: int, docs: int, save: bool) -> None:
    rng = np.random.default_rng(2)
    enc = encoding_for("rs", VOCAB, num_samples=50)
    d = tmp / "open"
    d.mkdir()
    per = docs // shards
    lengths = np.full(per, 2, np.int64)
    counts = np.tile(np.array([1, 0], np.uint8), per)
    recs = [
        _pack_shard(d / f"s{i:05d}.slkd", i * per, lengths, counts, enc, rng) for i in range(shards)
    ]
    _manifest(d, enc, recs, per * shards, 2 * per * shards)
    os.sync()
    t = time.perf_counter()
    cache = open_cache(d)
    secs = time.perf_counter() - t
    assert cache.num_documents == per * shards
    record(
        "cache_io",
        "open_1000_shards_10M_docs",
        save=save,
        shards=shards,
        documents=per * shards,
        seconds=round(secs, 3),
        target="< 2 s",
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, default=2_000_000, help="tokens of the decode cache")
    p.add_argument(
        "--storage-tokens", type=int, default=65_536, help="tokens sampled for the storage figure"
    )
    p.add_argument("--shards", type=int, default=1000, help="shards of the open-time cache")
    p.add_argument("--documents", type=int, default=10_000_000, help="documents of that cache")
    p.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        storage(Path(tmp), args.storage_tokens, not args.no_save)
        decode(Path(tmp), args.tokens, not args.no_save)
        open_time(Path(tmp), args.shards, args.documents, not args.no_save)


if __name__ == "__main__":
    main()
