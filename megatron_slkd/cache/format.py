"""Byte layout of a cache shard: header, index sections, entry packing.

The layout is specified in ``megatron_slkd/cache/README.md``; this module is
its single implementation. Everything is little-endian.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import zlib
from enum import IntEnum
from typing import TYPE_CHECKING

import numpy as np
import xxhash

try:  # the same CRC-32 as zlib's, vectorized (several times faster where wheels exist)
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # pragma: no cover - platforms without zlib-ng wheels
    from zlib import crc32 as _crc32

from megatron_slkd.errors import CacheCapacityError, CacheFormatError

if TYPE_CHECKING:  # the manifest module builds on this one
    from megatron_slkd.cache.manifest import Manifest

__all__ = [
    "MAGIC",
    "VERSION",
    "HEADER_SIZE",
    "ValueKind",
    "Encoding",
    "encoding_for",
    "ShardHeader",
    "section_offsets",
    "pack_entries",
    "pack_counts",
    "unpack_counts",
    "counts_nbytes",
    "chunk_crc",
    "chunk_count_range",
    "crc32",
    "file_crc32",
    "token_crc32",
    "TokenHasher",
    "TOKEN_HASH_NAME",
    "check_header",
    "check_index",
]

MAGIC = b"SLKDSHRD"
VERSION = 2
READ_VERSIONS = (1, 2)  # version 1: no 128-bit token hash (its bytes are zero)
HEADER_SIZE = 128
MAX_COUNT_BITS = 8  # the per-token entry count takes at most one byte
MAX_ENTRY_BYTES = 4
MAX_LOGPROB_BITS = 16
LOGPROB_RANGE = 24.0  # nats covered by quantized log-probabilities

# magic, version, header_size, value_kind, id_bits, value_bits, entry_bytes,
# num_samples, count_bits, vocab_size, chunk_tokens, doc_start, num_docs,
# num_tokens, num_entries, num_chunks, token_crc, index_crc, value_scale, token_xxh128
_HEADER = struct.Struct("<8sIIBBBBHHIIQQQQQIId16s")
_NO_HASH = bytes(16)
TOKEN_HASH_NAME = "token_xxh128"  # the manifest key of a shard's 128-bit token identity
_HEADER_CRC = struct.Struct("<I")


class ValueKind(IntEnum):
    """What the value bits of an entry hold."""

    COUNT = 0  # RS draw count c in [1, N]; weight c / N
    LOGPROB = 1  # code c; weight exp(-c * value_scale), value_scale = range / (2**bits - 1)


@dataclasses.dataclass(frozen=True)
class Encoding:
    """How one (id, value) entry is packed into ``entry_bytes`` bytes."""

    value_kind: ValueKind
    id_bits: int
    value_bits: int
    entry_bytes: int
    num_samples: int  # N for COUNT, 0 for LOGPROB
    value_scale: float  # LOGPROB step in nats, 0.0 for COUNT
    count_bits: int  # bits of the per-token entry count

    @property
    def max_entries(self) -> int:
        """Most entries one token position can hold."""
        return 2**self.count_bits - 1

    def weight_table(self) -> np.ndarray:
        """float32 weight of every value code (index = code)."""
        if self.value_kind == ValueKind.COUNT:
            return (np.arange(self.num_samples + 1, dtype=np.float64) / self.num_samples).astype(
                np.float32
            )
        codes = np.arange(2**self.value_bits, dtype=np.float64)
        return np.exp(-codes * self.value_scale).astype(np.float32)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["value_kind"] = self.value_kind.name.lower()
        return d

    @classmethod
    def from_json(cls, d: dict) -> Encoding:
        return cls(**{**d, "value_kind": ValueKind[str(d["value_kind"]).upper()]})


def _bits(n: int) -> int:
    return max(1, math.ceil(math.log2(n))) if n > 1 else 1


def encoding_for(
    method: str,
    vocab_size: int,
    *,
    num_samples: int = 0,
    k: int | None = None,
    temperature: float = 1.0,
    value_bits: int | None = None,
) -> Encoding:
    """The packing for a sampling method: fewest whole bytes (decision D4).

    RS at temperature 1 stores draw counts in ``ceil(log2(N + 1))`` bits
    (3 bytes per entry for V <= 2**17 and N <= 127). Top-K and RS at other
    temperatures store quantized log-weights in the bits left in the entry's
    whole bytes (at least 8, unless ``value_bits`` says otherwise). The
    per-token entry count takes just the bits its bound needs: N unique ids at
    most for RS (6 bits for N=50), k for Top-K.

    Raises:
        CacheCapacityError: the vocabulary and value bits need more than
            4 bytes per entry.
    """
    if vocab_size < 2:
        raise CacheCapacityError(f"vocab_size must be >= 2, got {vocab_size}")
    id_bits = _bits(vocab_size)
    if method == "rs" and temperature == 1.0:
        if not 1 <= num_samples <= 65535:
            raise CacheCapacityError(f"num_samples must be in [1, 65535], got {num_samples}")
        vbits = _bits(num_samples + 1)
        kind, n, scale = ValueKind.COUNT, num_samples, 0.0
        max_entries = num_samples
    elif method in ("rs", "topk"):
        max_entries = num_samples if method == "rs" else (k or 0)
        if max_entries < 1:
            raise CacheCapacityError(f"method {method!r} needs num_samples or k >= 1")
        if value_bits is None:
            vbits = 8 * math.ceil((id_bits + 8) / 8) - id_bits
        else:
            vbits = value_bits
        vbits = min(vbits, MAX_LOGPROB_BITS)
        kind, n, scale = ValueKind.LOGPROB, 0, LOGPROB_RANGE / (2**vbits - 1)
    else:
        raise ValueError(f"unknown method {method!r}; expected 'rs' or 'topk'")
    count_bits = _bits(max_entries + 1)
    if count_bits > MAX_COUNT_BITS:
        raise CacheCapacityError(
            f"up to {max_entries} entries per position need {count_bits} count bits; at most "
            f"{2**MAX_COUNT_BITS - 1} entries per position are supported"
        )
    entry_bytes = math.ceil((id_bits + vbits) / 8)
    if entry_bytes > MAX_ENTRY_BYTES:
        raise CacheCapacityError(
            f"a vocabulary of {vocab_size} ({id_bits} id bits) with {vbits} value bits needs "
            f"{entry_bytes} bytes per entry; at most {MAX_ENTRY_BYTES} are supported. "
            "Use fewer samples or value bits."
        )
    return Encoding(kind, id_bits, vbits, entry_bytes, n, scale, count_bits)


@dataclasses.dataclass(frozen=True)
class ShardHeader:
    """The fixed 128-byte header at the start of every shard file."""

    encoding: Encoding
    vocab_size: int
    chunk_tokens: int
    doc_start: int
    num_docs: int
    num_tokens: int
    num_entries: int
    num_chunks: int
    token_crc: int
    index_crc: int
    token_xxh128: str | None = None
    """32 hex digits (:class:`TokenHasher`); None where not recorded (version 1 shards,
    and shards thinned from them)."""

    def pack(self) -> bytes:
        e = self.encoding
        body = _HEADER.pack(
            MAGIC,
            VERSION,
            HEADER_SIZE,
            int(e.value_kind),
            e.id_bits,
            e.value_bits,
            e.entry_bytes,
            e.num_samples,
            e.count_bits,
            self.vocab_size,
            self.chunk_tokens,
            self.doc_start,
            self.num_docs,
            self.num_tokens,
            self.num_entries,
            self.num_chunks,
            self.token_crc,
            self.index_crc,
            e.value_scale,
            _NO_HASH if self.token_xxh128 is None else bytes.fromhex(self.token_xxh128),
        )
        body = body.ljust(HEADER_SIZE - _HEADER_CRC.size, b"\0")
        return body + _HEADER_CRC.pack(zlib.crc32(body))

    @classmethod
    def unpack(cls, raw: bytes, path: str) -> ShardHeader:
        """Parse and check a header; ``path`` names the file in errors."""
        if len(raw) < HEADER_SIZE:
            raise CacheFormatError(
                f"{path}: truncated header ({len(raw)} of {HEADER_SIZE} bytes); "
                "the shard is incomplete, rebuild it"
            )
        if raw[:8] != MAGIC:
            raise CacheFormatError(
                f"{path}: not a megatron-slkd shard (magic {raw[:8]!r}, expected {MAGIC!r})"
            )
        body = raw[: HEADER_SIZE - _HEADER_CRC.size]
        (stored,) = _HEADER_CRC.unpack_from(raw, HEADER_SIZE - _HEADER_CRC.size)
        f = _HEADER.unpack_from(raw)
        if f[1] not in READ_VERSIONS:
            raise CacheFormatError(
                f"{path}: shard format version {f[1]}, this reader knows versions "
                f"{', '.join(map(str, READ_VERSIONS))}; use a megatron-slkd release that "
                "matches the cache"
            )
        if zlib.crc32(body) != stored:
            raise CacheFormatError(f"{path}: header CRC mismatch; the shard header is corrupt")
        (
            _,
            _,
            hsize,
            kind,
            id_bits,
            vbits,
            ebytes,
            nsamp,
            cbits,
            vocab,
            chunk,
            doc_start,
            ndocs,
            ntok,
            nent,
            nchunk,
            tcrc,
            icrc,
            scale,
            txxh,
        ) = f
        try:
            enc = Encoding(ValueKind(kind), id_bits, vbits, ebytes, nsamp, scale, cbits)
        except ValueError as exc:
            raise CacheFormatError(f"{path}: unknown value kind {kind}") from exc
        bad = (
            hsize != HEADER_SIZE
            or not 1 <= ebytes <= MAX_ENTRY_BYTES
            or id_bits + vbits > 8 * ebytes
            or vocab > 2**id_bits
            or vocab < 2
            or chunk < 8
            or chunk % 8
            or not 1 <= cbits <= MAX_COUNT_BITS
            or nchunk != -(-ntok // chunk)
            or (enc.value_kind == ValueKind.COUNT and (nsamp < 1 or nsamp >= 2**vbits))
            or (enc.value_kind == ValueKind.LOGPROB and (vbits > MAX_LOGPROB_BITS or scale <= 0))
        )
        if bad:
            raise CacheFormatError(f"{path}: inconsistent header fields; the shard is corrupt")
        if f[1] == 1 and txxh != _NO_HASH:
            raise CacheFormatError(f"{path}: inconsistent header fields; the shard is corrupt")
        xxh = None if txxh == _NO_HASH else txxh.hex()
        return cls(enc, vocab, chunk, doc_start, ndocs, ntok, nent, nchunk, tcrc, icrc, xxh)


def section_offsets(h: ShardHeader) -> dict[str, int]:
    """Byte offsets of each section and the total file size."""
    doc = HEADER_SIZE
    chunk_off = doc + 8 * (h.num_docs + 1)
    chunk_crc = chunk_off + 8 * (h.num_chunks + 1)
    counts = chunk_crc + 4 * h.num_chunks
    entries = counts + counts_nbytes(h.num_tokens, h.encoding.count_bits)
    end = entries + h.num_entries * h.encoding.entry_bytes
    return dict(
        doc_offsets=doc,
        chunk_offsets=chunk_off,
        chunk_crcs=chunk_crc,
        counts=counts,
        entries=entries,
        end=end,
    )


def counts_nbytes(num_tokens: int, count_bits: int) -> int:
    """Bytes of the packed count section: the bits, rounded up, plus one zero byte
    so that a two-byte read at any count stays inside the section."""
    return (num_tokens * count_bits + 7) // 8 + 1


def pack_counts(counts: np.ndarray, count_bits: int) -> np.ndarray:
    """Pack per-token entry counts into ``count_bits`` each, little-endian bit order."""
    counts = np.asarray(counts, dtype=np.uint8)
    bits = (counts[:, None] >> np.arange(count_bits, dtype=np.uint8)) & 1
    packed = np.packbits(bits.ravel(), bitorder="little")
    return np.concatenate([packed, np.zeros(1, np.uint8)])


def unpack_counts(packed: np.ndarray, num_tokens: int, count_bits: int) -> np.ndarray:
    """Inverse of :func:`pack_counts`: ``[num_tokens]`` uint8."""
    bits = np.unpackbits(np.asarray(packed, np.uint8), bitorder="little")
    bits = bits[: num_tokens * count_bits].reshape(num_tokens, count_bits)
    return (bits << np.arange(count_bits, dtype=np.uint8)).sum(-1, dtype=np.uint8)


def pack_entries(ids: np.ndarray, values: np.ndarray, enc: Encoding) -> bytes:
    """Pack flat ``ids`` and integer ``values`` into ``entry_bytes`` each.

    Raises:
        CacheCapacityError: an id or value does not fit its bits.
    """
    ids = np.asarray(ids, dtype=np.int64)
    values = np.asarray(values, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 2**enc.id_bits):
        raise CacheCapacityError(
            f"token id {int(ids.max() if ids.max() >= 0 else ids.min())} does not fit "
            f"{enc.id_bits} id bits"
        )
    if values.size and (values.min() < 0 or values.max() >= 2**enc.value_bits):
        raise CacheCapacityError(
            f"value {int(values.max())} does not fit {enc.value_bits} value bits"
        )
    word = (ids | (values << enc.id_bits)).astype("<u4")
    return word.view(np.uint8).reshape(-1, 4)[:, : enc.entry_bytes].tobytes()


def chunk_count_range(c0: int, c1: int, num_chunks: int, chunk_tokens: int, count_bits: int,
                      section_bytes: int) -> tuple[int, int]:  # fmt: skip
    """Bytes of the counts section (``section_bytes`` long) holding chunks ``c0..c1 - 1``.

    Chunks hold a multiple of 8 tokens, so their counts start on a byte; the
    last chunk's count bytes run to the end of the section (its zero byte too).
    """
    per_chunk = chunk_tokens * count_bits // 8
    return c0 * per_chunk, section_bytes if c1 >= num_chunks else c1 * per_chunk


def chunk_crc(i, num_chunks, chunk_tokens, enc, counts, entries, chunk_offsets) -> int:
    """CRC-32 of chunk ``i``: its count bytes (:func:`chunk_count_range`), then its entry
    bytes."""
    c0, c1 = chunk_count_range(i, i + 1, num_chunks, chunk_tokens, enc.count_bits, len(counts))
    e0, e1 = int(chunk_offsets[i]) * enc.entry_bytes, int(chunk_offsets[i + 1]) * enc.entry_bytes
    return crc32(entries[e0:e1], crc32(counts[c0:c1]))


def crc32(data, value: int = 0) -> int:
    """zlib's CRC-32 of a bytes-like object (numpy arrays included); computed by
    zlib-ng where it is installed (same values)."""
    if not isinstance(data, (bytes, memoryview)):
        data = memoryview(np.ascontiguousarray(data)).cast("B")
    return _crc32(data, value)


def file_crc32(path, block: int = 1 << 24) -> int:
    """CRC-32 of a whole file, read in blocks."""
    value = 0
    with open(path, "rb") as f:
        while data := f.read(block):
            value = crc32(data, value)
    return value


def token_crc32(tokens: np.ndarray, value: int = 0) -> int:
    """CRC-32 of token ids as little-endian int32, whatever their stored dtype."""
    return crc32(np.asarray(tokens).astype("<i4", copy=False), value)


class TokenHasher:
    """The identity of a run of dataset tokens, fed in pieces: their CRC-32 (``crc32``,
    kept for caches of format version 1) and XXH3-128 (``xxh128()``, 32 hex digits), both
    of the token ids as little-endian int32, whatever their stored dtype.

    XXH3-128 decides every content match (format version 2): at 128 bits, a chance match
    between the documents of a trillion-token corpus is out of reach (about n^2 / 2^129
    pairs), where CRC-32's 32 bits give one per 2^16 documents of one length.
    """

    def __init__(self) -> None:
        self.crc32 = 0
        self._xxh = xxhash.xxh3_128()

    def update(self, tokens: np.ndarray) -> None:
        data = np.ascontiguousarray(np.asarray(tokens).astype("<i4", copy=False))
        self.crc32 = crc32(data, self.crc32)
        self._xxh.update(memoryview(data).cast("B"))

    def xxh128(self) -> str:
        return self._xxh.hexdigest()


def check_header(path, raw: bytes, size: int, record: dict, manifest: Manifest) -> ShardHeader:
    """A shard's header, checked against its size and its manifest record.

    Raises:
        CacheFormatError: naming ``path`` and the shard's documents.
    """
    docs = f"documents {record['doc_start']}..{record['doc_end'] - 1}"
    h = ShardHeader.unpack(raw, str(path))
    end = section_offsets(h)["end"]
    if size != end or size != record["size_bytes"]:
        raise CacheFormatError(
            f"{path} ({docs}): {size} bytes on disk, header implies {end} and the "
            f"manifest {record['size_bytes']}; the shard is truncated or was replaced"
        )
    expect = dict(
        doc_start=record["doc_start"],
        num_docs=record["doc_end"] - record["doc_start"],
        num_tokens=record["num_tokens"],
        num_entries=record["num_entries"],
        index_crc=record["index_crc32"],
        token_crc=record["token_crc32"],
        token_xxh128=record.get(TOKEN_HASH_NAME),
        encoding=manifest.encoding,
        vocab_size=manifest.tokenizer["vocab_size"],
    )
    for key, want in expect.items():
        if getattr(h, key) != want:
            raise CacheFormatError(
                f"{path}: header {key}={getattr(h, key)} but the manifest says {want}; "
                "the shard does not belong to this manifest"
            )
    return h


def check_index(path, h: ShardHeader, index: np.ndarray, record: dict):
    """(document offsets, chunk entry offsets, chunk CRCs) from a shard's index bytes,
    checked: CRC, ends, monotonicity.

    Raises:
        CacheFormatError: naming ``path`` and the shard's documents.
    """
    docs = f"documents {record['doc_start']}..{record['doc_end'] - 1}"
    if crc32(index) != h.index_crc:
        raise CacheFormatError(f"{path} ({docs}): index CRC mismatch; the shard is corrupt")
    n_doc, n_chunk = 8 * (h.num_docs + 1), 8 * (h.num_chunks + 1)
    doc_offsets = index[:n_doc].view("<u8")
    chunk_offsets = index[n_doc : n_doc + n_chunk].view("<u8")
    chunk_crcs = index[n_doc + n_chunk : n_doc + n_chunk + 4 * h.num_chunks].view("<u4")
    ok = (
        doc_offsets[0] == 0
        and int(doc_offsets[-1]) == h.num_tokens
        and chunk_offsets[0] == 0
        and int(chunk_offsets[-1]) == h.num_entries
        and bool(np.all(np.diff(doc_offsets.astype(np.int64)) >= 0))
        and bool(np.all(np.diff(chunk_offsets.astype(np.int64)) >= 0))
    )
    if not ok:
        raise CacheFormatError(f"{path} ({docs}): inconsistent index; the shard is corrupt")
    return doc_offsets, chunk_offsets, chunk_crcs
