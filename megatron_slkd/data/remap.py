"""Re-key caches for a dataset holding the same documents in another arrangement
(``slkd remap-cache``), without running the teacher.

Megatron-LM's ``tools/merge_datasets.py`` concatenates prefixes, and corpora
get subset, re-ordered or deduplicated; the document ids every cache is keyed
by change, the documents do not. Each document of the new dataset is matched
by content (its length and the XXH3-128 of its tokens as int32) to a document
of one of the source datasets, and the source's entries are copied byte for
byte (same encoding, no re-sampling) into shards of the new dataset's order.
The draws were keyed by the source positions (decision D2), so the result is
the source's sample at each position: the same targets, not the ones
``build-cache`` with the same seed would draw on the new dataset.

Each source dataset is checked against its cache first (lengths and every
shard's token identity), so a match by content is a match of the tokens the
teacher saw; the new shards record the new dataset's token identity, read from
it as they are written. A document with no match is an error listing its id, unless
``allow_missing``: it then gets empty rows (training falls back to
cross-entropy there) and the manifest counts it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import xxhash

from megatron_slkd.cache import _decode
from megatron_slkd.cache.manifest import MANIFEST_NAME, Manifest
from megatron_slkd.cache.merge import merge_cache
from megatron_slkd.cache.reader import SparseKDCache, open_cache
from megatron_slkd.cache.shards import plan_shards, shard_file_name
from megatron_slkd.cache.writer import check_finished_shard, differences, write_shard_file
from megatron_slkd.data.indexed import dataset_fingerprint, iter_token_blocks, open_dataset
from megatron_slkd.data.verify import check_alignment, token_identities
from megatron_slkd.errors import (
    CacheCoverageError,
    CacheFormatError,
    CacheMismatchError,
    DataMismatchError,
)

__all__ = ["document_keys", "remap_cache"]


def document_keys(ds, start: int = 0, end: int | None = None) -> list[bytes]:
    """Content keys of documents ``start..end-1``: the length (8 bytes, little-endian) and
    the XXH3-128 of the tokens as little-endian int32 (the cache's token identity rule),
    24 bytes each. At 128 bits a chance match among even 10^9 documents of one length is
    out of reach (about n^2 / 2^129), where CRC-32 gave one in 2^32 pairs."""

    lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
    end = len(lengths) if end is None else end
    keys: list[bytes] = []
    d = start
    for block in iter_token_blocks(ds, start, end):
        data = np.ascontiguousarray(block, dtype="<i4")
        view, at = memoryview(data).cast("B"), 0
        while at < len(data):
            n = int(lengths[d])
            digest = xxhash.xxh3_128_digest(view[4 * at : 4 * (at + n)])
            keys.append(n.to_bytes(8, "little") + digest)
            at += n
            d += 1
    empty = xxhash.xxh3_128_digest(b"")
    keys += [bytes(8) + empty] * (end - d)  # empty documents at the end
    return keys


class _Source:
    """A source cache read as packed bytes, shard by shard (each shard's chunk CRCs
    checked once, before any of its bytes are copied)."""

    def __init__(self, cache: SparseKDCache):
        self.cache = cache
        self._starts: dict[int, np.ndarray] = {}

    def _entry_starts(self, si: int) -> np.ndarray:
        """First entry of every document of shard ``si`` (and the entry count last)."""
        if si not in self._starts:
            sh = self.cache.shards[si]
            if sh.header.num_chunks:
                sh.verify_chunks(0, sh.header.num_chunks - 1)
            offs = sh.doc_offsets.astype(np.int64)
            starts = np.empty(len(offs), dtype=np.int64)
            status = _decode.span_entry_starts(
                sh.counts, sh.header.encoding.count_bits, sh.chunk_offsets,
                sh.header.chunk_tokens, offs[:-1], np.diff(offs), starts[:-1],
            )  # fmt: skip
            if status < 0:
                raise CacheFormatError(
                    f"{sh.path}: {_decode.STATUS[-status]}; the shard is corrupt"
                )
            starts[-1] = sh.header.num_entries
            self._starts[si] = starts
        return self._starts[si]

    def entries(self, doc: int, counts: np.ndarray) -> np.ndarray:
        """The packed entry bytes of ``doc``; its per-token entry counts go to ``counts``."""
        si, a, n = self.cache._locate(doc)
        sh = self.cache.shards[si]
        starts = self._entry_starts(si)
        local = doc - int(self.cache._doc_starts[si])
        _decode.unpack_count_range(sh.counts, sh.header.encoding.count_bits, a, counts)
        eb = sh.header.encoding.entry_bytes
        e0, e1 = int(starts[local]), int(starts[local + 1])
        if int(counts.sum(dtype=np.int64)) != e1 - e0:
            raise CacheFormatError(f"{sh.path}: entry counts of document {doc} disagree")
        return sh.entries[e0 * eb : e1 * eb]


def _common_manifest(caches: list[SparseKDCache]) -> Manifest:
    first = caches[0].manifest.compatibility_key()
    first.pop("dataset")
    for c in caches[1:]:
        key = c.manifest.compatibility_key()
        key.pop("dataset")
        diff = differences(first, key)
        if diff:
            raise CacheMismatchError(
                f"{c.path} and {caches[0].path} were built with other settings "
                f"({'; '.join(diff[:6])}); only caches of one teacher run can be remapped together"
            )
    return caches[0].manifest


def _write_shards(locks, mine, out, num_shards, plan, lengths, new, base, readers, match,
                  bar) -> int:  # fmt: skip
    """Write this process's shards of the new cache; returns the tokens copied.

    A shard is written whole, in one pass (``write_shard_file``): every
    document's counts and entry location are gathered first (reading only the
    source index), then the entries are streamed from the sources into place.
    A run that stops keeps its finished shards and redoes the others.
    """

    copied = 0
    for i in mine:
        a, b = plan[i]
        shard_tokens = int(lengths[a:b].sum())
        path = out / shard_file_name(i, num_shards)
        if path.exists() and Path(str(path) + ".json").exists():
            check_finished_shard(path, base)
            bar.update(shard_tokens)
            continue
        counts = np.zeros(shard_tokens, dtype=np.uint8)
        pieces, at = [], 0
        for d in range(a, b):
            n = int(lengths[d])
            if match[d] is not None:  # a missing document keeps zero counts: empty rows
                src, doc = match[d]
                pieces.append(readers[src].entries(doc, counts[at : at + n]))
            at += n
        # The new dataset's own tokens, read again: the record states what is there.
        tokens = token_identities(new, [(a, b)])[0]
        total, shown = max(sum(p.size for p in pieces), 1), [0]

        def check(written, total=total, shown=shown, shard_tokens=shard_tokens):
            for lock in locks:
                lock.check()
            tokens = shard_tokens * written // total
            bar.update(tokens - shown[0])
            shown[0] = tokens

        write_shard_file(
            path, encoding=base.encoding, vocab_size=readers[0].cache.vocab_size,
            chunk_tokens=readers[0].cache.shards[0].header.chunk_tokens, doc_start=a,
            lengths=lengths[a:b], counts=counts, entries=pieces, token_crc=tokens.crc32,
            token_xxh128=tokens.xxh128(), sidecar=base, check=check,
        )  # fmt: skip
        bar.update(shard_tokens - shown[0])
        copied += shard_tokens
    return copied


def remap_cache(sources, data_prefix: str, output, *, source_prefixes: dict | None = None,
                allow_missing: bool = False, num_shards: int = 1,
                shard_indices: list[int] | None = None, comm=None,
                progress: bool = True, lock_timeout: float = 300.0) -> dict:  # fmt: skip
    """Write the cache of ``data_prefix`` at ``output`` from the caches ``sources``.

    Args:
        sources: cache directories of the datasets the documents come from.
        data_prefix: the new dataset.
        output: the new cache directory.
        source_prefixes: cache directory -> its dataset prefix, where the manifest's
            recorded prefix has moved.
        allow_missing: give documents without a match empty rows instead of failing.
        num_shards: shards of the new cache; ``shard_indices`` those this process writes.
        comm: an mpi4py communicator whose ranks split the shards (rank 0 merges).

    Raises:
        CacheMismatchError: the sources disagree in settings, or a source dataset does
            not match its cache.
        CacheCoverageError: documents without a match (listed), without ``allow_missing``.
    """
    from tqdm import tqdm


    start = time.time()
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    new = open_dataset(data_prefix)  # its files checked before any source is read
    caches = [open_cache(s) for s in sources]
    m = _common_manifest(caches)
    given = {str(Path(k).resolve()): v for k, v in (source_prefixes or {}).items()}
    table: dict[int, tuple[int, int]] = {}
    source_datasets = []
    for i, c in enumerate(caches):
        prefix = given.get(str(c.path.resolve()), c.manifest.dataset.get("prefix"))
        try:
            ds = open_dataset(prefix)
        except DataMismatchError as exc:
            raise CacheMismatchError(
                f"{c.path}: its dataset {prefix} cannot be read ({exc}); where it moved, give "
                f"it with --source-prefix {c.path}=PREFIX"
            ) from exc
        problems = check_alignment(c, ds)
        if problems:
            raise CacheMismatchError(
                f"{c.path}: dataset {prefix} is not the one it was built on: {problems[0]}; "
                f"give the right one with --source-prefix {c.path}=PREFIX"
            )
        source_datasets.append(ds)
        for d, key in enumerate(document_keys(ds)):
            table.setdefault(key, (i, d))  # a duplicated document: its first copy
    lengths = np.asarray(new.sequence_lengths, dtype=np.int64)
    keys = document_keys(new)
    match = [table.get(k) for k in keys]
    missing = [d for d, x in enumerate(match) if x is None and lengths[d] > 0]
    if missing and not allow_missing:
        raise CacheCoverageError(
            f"{data_prefix}: {len(missing)} of {len(keys)} documents are in none of the source "
            f"datasets (ids {missing[:20]}{' ...' if len(missing) > 20 else ''}); add the caches "
            "of their datasets, or pass --allow-missing to give them empty rows (cross-entropy)"
        )
    base = dataclasses.replace(
        m,
        dataset=dataset_fingerprint(data_prefix, new),
        shards=[],
        extra={
            "remapped_from": [{"path": str(c.path), "dataset": c.manifest.dataset} for c in caches],
            "missing_documents": len(missing),
        },
    )
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_shards(lengths, num_shards)
    mine = list(range(rank, num_shards, size)) if shard_indices is None else shard_indices
    readers = [_Source(c) for c in caches]
    total = sum(int(lengths[a:b].sum()) for a, b in (plan[i] for i in mine))
    copy_start = time.time()
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="remap", disable=not progress)
    from megatron_slkd.ownership import claim, clear_dead_owner

    locks = []
    try:
        for i in mine:  # one writer per shard, claimed before any is written
            path = out / shard_file_name(i, num_shards)
            if path.exists() and Path(str(path) + ".json").exists():
                clear_dead_owner(path, what="remapped shard", timeout_s=lock_timeout)
            else:
                locks.append(claim(path, what="remapped shard", timeout_s=lock_timeout))
        copied = _write_shards(locks, mine, out, num_shards, plan, lengths, new, base,
                               readers, match, bar)  # fmt: skip
    finally:
        for lock in locks:
            lock.release()
    bar.close()
    copy_seconds = time.time() - copy_start
    if comm is not None:
        comm.Barrier()
    names = [shard_file_name(i, num_shards) + ".json" for i in range(num_shards)]
    complete = all((out / n).exists() for n in names)
    if complete and rank == 0 and not (out / MANIFEST_NAME).exists():
        merge_cache([out], out)
    seconds = time.time() - start
    return {
        "output": str(out),
        "documents": len(keys),
        "tokens": int(lengths.sum()),
        "missing_documents": missing,
        "sources": [str(c.path) for c in caches],
        "shards": num_shards,
        "shard_indices": mine,
        "complete": complete,
        "tokens_copied": copied,
        "copy_seconds": round(copy_seconds, 3),
        "seconds": round(seconds, 3),
    }
