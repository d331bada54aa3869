"""Verify a cache (``slkd verify-cache``): every byte, and alignment with its dataset.

Per shard: the whole-file CRC against the manifest, every chunk CRC, a full
decode (ids inside the vocabulary, values inside the encoding). Against the
IndexedDataset (``--data-prefix``): document count, every document length,
the token identity of each shard's documents, and the tokenizer fingerprint
recorded by ``prepare-data``. Under ``mpirun -n K`` the shards are split
across ranks (largest first, each to the least-loaded rank) and the problems
gathered on rank 0.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from megatron_slkd import identity
from megatron_slkd.cache.format import TOKEN_HASH_NAME, TokenHasher, file_crc32
from megatron_slkd.cache.reader import ShardFile, SparseKDCache, open_cache
from megatron_slkd.data.indexed import iter_token_blocks, open_dataset
from megatron_slkd.data.prepare import META_SUFFIX
from megatron_slkd.errors import SlkdError

__all__ = [
    "verify_cache",
    "check_alignment",
    "token_identities",
    "check_content",
    "check_contents",
    "verdict_key",
    "known_aligned",
    "note_aligned",
    "tokenizer_problems",
    "assign_shards",
]

_READ_TOKENS = 1 << 18
_log = logging.getLogger(__name__)


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


def token_identities(ds, ranges, *, workers: int | None = None) -> list[TokenHasher]:
    """The identity (CRC-32 and XXH3-128, :class:`~megatron_slkd.cache.format.TokenHasher`)
    of the tokens of each document range ``(a, b)`` of ``ds``.

    Ranges are read in ``workers`` threads (default: the CPUs this process may use);
    reading and numpy's dtype conversion release the GIL, the hashes run at about 20 GB/s a
    core (``benchmarks/data_checks.py``).
    """
    from concurrent.futures import ThreadPoolExecutor


    def one(r):
        h = TokenHasher()
        for block in iter_token_blocks(ds, r[0], r[1]):
            h.update(block)
        return h

    ranges = list(ranges)
    workers = workers or len(os.sched_getaffinity(0))
    if workers <= 1 or len(ranges) <= 1:
        return [one(r) for r in ranges]
    with ThreadPoolExecutor(min(workers, len(ranges))) as pool:
        return list(pool.map(one, ranges))


_WARNED: set[str] = set()


def _warn_unproven(cache: SparseKDCache) -> None:
    """Say once per process and cache that its shards of format version 1 prove their
    dataset by CRC-32 alone."""
    shards = cache.manifest.unproven_shards()
    if shards and str(cache.path) not in _WARNED:
        _WARNED.add(str(cache.path))
        _log.warning(
            "cache %s: %d of %d shards (%s%s) were written before format version 2 and record "
            "only a CRC-32 of their dataset tokens, so another dataset whose tokens collide "
            "in CRC-32 would pass their check; rebuild them, or remap the cache onto its own "
            "dataset (slkd remap-cache) to record 128-bit identities",
            cache.path, len(shards), len(cache.shards), ", ".join(shards[:3]),
            " ..." if len(shards) > 3 else "",
        )  # fmt: skip


def check_alignment(cache: SparseKDCache, ds, *, shards=None, tokens: bool = True,
                    workers: int | None = None) -> list[str]:  # fmt: skip
    """Problems aligning ``cache`` with the IndexedDataset ``ds`` (empty when aligned).

    Compares the document count, each shard's document lengths and, with ``tokens``,
    the identity of each shard's tokens: XXH3-128, or CRC-32 for shards written before
    format version 2 (said once, as a warning). ``shards`` limits the per-shard checks
    to those indices.
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
    found = token_identities(ds, [(a, b) for _, a, b in checked], workers=workers)
    for (i, a, b), h in zip(checked, found, strict=True):
        rec = cache.manifest.shards[i]
        want = rec.get(TOKEN_HASH_NAME)
        if (h.xxh128() != want) if want else (h.crc32 != rec["token_crc32"]):
            problems.append(
                f"{cache.shards[i].path}: token identity of documents {a}..{b - 1} differs from "
                "the dataset's; same lengths, different tokens (another tokenizer or corpus?)"
            )
    return problems


# -- verdicts: a (dataset, cache) pair whose tokens were shown equal ---------------------
_VERIFIED: set[str] = set()
_VERDICTS = "verified"


def verdict_key(cache: SparseKDCache, prefix: str) -> dict | None:
    """What a verdict on ``cache`` and the dataset at ``prefix`` is keyed by: the dataset's
    files by their stat (:func:`megatron_slkd.identity.stat_key`), the cache by every
    shard's range and identities. None for a dataset on object storage (no verdict kept)."""
    from megatron_slkd.storage import is_object_url

    if is_object_url(prefix):
        return None
    try:
        files = identity.dataset_key(prefix)
    except OSError:
        return None
    shards = [[r["file"], r["doc_start"], r["doc_end"], r["token_crc32"],
               r.get(TOKEN_HASH_NAME), r["file_crc32"]] for r in cache.manifest.shards]  # fmt: skip
    return {"dataset": files, "cache": {"path": str(cache.path), "shards": shards}}


def _id(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


def known_aligned(key: dict | None) -> bool:
    """Whether a verdict says the pair ``key`` names is aligned (in this process, or
    recorded by an earlier one)."""
    if key is None:
        return False
    return _id(key) in _VERIFIED or identity.recall(_VERDICTS, key) is not None


def note_aligned(key: dict | None, started: float, *, record: bool = True) -> None:
    """Remember that the pair ``key`` names is aligned, as shown by a check that began at
    ``started`` (``time.time()``): in this process, and with ``record`` for later ones
    when the dataset's files had settled before it and are unchanged since."""
    if key is None:
        return
    _VERIFIED.add(_id(key))
    if record and all(identity.recordable(k, started) for k in key["dataset"].values()):
        identity.remember(_VERDICTS, key, {"aligned": True})


def check_content(cache: SparseKDCache, prefix: str, ds, *, tokens: bool = True) -> list[str]:
    """:func:`check_alignment` of ``cache`` with the dataset ``ds`` at ``prefix``, reading the
    dataset's tokens only where no verdict says they were shown equal before (document
    counts and lengths, from the index, are compared every time); a pair shown aligned
    gets its verdict."""
    key = verdict_key(cache, prefix)
    if tokens:
        _warn_unproven(cache)
    if tokens and known_aligned(key):
        return check_alignment(cache, ds, tokens=False)
    started = time.time()
    problems = check_alignment(cache, ds, tokens=tokens)
    if tokens and not problems:
        note_aligned(key, started)
    return problems


def check_contents(pairs: list[tuple[str, SparseKDCache]], *, rank: int = 0, size: int = 1,
                   all_gather=None, workers: int | None = None) -> dict:  # fmt: skip
    """The content check of several (dataset prefix, cache) pairs spread over ``size``
    ranks: the pairs without a verdict (rank 0's view, shared) have their shards' tokens
    read, each rank taking its share by tokens (and ``workers`` threads); the problems
    are gathered on every rank; pairs shown aligned get their verdict (recorded by rank 0).

    Args:
        all_gather: ``f(obj) -> [obj of rank 0, ..., obj of rank size - 1]`` across the
            ranks (``torch.distributed.all_gather_object``); None for one rank.

    Returns:
        ``problems`` (the same on every rank), the prefixes whose tokens were ``read``
        and those ``known`` from a verdict, ``tokens`` read by all ranks, ``seconds``.
    """

    gather = all_gather or (lambda obj: [obj])
    keys = [verdict_key(c, p) for p, c in pairs]
    need = gather([i for i, k in enumerate(keys) if not known_aligned(k)])[0]
    units = [(i, s) for i in need for s in range(len(pairs[i][1].shards))]
    plan = assign_shards([pairs[i][1].manifest.shards[s]["num_tokens"] for i, s in units], size)
    started = time.time()
    problems: list[tuple[int, str]] = []
    for i in need:
        prefix, cache = pairs[i]
        mine = [s for j, s in (units[u] for u in plan[rank]) if j == i]
        found = check_alignment(cache, open_dataset(prefix), shards=mine, workers=workers)
        problems += [(i, p) for p in found]
    problems = sorted({x for ps in gather(problems) for x in ps})
    for i in need:
        if not any(j == i for j, _ in problems):
            note_aligned(keys[i], started, record=rank == 0)
    for _, cache in pairs:
        _warn_unproven(cache)
    return {
        "problems": [p for _, p in problems],
        "read": [pairs[i][0] for i in need],
        "known": [p for i, (p, _) in enumerate(pairs) if i not in need],
        "tokens": sum(pairs[i][1].num_tokens for i in need),
        "seconds": round(time.time() - started, 3),
    }


def tokenizer_problems(cache: SparseKDCache, prefix: str, record: dict | None = None) -> list[str]:
    """Differences between the cache's tokenizer and the dataset's: ``record`` (its tokenizer
    record) or, when None, ``PREFIX.meta.json`` (empty when they agree, or when there is no
    record at all)."""

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
        tokens: compare the tokens' identities (reads every dataset token; when every
            shard matches, a verdict is kept for ``slkd train``).
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
    key, aligned_from = None, time.time()
    if data_prefix is not None:

        key = verdict_key(cache, data_prefix) if tokens else None
        try:
            ds = open_dataset(data_prefix)
            if tokens:
                _warn_unproven(cache)
            problems += check_alignment(cache, ds, shards=mine, tokens=tokens)
        except SlkdError as exc:
            problems.append(str(exc))
        if rank == 0:
            problems += tokenizer_problems(cache, data_prefix, data_meta)
    if comm is not None:
        gathered = comm.gather(problems, root=0)
        problems = sorted({p for ps in gathered for p in ps}) if rank == 0 else problems
    if rank == 0 and not problems:  # every shard's tokens shown equal: a verdict for train
        note_aligned(key, aligned_from)
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
