"""Verify a cache (``slkd verify-cache``): every byte, and alignment with its dataset.

Per shard: the whole-file CRC against the manifest, every chunk CRC, a full
decode (ids inside the vocabulary, values inside the encoding). Against the
IndexedDataset (``--data-prefix``): document count, every document length,
the token checksum of each shard's documents, and the tokenizer fingerprint
recorded by ``prepare-data``. Under ``mpirun -n K`` the shards are split
across ranks (largest first, each to the least-loaded rank) and the problems
gathered on rank 0.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from megatron_slkd.cache.format import file_crc32, token_crc32
from megatron_slkd.cache.reader import ShardFile, SparseKDCache, open_cache
from megatron_slkd.errors import SlkdError

__all__ = [
    "verify_cache",
    "check_alignment",
    "token_checksums",
    "tokenizer_problems",
    "assign_shards",
]

_READ_TOKENS = 1 << 18


def assign_shards(sizes: list[int], ranks: int) -> list[list[int]]:
    """Shard indices per rank, balancing bytes (largest first to the lightest rank)."""
    load = [0] * ranks
    plan: list[list[int]] = [[] for _ in range(ranks)]
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        r = load.index(min(load))
        plan[r].append(i)
        load[r] += sizes[i]
    return [sorted(p) for p in plan]


def _verify_shard_bytes(cache: SparseKDCache, i: int, file_crc: int | None = None) -> list[str]:
    """Problems of shard ``i``: its file CRC (``file_crc`` when already computed), every
    chunk CRC, a full decode."""
    if not isinstance(cache.shards[i], ShardFile):
        return _verify_remote_shard(cache, i)
    sh, rec = cache.shards[i], cache.manifest.shards[i]
    if (file_crc32(sh.path) if file_crc is None else file_crc) != rec["file_crc32"]:
        problems = [f"{sh.path}: file CRC differs from the manifest"]
    else:
        problems = []
    try:
        if sh.header.num_chunks:
            sh.verify_chunks(0, sh.header.num_chunks - 1)
        start = int(cache._token_starts[i])
        for t in range(0, sh.header.num_tokens, _READ_TOKENS):
            cache.read_tokens(start + t, min(_READ_TOKENS, sh.header.num_tokens - t))
    except SlkdError as exc:
        problems.append(str(exc))
    return problems


def _verify_remote_shard(cache: SparseKDCache, i: int) -> list[str]:
    """A shard on object storage: streamed once to a temporary local copy (file CRC on the
    way), which is then checked as a local shard is; the copy is removed."""
    import tempfile

    remote, rec = cache.shards[i], cache.manifest.shards[i]
    with tempfile.TemporaryDirectory(prefix="slkd-verify-") as tmp:
        file_crc = remote.download(tmp)
        if file_crc != rec["file_crc32"]:
            return [f"{remote.path}: file CRC differs from the manifest"]
        cache.shards[i] = ShardFile(Path(tmp), rec, cache.manifest)
        try:  # the local copy stands in for the object while its bytes are checked
            return _verify_shard_bytes(cache, i, file_crc)
        finally:
            cache.shards[i] = remote


def token_checksums(ds, ranges, *, workers: int | None = None) -> list[int]:
    """``token_crc32`` of the tokens of each document range ``(a, b)`` of ``ds``.

    Ranges are read in ``workers`` threads (default: the CPUs this process may
    use); zlib's CRC and numpy's dtype conversion release the GIL, so a 1B-token
    dataset is checked in seconds (``benchmarks/data_checks.py``).
    """
    from concurrent.futures import ThreadPoolExecutor

    from megatron_slkd.data.indexed import iter_token_blocks

    def one(r):
        value = 0
        for block in iter_token_blocks(ds, r[0], r[1]):
            value = token_crc32(block, value)
        return value

    ranges = list(ranges)
    workers = workers or len(os.sched_getaffinity(0))
    if workers <= 1 or len(ranges) <= 1:
        return [one(r) for r in ranges]
    with ThreadPoolExecutor(min(workers, len(ranges))) as pool:
        return list(pool.map(one, ranges))


def check_alignment(cache: SparseKDCache, ds, *, shards=None, tokens: bool = True) -> list[str]:
    """Problems aligning ``cache`` with the IndexedDataset ``ds`` (empty when aligned).

    Compares the document count, each shard's document lengths and, with
    ``tokens``, each shard's token checksum. ``shards`` limits the per-shard
    checks to those indices.
    """
    where = f"{cache.path} vs dataset {cache.manifest.dataset.get('prefix')}"
    lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
    if len(lengths) != cache.num_documents:
        return [
            f"{where}: the dataset has {len(lengths)} documents, the cache "
            f"{cache.num_documents}; the cache was built on another dataset"
        ]
    problems, checked = [], []
    for i in range(len(cache.shards)) if shards is None else shards:
        sh, rec = cache.shards[i], cache.manifest.shards[i]
        a, b = rec["doc_start"], rec["doc_end"]
        mine = np.diff(sh.doc_offsets.astype(np.int64))
        theirs = lengths[a:b]
        if not np.array_equal(mine, theirs):
            j = int(np.flatnonzero(mine != theirs)[0])
            problems.append(
                f"{sh.path}: document {a + j} has {int(mine[j])} tokens in the cache and "
                f"{int(theirs[j])} in the dataset (shard documents {a}..{b - 1})"
            )
            continue
        if tokens:
            checked.append((i, a, b))
    for (i, a, b), value in zip(
        checked, token_checksums(ds, [(a, b) for _, a, b in checked]), strict=True
    ):
        if value != cache.manifest.shards[i]["token_crc32"]:
            problems.append(
                f"{cache.shards[i].path}: token checksum of documents {a}..{b - 1} differs from "
                "the dataset's; same lengths, different tokens (another tokenizer or corpus?)"
            )
    return problems


def tokenizer_problems(cache: SparseKDCache, prefix: str, record: dict | None = None) -> list[str]:
    """Differences between the cache's tokenizer and the dataset's: ``record`` (its tokenizer
    record) or, when None, ``PREFIX.meta.json`` (empty when they agree, or when there is no
    record at all)."""
    from megatron_slkd.data.prepare import META_SUFFIX

    meta_path = Path(prefix + META_SUFFIX)
    if record is None:
        if not meta_path.exists():
            return []
        from megatron_slkd.records import load_record

        try:
            record = load_record(meta_path, SlkdError)
        except SlkdError as exc:
            return [str(exc)]
    else:
        meta_path = "the tokenizer named for the dataset"
    tok = record.get("tokenizer", {})
    mine = cache.manifest.tokenizer
    out = []
    for key in ("fingerprint", "vocab_size"):
        if key in tok and key in mine and tok[key] != mine[key]:
            out.append(
                f"{cache.path}: tokenizer {key} {mine[key]} differs from the dataset's "
                f"{tok[key]} ({meta_path})"
            )
    return out


def verify_cache(path, data_prefix: str | None = None, *, comm=None, tokens: bool = True,
                 data_meta: dict | None = None) -> dict:  # fmt: skip
    """Check ``path`` fully; returns ``{"ok", "problems", ...}``.

    Args:
        path: the cache directory.
        data_prefix: the IndexedDataset prefix to check alignment against.
        comm: an mpi4py communicator to split the work over (None: this process).
        tokens: compare token checksums (reads every dataset token).
        data_meta: the dataset's tokenizer record (None: ``PREFIX.meta.json`` if any).
    """
    start = time.time()
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    try:
        cache = open_cache(path, verify_reads=True)
    except SlkdError as exc:
        return {"ok": False, "problems": [str(exc)], "path": str(path)}
    mine = assign_shards([s["size_bytes"] for s in cache.manifest.shards], size)[rank]
    problems: list[str] = []
    for i in mine:
        problems += _verify_shard_bytes(cache, i)
    if data_prefix is not None:
        from megatron_slkd.data.indexed import open_dataset

        try:
            ds = open_dataset(data_prefix)
            problems += check_alignment(cache, ds, shards=mine, tokens=tokens)
        except SlkdError as exc:
            problems.append(str(exc))
        if rank == 0:
            problems += tokenizer_problems(cache, data_prefix, data_meta)
    if comm is not None:
        gathered = comm.gather(problems, root=0)
        problems = sorted({p for ps in gathered for p in ps}) if rank == 0 else problems
    return {
        "ok": not problems,
        "problems": problems,
        "path": str(path),
        "shards": len(cache.shards),
        "documents": cache.num_documents,
        "tokens": cache.num_tokens,
        "ranks": size,
        "aligned_with": data_prefix,
        "seconds": round(time.time() - start, 3),
    }
