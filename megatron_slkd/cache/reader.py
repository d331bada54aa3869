"""Memory-mapped reader of a sparse-logit cache directory.

``open_cache(path)`` reads the manifest and each shard's header and index
(document offsets, chunk table), checking magic, version, header CRC, file
size and index CRC: memory and work at open are O(documents), never
O(tokens). Entry data is checked lazily: the first read that touches a chunk
verifies that chunk's CRC, so a flipped byte is reported, never decoded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from megatron_slkd.cache import _decode
from megatron_slkd.cache.format import (
    HEADER_SIZE,
    ValueKind,
    check_header,
    check_index,
    chunk_crc,
    section_offsets,
)
from megatron_slkd.cache.manifest import MANIFEST_NAME, Manifest
from megatron_slkd.errors import CacheCoverageError, CacheFormatError

__all__ = ["open_cache", "SparseKDCache", "SparseRows", "ShardFile"]


class SparseRows(NamedTuple):
    """Decoded cache rows.

    ids: ``[L, K]`` int64 token ids, 0 on padding.
    weights: ``[L, K]`` float32 weights (count / N, or probabilities), 0 on padding.
    num_entries: ``[L]`` int64 valid entries per row (0 on a document's last token).
    """

    ids: np.ndarray
    weights: np.ndarray
    num_entries: np.ndarray


class ShardFile:
    """One shard file, memory-mapped, with its header and index checked."""

    def __init__(self, directory: Path, record: dict, manifest: Manifest):
        self.path = path = Path(directory) / record["file"]
        docs = f"documents {record['doc_start']}..{record['doc_end'] - 1}"
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                raw = f.read(HEADER_SIZE)
        except FileNotFoundError as exc:
            raise CacheFormatError(
                f"{path}: missing shard for {docs}; rebuild or copy it, then re-run merge-cache"
            ) from exc
        self.header = h = check_header(path, raw, size, record, manifest)
        off = section_offsets(h)
        mm = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        index = mm[off["doc_offsets"] : off["counts"]]
        self.doc_offsets, self.chunk_offsets, self.chunk_crcs = check_index(path, h, index, record)
        self.counts = mm[off["counts"] : off["entries"]]
        self.entries = mm[off["entries"] : off["end"]]
        self._verified: np.ndarray | None = None

    def window(self, starts: np.ndarray, lengths: np.ndarray, verify: bool):
        """(counts, entries, chunk entry offsets, starts) to decode the spans ``starts``,
        ``lengths`` (shard-local tokens) with: here the whole shard, in place; chunks
        checked first when ``verify``."""
        if verify:
            c = self.header.chunk_tokens
            for t, n in zip(starts.tolist(), lengths.tolist(), strict=True):
                self.verify_chunks(t // c, (t + n - 1) // c)
        return self.counts, self.entries, self.chunk_offsets, starts

    def prefetch(self, starts, lengths) -> None:
        """Nothing to fetch for a local file."""

    def counts_section(self) -> np.ndarray:
        """The packed per-token entry counts of the whole shard."""
        return self.counts

    def verify_chunks(self, first: int, last: int) -> None:
        """Check the CRC of chunks ``first..last`` (inclusive) not checked before."""
        h = self.header
        if self._verified is None:
            self._verified = np.zeros(h.num_chunks, dtype=bool)
        c = h.chunk_tokens
        for i in range(first, last + 1):
            if self._verified[i]:
                continue
            got = chunk_crc(
                i, h.num_chunks, c, h.encoding, self.counts, self.entries, self.chunk_offsets
            )
            if got != int(self.chunk_crcs[i]):
                raise CacheFormatError(
                    f"{self.path}: CRC mismatch in chunk {i} (shard tokens {i * c}.."
                    f"{min((i + 1) * c, h.num_tokens) - 1}, documents from "
                    f"{h.doc_start + self.document_at(i * c)}); the shard is corrupt, rebuild it"
                )
            self._verified[i] = True

    def document_at(self, token: int) -> int:
        """Shard-local index of the document holding shard-local ``token``."""
        return int(np.searchsorted(self.doc_offsets, token, side="right")) - 1


class SparseKDCache:
    """A cache directory opened for reading. Construct with :func:`open_cache`."""

    def __init__(self, path, *, verify_reads: bool = True, local_cache_dir=None,
                 local_cache_bytes: int | None = None):  # fmt: skip
        from megatron_slkd.storage import check_url, is_object_url

        check_url(str(path))
        remote = is_object_url(str(path))
        if remote:
            from megatron_slkd.storage import ObjectStore, join

            store = ObjectStore(str(path))
            self.path = store.url
            where = join(store.url, MANIFEST_NAME)
            m = Manifest.read(store.url)
        else:
            self.path = Path(path)
            if not self.path.is_dir():
                raise CacheFormatError(f"{self.path}: not a cache directory")
            where = self.path / MANIFEST_NAME
            m = Manifest.load(where)
        self.manifest = m
        self.remote = remote
        self.verify_reads = verify_reads
        expected = 0
        for s in m.shards:
            if s["doc_start"] != expected:
                kind = "gap" if s["doc_start"] > expected else "overlap"
                raise CacheCoverageError(
                    f"{where}: {kind} at documents "
                    f"{min(expected, s['doc_start'])}..{max(expected, s['doc_start']) - 1} "
                    f"(shard {s['file']} starts at {s['doc_start']})"
                )
            expected = s["doc_end"]
        if expected != m.dataset["num_documents"]:
            raise CacheCoverageError(
                f"{where}: shards cover documents 0..{expected - 1} of "
                f"{m.dataset['num_documents']}; documents {expected}.."
                f"{m.dataset['num_documents'] - 1} have no shard"
            )
        if remote:
            from concurrent.futures import ThreadPoolExecutor

            from megatron_slkd.cache.remote import (
                LocalChunkCache,
                RemoteShard,
                default_cache_bytes,
                default_cache_dir,
            )

            local = LocalChunkCache(local_cache_dir or default_cache_dir(),
                                    local_cache_bytes or default_cache_bytes())  # fmt: skip
            with ThreadPoolExecutor(16) as pool:  # one or two requests per shard, in parallel
                self.shards = list(pool.map(lambda s: RemoteShard(store, s, m, local), m.shards))
        else:
            self.shards = [ShardFile(self.path, s, m) for s in m.shards]
        self._doc_starts = np.array([s["doc_start"] for s in m.shards] + [expected], np.int64)
        tok = np.zeros(len(m.shards) + 1, np.int64)
        np.cumsum([s["num_tokens"] for s in m.shards], out=tok[1:])
        self._token_starts = tok
        if int(tok[-1]) != m.dataset["num_tokens"]:
            raise CacheFormatError(
                f"{self.path}: shards hold {int(tok[-1])} tokens, the manifest's dataset "
                f"{m.dataset['num_tokens']}"
            )
        enc = m.encoding
        self._table = enc.weight_table()
        self._min_value = 1 if enc.value_kind == ValueKind.COUNT else 0
        self.vocab_size = int(m.tokenizer["vocab_size"])

    # -- shape ------------------------------------------------------------
    @property
    def num_documents(self) -> int:
        return int(self._doc_starts[-1])

    @property
    def num_tokens(self) -> int:
        return int(self._token_starts[-1])

    def teacher_figures(self) -> dict[str, float] | None:
        """See :meth:`~megatron_slkd.cache.manifest.Manifest.teacher_figures`."""
        return self.manifest.teacher_figures()

    def document_lengths(self) -> np.ndarray:
        """``[num_documents]`` int64 token counts (reads every shard's index)."""
        return np.concatenate(
            [np.diff(s.doc_offsets.astype(np.int64)) for s in self.shards]
            or [np.zeros(0, np.int64)]
        )

    def _locate(self, doc: int) -> tuple[int, int, int]:
        """(shard index, shard-local token start, length) of document ``doc``."""
        if not 0 <= doc < self.num_documents:
            raise IndexError(f"document {doc} outside [0, {self.num_documents}) in {self.path}")
        si = int(np.searchsorted(self._doc_starts, doc, side="right")) - 1
        sh = self.shards[si]
        local = doc - int(self._doc_starts[si])
        a, b = int(sh.doc_offsets[local]), int(sh.doc_offsets[local + 1])
        return si, a, b - a

    # -- reads ------------------------------------------------------------
    def read(self, doc: int, offset: int, length: int) -> SparseRows:
        """Rows ``offset .. offset + length - 1`` of document ``doc``.

        Row p is the teacher's distribution of the document's token at p + 1.
        """
        return self.read_spans([doc], [offset], [length])

    def read_spans(self, docs, offsets, lengths) -> SparseRows:
        """Several document spans, concatenated in order, padded to one K."""
        spans = []
        for d, o, n in zip(docs, offsets, lengths, strict=True):
            si, a, dl = self._locate(int(d))
            if o < 0 or n < 0 or o + n > dl:
                raise IndexError(
                    f"rows {o}..{o + n - 1} outside document {d} of {dl} tokens in {self.path}"
                )
            spans.append((si, a + int(o), int(n)))
        return self._decode(spans)

    def prefetch_spans(self, docs, offsets, lengths) -> None:
        """Start fetching what :meth:`read_spans` of these spans will need (a cache on
        object storage; nothing for a local one); returns at once."""
        if not self.remote:
            return
        by_shard: dict[int, tuple[list[int], list[int]]] = {}
        for d, o, n in zip(docs, offsets, lengths, strict=True):
            si, a, dl = self._locate(int(d))
            if 0 <= o and n > 0 and o + n <= dl:
                starts, lens = by_shard.setdefault(si, ([], []))
                starts.append(a + int(o))
                lens.append(int(n))
        for si, (starts, lens) in by_shard.items():
            self.shards[si].prefetch(starts, lens)

    def read_tokens(self, start: int, length: int) -> SparseRows:
        """Rows of the absolute token range ``[start, start + length)`` of the dataset."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(
                f"tokens {start}..{start + length - 1} outside "
                f"[0, {self.num_tokens}) in {self.path}"
            )
        spans, end = [], start + length
        si = int(np.searchsorted(self._token_starts, start, side="right")) - 1
        while start < end:
            t0, t1 = int(self._token_starts[si]), int(self._token_starts[si + 1])
            n = min(end, t1) - start
            if n > 0:
                spans.append((si, start - t0, n))
            start += n
            si += 1
        return self._decode(spans)

    def _decode(self, spans) -> SparseRows:
        total = sum(n for _, _, n in spans)
        by_shard: dict[int, list[tuple[int, int, int]]] = {}
        row = 0
        for si, t, n in spans:
            by_shard.setdefault(si, []).append((t, n, row))
            row += n
        plans, kmax = [], 0
        for si, items in by_shard.items():
            sh = self.shards[si]
            arr = np.array(items, dtype=np.int64).reshape(-1, 3)
            starts, lens, rows = arr[:, 0].copy(), arr[:, 1].copy(), arr[:, 2].copy()
            keep = lens > 0
            starts, lens, rows = starts[keep], lens[keep], rows[keep]
            if not starts.size:
                continue
            counts, entries, chunk_offsets, at = sh.window(starts, lens, self.verify_reads)
            estarts = np.empty_like(starts)
            k = _decode.span_entry_starts(
                counts, sh.header.encoding.count_bits, chunk_offsets, sh.header.chunk_tokens,
                at, lens, estarts,
            )  # fmt: skip
            if k < 0:
                raise CacheFormatError(f"{sh.path}: {_decode.STATUS[-k]}; the shard is corrupt")
            kmax = max(kmax, int(k))
            plans.append((sh, counts, entries, at, lens, estarts, rows))
        ids = np.zeros((total, kmax), dtype=np.int64)
        weights = np.zeros((total, kmax), dtype=np.float32)
        nent = np.zeros(total, dtype=np.int64)
        enc = self.manifest.encoding
        for sh, counts, entries, starts, lens, estarts, rows in plans:
            status = _decode.decode_spans(
                counts,
                enc.count_bits,
                entries,
                enc.entry_bytes,
                enc.id_bits,
                self._table,
                self._min_value,
                self.vocab_size,
                starts,
                lens,
                estarts,
                rows,
                ids,
                weights,
                nent,
            )
            if status:
                raise CacheFormatError(f"{sh.path}: {_decode.STATUS[status]}; the shard is corrupt")
        return SparseRows(ids, weights, nent)


def open_cache(path, *, verify_reads: bool = True, local_cache_dir=None,
               local_cache_bytes: int | None = None) -> SparseKDCache:  # fmt: skip
    """Open the cache at ``path``: a directory, or an ``s3://``/``msc://`` URL (which
    holds ``manifest.json``).

    Args:
        path: the cache directory or URL.
        verify_reads: check each chunk's CRC the first time a read touches it (chunks
            fetched from object storage are always checked).
        local_cache_dir, local_cache_bytes: where chunks fetched from object storage are
            kept and how many bytes at most (see :mod:`megatron_slkd.cache.remote`).

    Raises:
        CacheFormatError: a missing, truncated or corrupt manifest or shard.
        CacheCoverageError: shards leave documents uncovered or overlap.
        ObjectStoreError: (and its subclasses) a request to the object store failed.
        ConfigError: a URL of a scheme other than ``s3://`` and ``msc://``.
    """
    return SparseKDCache(path, verify_reads=verify_reads, local_cache_dir=local_cache_dir,
                         local_cache_bytes=local_cache_bytes)  # fmt: skip
