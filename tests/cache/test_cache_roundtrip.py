"""Tier 1: format round trips, packing limits and reads."""

import numpy as np
import pytest
from helpers import write_synthetic_cache
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_slkd.cache import ShardWriter, encoding_for, open_cache
from megatron_slkd.cache.format import (
    ShardHeader,
    ValueKind,
    counts_nbytes,
    pack_counts,
    pack_entries,
    unpack_counts,
)
from megatron_slkd.errors import CacheCapacityError


def _check_doc(cache, reader, d):
    ids, w, n = cache.expected_rows(d)
    r = reader.read(d, 0, len(cache.docs[d]))
    assert np.array_equal(r.num_entries, n)
    k = r.ids.shape[1]
    assert k == (int(n.max()) if n.size else 0)
    valid = np.arange(k)[None, :] < n[:, None]
    assert np.array_equal(np.where(valid, r.ids, 0), np.where(valid, ids[:, :k], 0))
    assert np.all(r.ids[~valid] == 0) and np.all(r.weights[~valid] == 0)
    return r, w[:, :k], valid


def test_rs_round_trip_is_exact(synthetic_cache):
    reader = open_cache(synthetic_cache.path)
    assert reader.num_documents == 8
    assert reader.num_tokens == sum(len(d) for d in synthetic_cache.docs)
    assert np.array_equal(reader.document_lengths(), [len(d) for d in synthetic_cache.docs])
    for d in range(8):
        r, w, valid = _check_doc(synthetic_cache, reader, d)
        assert np.array_equal(r.weights[valid], w[valid])  # count / N is exact


def test_topk_round_trip_within_quantization(tmp_path):
    cache = write_synthetic_cache(tmp_path / "c", [30, 7, 64], method="topk", k=8)
    assert cache.manifest.encoding.value_kind == ValueKind.LOGPROB
    reader = open_cache(cache.path)
    step = cache.manifest.encoding.value_scale
    for d in range(3):
        r, w, valid = _check_doc(cache, reader, d)
        rel = np.abs(np.log(r.weights[valid]) - np.log(w[valid]))
        assert rel.max() <= step / 2 + 1e-5


def test_spans_and_token_ranges(synthetic_cache):
    reader = open_cache(synthetic_cache.path)
    lengths = [len(d) for d in synthetic_cache.docs]
    starts = np.concatenate([[0], np.cumsum(lengths)])
    full = reader.read_tokens(0, reader.num_tokens)
    # A span read equals the same rows of the full read, padding aside.
    r = reader.read_spans([5, 2, 5], [10, 3, 0], [20, 30, 4])
    rows = np.r_[
        starts[5] + 10 : starts[5] + 30, starts[2] + 3 : starts[2] + 33, starts[5] : starts[5] + 4
    ]
    k = r.ids.shape[1]
    assert np.array_equal(r.num_entries, full.num_entries[rows])
    assert np.array_equal(r.ids, full.ids[rows, :k]) and np.all(full.ids[rows, k:] == 0)
    assert np.array_equal(r.weights, full.weights[rows, :k])
    # Token ranges that cross shard and document boundaries.
    for a, n in [(0, 1), (starts[3] - 2, 50), (starts[-1] - 7, 7), (3, 0)]:
        t = reader.read_tokens(int(a), n)
        assert np.array_equal(t.num_entries, full.num_entries[a : a + n])


def test_out_of_range_reads(synthetic_cache):
    reader = open_cache(synthetic_cache.path)
    with pytest.raises(IndexError, match="document 8"):
        reader.read(8, 0, 1)
    with pytest.raises(IndexError, match="outside document 1"):
        reader.read(1, 0, 2)
    with pytest.raises(IndexError, match="tokens"):
        reader.read_tokens(reader.num_tokens - 1, 2)


@settings(max_examples=30, deadline=None)
@given(
    vocab=st.sampled_from([2, 3, 255, 256, 257, 49152, 65536, 131072]),
    num_samples=st.sampled_from([1, 2, 50, 127]),
    data=st.data(),
)
def test_packing_round_trip(vocab, num_samples, data):
    enc = encoding_for("rs", vocab, num_samples=num_samples)
    assert enc.id_bits + enc.value_bits <= 8 * enc.entry_bytes
    n = data.draw(st.integers(0, 50))
    ids = np.array(data.draw(st.lists(st.integers(0, vocab - 1), min_size=n, max_size=n)), np.int64)
    vals = np.array(
        data.draw(st.lists(st.integers(1, num_samples), min_size=n, max_size=n)), np.int64
    )
    raw = np.frombuffer(pack_entries(ids, vals, enc), np.uint8).reshape(n, enc.entry_bytes)
    word = np.zeros(n, np.int64)
    for j in range(enc.entry_bytes):
        word |= raw[:, j].astype(np.int64) << (8 * j)
    assert np.array_equal(word & ((1 << enc.id_bits) - 1), ids)
    assert np.array_equal(word >> enc.id_bits, vals)


def test_paper_packing_is_three_bytes():
    assert encoding_for("rs", 131072, num_samples=127).entry_bytes == 3
    assert encoding_for("rs", 49152, num_samples=50).entry_bytes == 3
    assert encoding_for("topk", 49152, k=12).entry_bytes == 3


def test_capacity_errors():
    with pytest.raises(CacheCapacityError, match="bytes per entry"):
        encoding_for("rs", 2**30, num_samples=50)
    enc = encoding_for("rs", 1000, num_samples=50)
    with pytest.raises(CacheCapacityError, match="id"):
        pack_entries(np.array([1024]), np.array([1]), enc)
    with pytest.raises(CacheCapacityError, match="value"):
        pack_entries(np.array([1]), np.array([64]), enc)


def test_writer_rejects_values_that_do_not_fit(tmp_path):
    enc = encoding_for("rs", 100, num_samples=10)
    w = ShardWriter.open(tmp_path / "s", encoding=enc, vocab_size=100, doc_start=0, doc_end=1)
    tokens = np.arange(3)
    ids = np.array([[5], [7], [0]])
    with pytest.raises(CacheCapacityError, match="vocabulary"):
        w.add_document(tokens, ids + 100, np.ones((3, 1)), np.array([1, 1, 0]), np.ones((3, 1)))
    with pytest.raises(CacheCapacityError, match="draw count"):
        w.add_document(tokens, ids, np.ones((3, 1)), np.array([1, 1, 0]), np.full((3, 1), 11))
    with pytest.raises(ValueError, match="target rows"):
        w.add_document(tokens, ids[:1], np.ones((1, 1)), np.array([1]), np.ones((1, 1)))


def test_header_round_trip():
    enc = encoding_for("topk", 49152, k=12)
    h = ShardHeader(enc, 49152, 4096, 10, 20, 3000, 36000, 1, 7, 9)
    assert ShardHeader.unpack(h.pack(), "x") == h


def test_empty_and_single_token_documents(tmp_path):
    cache = write_synthetic_cache(tmp_path / "c", [1, 1, 2, 1], num_shards=1)
    reader = open_cache(cache.path)
    r = reader.read_tokens(0, 5)
    assert r.num_entries.tolist()[:2] == [0, 0] and r.num_entries[3] == 0
    assert r.num_entries[2] > 0


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_count_packing_round_trip(bits, data):
    counts = np.array(data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=300)), np.uint8)
    packed = pack_counts(counts, bits)
    assert len(packed) == counts_nbytes(len(counts), bits)
    assert np.array_equal(unpack_counts(packed, len(counts), bits), counts)


def test_rs_counts_take_only_the_bits_they_need():
    assert encoding_for("rs", 49152, num_samples=50).count_bits == 6
    assert encoding_for("topk", 49152, k=12).count_bits == 4
    with pytest.raises(CacheCapacityError, match="entries per position"):
        encoding_for("topk", 1000, k=300)


def test_shard_bytes_follow_the_spec(synthetic_cache):
    """Read a shard at the offsets the format README documents, without the library."""
    import struct
    import zlib

    rec = synthetic_cache.manifest.shards[0]
    raw = (synthetic_cache.path / rec["file"]).read_bytes()
    assert raw[:8] == b"SLKDSHRD" and struct.unpack_from("<II", raw, 8) == (2, 128)
    kind, id_bits, value_bits, entry_bytes = raw[16:20]
    num_samples, count_bits, vocab, chunk = struct.unpack_from("<HHII", raw, 20)
    doc_start, ndocs, ntok, nent, nchunks = struct.unpack_from("<5Q", raw, 32)
    assert (kind, num_samples, vocab, doc_start) == (0, 50, 300, 0)
    assert (ndocs, ntok, nent) == (rec["doc_end"], rec["num_tokens"], rec["num_entries"])
    assert struct.unpack_from("<I", raw, 124)[0] == zlib.crc32(raw[:124])
    # The token identity: CRC-32 at 72 and XXH3-128 (canonical bytes) at 88, of the
    # shard's tokens as little-endian int32.
    import xxhash

    tokens = np.concatenate(synthetic_cache.docs[rec["doc_start"] : rec["doc_end"]]).astype("<i4")
    assert struct.unpack_from("<I", raw, 72)[0] == zlib.crc32(tokens.tobytes())
    assert raw[88:104] == xxhash.xxh3_128_digest(tokens.tobytes())
    assert raw[88:104].hex() == rec["token_xxh128"] and raw[104:124] == bytes(20)
    off = 128
    doc_off = np.frombuffer(raw, "<u8", ndocs + 1, off)
    off += 8 * (ndocs + 1)
    chunk_off = np.frombuffer(raw, "<u8", nchunks + 1, off)
    off += 8 * (nchunks + 1) + 4 * nchunks
    counts_len = (ntok * count_bits + 7) // 8 + 1
    bits = np.unpackbits(np.frombuffer(raw, np.uint8, counts_len, off), bitorder="little")
    counts = (bits[: ntok * count_bits].reshape(ntok, count_bits) << np.arange(count_bits)).sum(-1)
    off += counts_len
    assert len(raw) == off + nent * entry_bytes
    assert chunk_off[-1] == counts.sum() == nent
    # Document 2's row 5: its entries, decoded by hand, are the sampler's draws.
    t = int(doc_off[2]) + 5
    e = int(chunk_off[t // chunk]) + int(counts[(t // chunk) * chunk : t].sum())
    ids, w, n = synthetic_cache.expected_rows(2)
    for j in range(int(counts[t])):
        b = raw[off + (e + j) * entry_bytes : off + (e + j + 1) * entry_bytes]
        word = int.from_bytes(b, "little")
        assert word & ((1 << id_bits) - 1) == ids[5, j]
        assert (word >> id_bits) / 50 == w[5, j]
    assert value_bits == 6 and int(counts[t]) == n[5]
