"""numba kernels that decode packed entries into padded ``[L, K]`` rows.

Spans are given in shard-local token coordinates. The kernels never trust the
bytes: an entry run past the end of the entry section, an id outside the
vocabulary or a value outside the weight table returns a non-zero status,
which the reader turns into a :class:`~megatron_slkd.errors.CacheFormatError`.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["span_entry_starts", "decode_spans", "unpack_count_range", "STATUS"]

STATUS = {
    1: "an entry run goes past the end of the entry section",
    2: "an entry holds an id outside the vocabulary",
    3: "an entry holds a value outside the encoding's range",
    4: "a per-token entry count disagrees with the chunk table",
}


@numba.njit(inline="always")
def _count(packed, t, bits):
    """Entry count of token ``t`` from the little-endian bit-packed count section."""
    pos = t * bits
    b = pos >> 3
    word = np.int64(packed[b]) | (np.int64(packed[b + 1]) << 8)
    return (word >> (pos & 7)) & ((1 << bits) - 1)


@numba.njit(cache=True, nogil=True)
def span_entry_starts(counts, bits, chunk_offsets, chunk_tokens, starts, lengths, out):
    """First entry index of each span, written to ``out``; returns max entries per token.

    Returns -4 when a chunk's recorded entry offset cannot hold its counts.
    """
    kmax = 0
    for s in range(starts.size):
        t = starts[s]
        c = t // chunk_tokens
        e = np.int64(chunk_offsets[c])
        for i in range(c * chunk_tokens, t):
            e += _count(counts, i, bits)
        if e > np.int64(chunk_offsets[c + 1]):
            return -4
        out[s] = e
        for i in range(t, t + lengths[s]):
            kmax = max(kmax, _count(counts, i, bits))
    return kmax


@numba.njit(cache=True, nogil=True)
def decode_spans(
    counts,
    bits,
    entries,
    entry_bytes,
    id_bits,
    table,
    min_value,
    vocab_size,
    starts,
    lengths,
    entry_starts,
    row_starts,
    ids_out,
    w_out,
    n_out,
):
    """Decode each span into rows ``row_starts[s] ...`` of the outputs.

    ``ids_out`` and ``w_out`` must be zero-filled: padding stays 0.
    """
    id_mask = (np.int64(1) << id_bits) - 1
    total = entries.size // entry_bytes
    for s in range(starts.size):
        e = entry_starts[s]
        row = row_starts[s]
        for t in range(starts[s], starts[s] + lengths[s]):
            n = _count(counts, t, bits)
            if e + n > total:
                return 1
            n_out[row] = n
            for k in range(n):
                b = (e + k) * entry_bytes
                word = np.int64(0)
                for j in range(entry_bytes):
                    word |= np.int64(entries[b + j]) << (8 * j)
                idv = word & id_mask
                val = word >> id_bits
                if idv >= vocab_size:
                    return 2
                if val < min_value or val >= table.size:
                    return 3
                ids_out[row, k] = idv
                w_out[row, k] = table[val]
            e += n
            row += 1
    return 0


@numba.njit(cache=True, nogil=True)
def unpack_count_range(counts, bits, start, out):
    """Entry counts of shard-local tokens ``start .. start + out.size - 1`` into ``out``."""
    for i in range(out.size):
        out[i] = _count(counts, start + i, bits)
