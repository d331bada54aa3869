"""Streaming, resumable, atomic writer of one cache shard.

A shard covers the contiguous documents ``[doc_start, doc_end)`` of the
dataset. While it is being written, its data lives in ``<shard>.partial/``:
the per-token entry counts, the packed entries and the document lengths as
append-only files, plus ``progress.json``. :meth:`ShardWriter.commit` fsyncs
the three files and then atomically replaces ``progress.json``; a crash at any
moment therefore leaves a state that :meth:`ShardWriter.open` resumes from the
last committed document, truncating whatever was written after it.
:meth:`ShardWriter.finalize` assembles the final file under a temporary name,
fsyncs it and renames it into place, so a shard file that exists is complete.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np

from megatron_slkd.cache import _encode
from megatron_slkd.cache.format import (
    TOKEN_HASH_NAME,
    Encoding,
    ShardHeader,
    TokenHasher,
    ValueKind,
    chunk_count_range,
    counts_nbytes,
    crc32,
    pack_entries,
    section_offsets,
    token_crc32,
)
from megatron_slkd.cache.manifest import Manifest
from megatron_slkd.errors import CacheCapacityError, CacheFormatError, CacheMismatchError
from megatron_slkd.records import atomic_write_text, dump_record, fsync_dir, load_record

__all__ = [
    "ShardWriter",
    "write_shard_file",
    "write_sidecar",
    "check_finished_shard",
    "atomic_write_text",
    "fsync_dir",
    "differences",
]

DEFAULT_CHUNK_TOKENS = 4096
_PARTS = ("counts.bin", "entries.bin", "lengths.bin")


def differences(have: dict, want: dict, where: str = "", *,
                form: str = "{name}: {a!r} here, {b!r} asked") -> list[str]:  # fmt: skip
    """``form`` (by default ``"a.b: X here, Y asked"``) for every leaf that differs between
    two nested dicts, ``a`` from ``have`` and ``b`` from ``want``."""
    out = []
    for k in dict.fromkeys([*want, *have]):  # in the order of ``want``
        a, b = have.get(k), want.get(k)
        name = f"{where}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, name + ".", form=form)
        elif a != b:
            out.append(form.format(name=name, a=a, b=b))
    return out


def check_finished_shard(shard_path, base: Manifest) -> Manifest:
    """The sidecar of a finished shard, refused when it was written under settings other
    than ``base``'s (its compatibility key: sampling, teacher, dataset, tokenizer, encoding).

    Raises:
        CacheMismatchError: naming the sidecar and each setting that differs.
    """
    sidecar = Path(str(shard_path) + ".json")
    done = Manifest.load(sidecar)
    diff = differences(done.compatibility_key(), base.compatibility_key())
    if diff:
        raise CacheMismatchError(
            f"{sidecar}: a finished shard built with other parameters is here "
            f"({'; '.join(diff[:6])}); use another --output or remove it"
        )
    return done


def write_sidecar(shard_path, base: Manifest, record: dict) -> Path:
    """Write ``<shard>.json``: a one-shard manifest that ``merge-cache`` collects."""
    sidecar = Path(str(shard_path) + ".json")
    atomic_write_text(sidecar, dataclasses.replace(base, shards=[record]).to_json())
    return sidecar


_CHECK_BYTES = 1 << 26  # entry bytes written between calls of write_shard_file's ``check``


def write_shard_file(
    path,
    *,
    encoding: Encoding,
    vocab_size: int,
    chunk_tokens: int,
    doc_start: int,
    lengths: np.ndarray,
    counts: np.ndarray,
    entries,
    token_crc: int,
    token_xxh128: str | None,
    teacher_stats: dict | None = None,
    sidecar: Manifest | None = None,
    check=None,
) -> dict:
    """Write a complete shard file at ``path`` in one pass; return its manifest record.

    The file is written as ``<path>.tmp`` (index and counts first, the entries
    streamed once at their offsets, the header last), fsynced, its sidecar
    written when ``sidecar`` is given, then renamed to ``path``. Each entry byte
    is CRC-ed once, per chunk; the whole-file CRC is combined from the parts.

    Args:
        lengths: ``[num_docs]`` document lengths in tokens.
        counts: ``[num_tokens]`` entries per token.
        entries: the packed entry bytes in order, as any number of pieces
            (bytes-like or uint8 arrays), ``entry_bytes * counts.sum()`` in all.
        token_crc: CRC-32 of the shard's dataset tokens (see the format spec).
        token_xxh128: their XXH3-128 (:class:`~megatron_slkd.cache.format.TokenHasher`);
            None records none (a shard thinned from one of format version 1).
        teacher_stats: sums recorded with the shard (``build-cache``'s teacher figures).
        sidecar: a manifest without shards; ``<path>.json`` is written under it.
        check: called with the entry bytes written so far, after every 64 MiB and
            once before the rename (an owner's lease check, progress); an exception
            it raises abandons the file.

    Raises:
        CacheFormatError: the pieces hold another number of bytes than the counts need.
        CacheCapacityError: a count above the encoding's maximum.
    """
    path = Path(path)
    counts = np.ascontiguousarray(counts, dtype=np.uint8)
    lengths = np.asarray(lengths, dtype=np.int64)
    ntok, eb, bits, c = len(counts), encoding.entry_bytes, encoding.count_bits, chunk_tokens
    if int(lengths.sum()) != ntok:
        raise ValueError(f"{path}: document lengths sum to {int(lengths.sum())}, {ntok} counts")
    if ntok and int(counts.max()) > encoding.max_entries:
        raise CacheCapacityError(
            f"{path}: {int(counts.max())} entries at one position; the encoding holds at most "
            f"{encoding.max_entries}"
        )
    doc_offsets = np.zeros(len(lengths) + 1, dtype="<u8")
    np.cumsum(lengths, out=doc_offsets[1:])
    cum = np.zeros(ntok + 1, dtype=np.int64)
    np.cumsum(counts, out=cum[1:])
    num_chunks = -(-ntok // c)
    chunk_offsets = cum[np.minimum(np.arange(num_chunks + 1) * c, ntok)].astype("<u8")
    packed = _encode.pack_counts(counts, bits)
    assert len(packed) == counts_nbytes(ntok, bits)
    fields = dict(
        encoding=encoding,
        vocab_size=vocab_size,
        chunk_tokens=c,
        doc_start=doc_start,
        num_docs=len(lengths),
        num_tokens=ntok,
        num_entries=int(cum[-1]),
        num_chunks=num_chunks,
        token_crc=token_crc,
        token_xxh128=token_xxh128,
    )
    off = section_offsets(ShardHeader(**fields, index_crc=0))
    bounds = chunk_offsets.astype(np.int64) * eb  # entry byte range of each chunk
    entry_crcs = np.zeros(num_chunks, dtype=np.uint32)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.seek(off["counts"])
            f.write(memoryview(packed))
            # Stream the entries; a chunk's CRC runs over the pieces that fall in it.
            pos, chunk, run, since = 0, 0, 0, 0
            for piece in entries:
                if isinstance(piece, np.ndarray):
                    piece = np.ascontiguousarray(piece)
                view = memoryview(piece).cast("B")
                at, n = 0, len(view)
                if pos + n > bounds[-1]:
                    raise CacheFormatError(
                        f"{path}: more entry bytes than the counts of its {ntok} tokens need "
                        f"({bounds[-1]})"
                    )
                while at < n:
                    while pos == bounds[chunk + 1]:  # close finished (and empty) chunks
                        entry_crcs[chunk], run, chunk = run, 0, chunk + 1
                    take = min(n - at, int(bounds[chunk + 1]) - pos)
                    run = crc32(view[at : at + take], run)
                    at, pos = at + take, pos + take
                f.write(view)
                since += n
                if check is not None and since >= _CHECK_BYTES:
                    check(pos)
                    since = 0
            if pos != bounds[-1]:
                raise CacheFormatError(
                    f"{path}: {pos} entry bytes given, the counts of its {ntok} tokens need "
                    f"{int(bounds[-1])}"
                )
            while chunk < num_chunks:
                entry_crcs[chunk], run, chunk = run, 0, chunk + 1
            # Chunk i's CRC runs over its count bytes, then its entry bytes.
            entry_lens = np.diff(bounds)
            chunk_crcs = np.zeros(num_chunks, dtype="<u4")
            for i in range(num_chunks):
                a, b = chunk_count_range(i, i + 1, num_chunks, c, bits, len(packed))
                count_crc = crc32(packed[a:b])
                chunk_crcs[i] = _encode.crc32_combine(count_crc, int(entry_crcs[i]),
                                                      int(entry_lens[i]))  # fmt: skip
            index = doc_offsets.tobytes() + chunk_offsets.tobytes() + chunk_crcs.tobytes()
            header = ShardHeader(**fields, index_crc=crc32(index))
            head = header.pack() + index
            assert len(head) == off["counts"]
            f.seek(0)
            f.write(head)
            head_crc = crc32(packed, crc32(head))
            file_crc = _encode.crc32_fold(entry_crcs, entry_lens, head_crc)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(pos)
    except BaseException:
        # Out of space, interrupted or refused: drop the half-written file.
        tmp.unlink(missing_ok=True)
        raise
    size = tmp.stat().st_size
    if size != off["end"]:
        tmp.unlink(missing_ok=True)
        raise CacheFormatError(f"{tmp}: wrote {size} bytes, expected {off['end']}")
    record = dict(
        file=path.name,
        doc_start=doc_start,
        doc_end=doc_start + len(lengths),
        num_tokens=ntok,
        num_entries=int(cum[-1]),
        size_bytes=size,
        token_crc32=token_crc,
        index_crc32=header.index_crc,
        file_crc32=file_crc,
    )
    if token_xxh128 is not None:
        record[TOKEN_HASH_NAME] = token_xxh128
    if teacher_stats:
        record["teacher_stats"] = teacher_stats
    if sidecar is not None:
        write_sidecar(path, sidecar, record)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return record


class ShardWriter:
    """Writes the documents of one shard in order; see the module docstring.

    Use :meth:`open`, which starts a new shard or resumes an unfinished one.
    """

    def __init__(self, path, state: dict, files, hasher: TokenHasher | None = None):
        self.path = Path(path)
        self._state = state
        self._files = files
        self.encoding = Encoding.from_json(state["encoding"])
        # The tokens' identity as they are added; a resumed writer has not seen the
        # committed documents' tokens, so it takes the identity given to open().
        self._hasher = hasher

    # -- construction -----------------------------------------------------
    @classmethod
    def open(
        cls,
        path,
        *,
        encoding: Encoding,
        vocab_size: int,
        doc_start: int,
        doc_end: int,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        key: dict | None = None,
        content: dict | None = None,
    ) -> ShardWriter:
        """Start writing ``path`` or resume it from its last commit.

        Args:
            key: what else the shard's content depends on (the builder passes its
                manifest's compatibility key: dataset, tokenizer, teacher,
                sampling); an unfinished shard resumes only under an equal key.
            content: the identity of the dataset tokens of ``[doc_start, doc_end)``,
                ``{"token_crc32", "token_xxh128"}`` (:func:`~megatron_slkd.data.verify.
                token_identities`): an unfinished shard resumes only onto the same
                tokens, and a resumed shard records it (its committed documents' tokens
                are not seen again). Without it, a writer that resumes must be given the
                identity at :meth:`finalize`.

        Raises:
            CacheMismatchError: an unfinished shard at ``path`` was started
                with other parameters (the message lists each one that differs).
        """
        path = Path(path)
        if path.exists():
            raise CacheMismatchError(f"{path}: shard already finished; remove it to rebuild")
        if chunk_tokens < 8 or chunk_tokens % 8:
            raise ValueError(f"chunk_tokens must be a positive multiple of 8, got {chunk_tokens}")
        partial = path.with_name(path.name + ".partial")
        params = dict(
            encoding=encoding.to_json(),
            vocab_size=vocab_size,
            doc_start=doc_start,
            doc_end=doc_end,
            chunk_tokens=chunk_tokens,
            key=key,
        )
        if content is not None:
            params["content"] = content
        progress = partial / "progress.json"
        if progress.exists():
            state = load_record(progress, CacheFormatError)
            if state.get("params") != params:
                have = dict(state.get("params") or {})
                if content is not None and "content" not in have:
                    raise CacheMismatchError(
                        f"{partial}: an unfinished shard of documents {doc_start}..{doc_end - 1} "
                        "was started by a megatron-slkd that kept no identity of its tokens, so "
                        "this dataset cannot be shown to be the one it began on; remove it (or "
                        "use another --output) to start over"
                    )
                diff = differences(have.pop("key", None) or {}, key or {})
                diff += differences(have, {k: v for k, v in params.items() if k != "key"})
                diff = "; ".join(diff[:6])
                raise CacheMismatchError(
                    f"{partial}: an unfinished shard of documents {doc_start}..{doc_end - 1} was "
                    f"started with other settings ({diff}); rerun with the settings it was "
                    "started with, or remove it (or use another --output) to start over"
                )
            files = {}
            for name in _PARTS:
                f = open(partial / name, "r+b")
                f.truncate(state["sizes"][name])
                f.seek(0, os.SEEK_END)
                files[name] = f
            return cls(path, state, files)
        partial.mkdir(parents=True, exist_ok=True)
        files = {name: open(partial / name, "w+b") for name in _PARTS}
        state = dict(
            params=params,
            encoding=params["encoding"],
            docs=0,
            tokens=0,
            entries=0,
            token_crc=0,
            sizes={name: 0 for name in _PARTS},
        )
        writer = cls(path, state, files, TokenHasher())
        writer.commit()
        return writer

    @staticmethod
    def started_key(progress_path) -> dict | None:
        """The ``key`` an unfinished shard was started with (None if it kept none).

        Raises:
            CacheFormatError: the progress record is unreadable.
        """
        return ShardWriter.started_params(progress_path).get("key")

    @staticmethod
    def started_params(progress_path) -> dict:
        """What an unfinished shard was started with: ``key``, ``content`` (the identity
        of its tokens; absent when started by a version that kept none), the range.

        Raises:
            CacheFormatError: the progress record is unreadable.
        """
        params = load_record(progress_path, CacheFormatError).get("params")
        return params if isinstance(params, dict) else {}

    # -- properties -------------------------------------------------------
    @property
    def next_document(self) -> int:
        """Global index of the next document to add."""
        return self._state["params"]["doc_start"] + self._state["docs"]

    @property
    def doc_end(self) -> int:
        return self._state["params"]["doc_end"]

    @property
    def num_tokens(self) -> int:
        return self._state["tokens"]

    @property
    def num_entries(self) -> int:
        return self._state["entries"]

    # -- writing ----------------------------------------------------------
    def add_document(
        self,
        tokens: np.ndarray | int,
        ids: np.ndarray,
        weights: np.ndarray,
        num_valid: np.ndarray,
        counts: np.ndarray | None = None,
        stats: dict[str, float] | None = None,
    ) -> None:
        """Append the next document.

        Args:
            tokens: ``[L]`` the document's token ids (checksummed for alignment),
                or just L when the caller supplies the shard's token identity to
                :meth:`finalize` (as ``thin-cache`` does from the source shard).
            ids: ``[R, K]`` sparse target ids; row p is the distribution of the
                token at p + 1. R is L - 1, or L (the row after the last token
                is then dropped: D1 stores nothing there).
            weights: ``[R, K]`` weights (probabilities for LOGPROB encodings).
            num_valid: ``[R]`` valid entries per row.
            counts: ``[R, K]`` RS draw counts, required for COUNT encodings.
            stats: figures summed over the shard's documents and returned in its
                record as ``teacher_stats`` (the builder's teacher entropy and
                sample-KL floor); committed with the document, so a resumed shard
                reports the same totals.
        """
        if self.next_document >= self.doc_end:
            raise ValueError(f"{self.path}: all documents up to {self.doc_end} already written")
        if isinstance(tokens, (int, np.integer)):
            length, tokens = int(tokens), None
        else:
            tokens = np.asarray(tokens)
            length = tokens.shape[0]
        rows = max(length - 1, 0)
        ids, weights, num_valid = (np.asarray(a) for a in (ids, weights, num_valid))
        if ids.shape[0] not in (rows, length) or ids.shape != weights.shape:
            raise ValueError(
                f"document {self.next_document}: {length} tokens need {rows} or {length} "
                f"target rows, got ids {ids.shape} and weights {weights.shape}"
            )
        ids, weights, num_valid = ids[:rows], weights[:rows], num_valid[:rows]
        kmax = ids.shape[1] if ids.ndim == 2 else 0
        cap = min(kmax, self.encoding.max_entries)
        if rows and int(num_valid.max(initial=0)) > cap:
            raise CacheCapacityError(
                f"document {self.next_document}: {int(num_valid.max())} entries at one position; "
                f"the encoding holds at most {self.encoding.max_entries} (and K is {kmax})"
            )
        valid = np.arange(kmax)[None, :] < num_valid[:, None]
        flat_ids = ids[valid]
        if self.encoding.value_kind == ValueKind.COUNT:
            if counts is None:
                raise ValueError("a COUNT encoding needs the RS draw counts")
            values = np.asarray(counts)[:rows][valid].astype(np.int64)
            if values.size and (values.min() < 1 or values.max() > self.encoding.num_samples):
                raise CacheCapacityError(
                    f"document {self.next_document}: draw count outside [1, "
                    f"{self.encoding.num_samples}]"
                )
        else:
            w = np.clip(weights[valid].astype(np.float64), 1e-300, 1.0)
            codes = np.rint(-np.log(w) / self.encoding.value_scale)
            values = np.clip(codes, 0, 2**self.encoding.value_bits - 1).astype(np.int64)
        vocab = self._state["params"]["vocab_size"]
        if flat_ids.size and (flat_ids.min() < 0 or flat_ids.max() >= vocab):
            raise CacheCapacityError(
                f"document {self.next_document}: token id outside the vocabulary [0, {vocab})"
            )
        per_token = np.zeros(length, dtype=np.uint8)
        per_token[:rows] = num_valid
        packed = np.frombuffer(pack_entries(flat_ids, values, self.encoding), np.uint8)
        self._append_document(length, per_token, packed, int(flat_ids.size), tokens, stats)

    def _append_document(self, length, per_token, packed, num_entries, tokens, stats=None):
        """Append one document's parts and account for it (``tokens`` None: length only)."""
        self._append("counts.bin", memoryview(np.ascontiguousarray(per_token)).cast("B"))
        self._append("entries.bin", memoryview(np.ascontiguousarray(packed)).cast("B"))
        self._append("lengths.bin", np.array([length], dtype="<u8").tobytes())
        st = self._state
        st["docs"] += 1
        st["tokens"] += length
        st["entries"] += num_entries
        if stats:
            totals = st.setdefault("stats", {})
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        if tokens is None:
            st["token_crc"], self._hasher = None, None
        elif st["token_crc"] is not None:
            st["token_crc"] = token_crc32(tokens, st["token_crc"])
            if self._hasher is not None:
                self._hasher.update(tokens)

    def _append(self, name: str, data) -> None:
        self._files[name].write(data)
        self._state["sizes"][name] += len(data)

    def commit(self) -> None:
        """Make everything added so far durable; a resume starts after it."""
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
        partial = self.path.with_name(self.path.name + ".partial")
        atomic_write_text(partial / "progress.json", dump_record(self._state, indent=None))

    def finalize(self, token_crc32: int | None = None, token_xxh128: str | None = None, *,
                 sidecar: Manifest | None = None) -> dict:  # fmt: skip
        """Write the shard file atomically, remove the partial state, return its manifest record.

        Args:
            token_crc32, token_xxh128: the shard's token identity, required when documents
                were added by length only (``thin-cache`` copies its source shard's; an
                ``token_xxh128`` of None, from a source of format version 1, records none).
            sidecar: a manifest without shards: ``<shard>.json`` (this shard's record
                under it, what ``merge-cache`` collects) is written before the shard
                file takes its final name, so a finished shard always has its sidecar.

        Raises:
            ValueError: the identity is unknown (added by length, or resumed without
                ``content``), or the tokens added are not those ``content`` describes.
        """
        xxh = self._token_xxh128(token_crc32, token_xxh128)
        if self.next_document != self.doc_end:
            raise ValueError(
                f"{self.path}: finalize after {self._state['docs']} documents; documents "
                f"{self.next_document}..{self.doc_end - 1} are missing"
            )
        self.commit()
        st, p = self._state, self._state["params"]
        partial = self.path.with_name(self.path.name + ".partial")
        entries = (
            np.memmap(partial / "entries.bin", dtype=np.uint8, mode="r")
            if st["entries"]
            else np.zeros(0, np.uint8)
        )
        record = write_shard_file(
            self.path,
            encoding=self.encoding,
            vocab_size=p["vocab_size"],
            chunk_tokens=p["chunk_tokens"],
            doc_start=p["doc_start"],
            lengths=np.fromfile(partial / "lengths.bin", dtype="<u8"),
            counts=np.fromfile(partial / "counts.bin", dtype=np.uint8),
            entries=[entries],
            token_crc=st["token_crc"],
            token_xxh128=xxh,
            teacher_stats=st.get("stats"),
            sidecar=sidecar,
        )
        for fh in self._files.values():
            fh.close()
        del entries
        shutil.rmtree(partial)
        return record

    def _token_xxh128(self, token_crc32: int | None, token_xxh128: str | None) -> str | None:
        """The shard's 128-bit token identity (and its CRC-32 into the state), checked
        against what ``open`` was given."""
        st = self._state
        if token_crc32 is not None:  # the caller's, for documents added by length
            st["token_crc"] = token_crc32
            return token_xxh128
        if st["token_crc"] is None:
            raise ValueError(f"{self.path}: documents were added by length; pass token_crc32")
        content = st["params"].get("content")
        seen = None if self._hasher is None else self._hasher.xxh128()
        if content is None and seen is None:
            raise ValueError(f"{self.path}: resumed without the identity of its tokens; pass "
                             "content= to open()")  # fmt: skip
        if content is not None and (st["token_crc"] != content["token_crc32"]
                                    or seen not in (None, content["token_xxh128"])):  # fmt: skip
            raise ValueError(
                f"{self.path}: the tokens added are not those whose identity open() was given"
            )
        return seen if content is None else content["token_xxh128"]

    def close(self) -> None:
        """Close the partial files without finishing (the shard stays resumable)."""
        for f in self._files.values():
            f.close()
