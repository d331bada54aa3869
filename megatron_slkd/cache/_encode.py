"""numba kernels for writing shards: bit-packing counts and combining CRC-32s.

A shard file is written in one pass over its entries (``writer.write_shard_file``):
each entry byte is CRC-ed once, per chunk, and the whole-file CRC the
manifest records is combined from those chunk CRCs instead of read again.
``crc32_combine`` is zlib's ``crc32_combine`` (the CRC of ``A + B`` from the
CRCs of ``A`` and ``B`` and the length of ``B``): multiplying ``crc(A)`` by
``x^(8 len(B))`` modulo the CRC polynomial, in the reflected bit order zlib uses.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["crc32_combine", "crc32_fold", "pack_counts"]

_POLY = np.uint32(0xEDB88320)  # zlib's CRC-32 polynomial, reflected


@numba.njit(cache=True, nogil=True)
def _multmodp(a, b):
    """a * b modulo the CRC polynomial (reflected: bit 31 is x^0)."""
    m = np.uint32(1 << 31)
    p = np.uint32(0)
    while m:
        if a & m:
            p ^= b
        b = (b >> np.uint32(1)) ^ _POLY if b & np.uint32(1) else b >> np.uint32(1)
        m >>= np.uint32(1)
    return p


@numba.njit(cache=True, nogil=True)
def _x2n_table():
    """x^(2^k) modulo the polynomial for k = 0..31."""
    table = np.empty(32, np.uint32)
    p = np.uint32(1 << 30)  # x^1
    table[0] = p
    for k in range(1, 32):
        p = _multmodp(p, p)
        table[k] = p
    return table


_X2N = _x2n_table()


@numba.njit(cache=True, nogil=True)
def _combine(crc1, crc2, len2, table):
    n = np.int64(len2) * 8  # the shift in bits
    p = np.uint32(1 << 31)  # x^0
    k = 0
    while n:
        if n & 1:
            p = _multmodp(table[k & 31], p)
        n >>= 1
        k += 1
    return _multmodp(p, np.uint32(crc1)) ^ np.uint32(crc2)


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of ``A + B`` given ``crc1 = crc32(A)``, ``crc2 = crc32(B)``, ``len2 = len(B)``."""
    return int(_combine(np.uint32(crc1), np.uint32(crc2), np.int64(len2), _X2N))


@numba.njit(cache=True, nogil=True)
def _fold(first, crcs, lengths, table):
    c = np.uint32(first)
    for i in range(crcs.size):
        c = _combine(c, crcs[i], lengths[i], table)
    return c


def crc32_fold(crcs: np.ndarray, lengths: np.ndarray, first: int = 0) -> int:
    """CRC-32 of pieces ``P0 + P1 + ...`` (after bytes whose CRC is ``first``) from the
    pieces' CRCs ``crcs[i] = crc32(Pi)`` and byte lengths."""
    return int(
        _fold(
            np.uint32(first),
            np.ascontiguousarray(crcs, dtype=np.uint32),
            np.ascontiguousarray(lengths, dtype=np.int64),
            _X2N,
        )
    )


@numba.njit(cache=True, nogil=True)
def _pack(counts, bits, out):
    acc = np.uint32(0)
    have = 0
    o = 0
    for t in range(counts.size):
        acc |= np.uint32(counts[t]) << np.uint32(have)
        have += bits
        while have >= 8:
            out[o] = acc & np.uint32(0xFF)
            o += 1
            acc >>= np.uint32(8)
            have -= 8
    if have:
        out[o] = acc & np.uint32(0xFF)


def pack_counts(counts: np.ndarray, count_bits: int) -> np.ndarray:
    """``format.pack_counts`` (the spec's little-endian bit order, one zero byte after),
    in one pass instead of through an array of bits."""
    counts = np.ascontiguousarray(counts, dtype=np.uint8)
    out = np.zeros((counts.size * count_bits + 7) // 8 + 1, np.uint8)
    _pack(counts, count_bits, out)
    return out
