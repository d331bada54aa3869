"""Tier 1: the one-pass shard file writer and its CRC arithmetic, against zlib and the spec."""

import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_slkd.cache import _encode, encoding_for
from megatron_slkd.cache.format import crc32, pack_counts
from megatron_slkd.cache.manifest import Manifest
from megatron_slkd.cache.reader import ShardFile
from megatron_slkd.cache.writer import write_shard_file
from megatron_slkd.errors import CacheFormatError

_bytes = st.binary(max_size=2000)


@settings(max_examples=60, deadline=None)
@given(a=_bytes, b=_bytes, c=_bytes)
def test_crc_combine_and_fold_equal_zlib_on_the_concatenation(a, b, c):
    assert crc32(a + b) == zlib.crc32(a + b)
    assert _encode.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    crcs, lengths = [zlib.crc32(b), zlib.crc32(c)], [len(b), len(c)]
    assert _encode.crc32_fold(crcs, lengths, zlib.crc32(a)) == zlib.crc32(a + b + c)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_fast_count_packing_equals_the_spec_packing(bits, data):
    counts = np.array(data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=300)), np.uint8)
    assert np.array_equal(_encode.pack_counts(counts, bits), pack_counts(counts, bits))


def _shard(rng, num_docs=7, chunk_tokens=16):
    enc = encoding_for("rs", 1000, num_samples=50)
    lengths = rng.integers(0, 40, num_docs)
    counts = rng.integers(0, 5, int(lengths.sum())).astype(np.uint8)
    counts[16:40] = 0  # whole chunks without entries
    ends = np.cumsum(lengths)
    counts[ends[lengths > 0] - 1] = 0  # a document's last position has none
    entries = rng.integers(0, 256, int(counts.sum()) * enc.entry_bytes).astype(np.uint8)
    kw = dict(encoding=enc, vocab_size=1000, chunk_tokens=chunk_tokens, doc_start=3,
              lengths=lengths, counts=counts, token_crc=1234,
              token_xxh128="00112233445566778899aabbccddeeff")  # fmt: skip
    return kw, entries


@pytest.mark.parametrize("seed", range(5))
def test_any_split_of_the_entries_writes_the_same_file_and_its_crcs(tmp_path, seed):
    rng = np.random.default_rng(seed)
    kw, entries = _shard(rng)
    whole = write_shard_file(tmp_path / "whole.slkd", entries=[entries], **kw)
    cuts = np.sort(rng.integers(0, entries.size + 1, 12))
    pieces = [entries[a:b] for a, b in zip([0, *cuts], [*cuts, entries.size], strict=True)]
    pieces.insert(3, entries[:0])
    split = write_shard_file(tmp_path / "split.slkd", entries=[bytes(p) for p in pieces], **kw)
    data = (tmp_path / "whole.slkd").read_bytes()
    assert data == (tmp_path / "split.slkd").read_bytes()
    assert {k: v for k, v in whole.items() if k != "file"} == {
        k: v for k, v in split.items() if k != "file"
    }
    assert whole["file_crc32"] == zlib.crc32(data) and whole["size_bytes"] == len(data)
    m = Manifest(dataset={}, tokenizer=dict(vocab_size=1000), teacher={}, sampling={},
                 encoding=kw["encoding"], shards=[whole])  # fmt: skip
    shard = ShardFile(tmp_path, whole, m)
    assert shard.header.token_crc == 1234 and shard.header.doc_start == 3
    assert shard.header.token_xxh128 == whole["token_xxh128"] == kw["token_xxh128"]
    bits, c, eb = kw["encoding"].count_bits, kw["chunk_tokens"], kw["encoding"].entry_bytes
    n = shard.header.num_chunks
    assert n == -(-len(kw["counts"]) // c) and n > 2
    for i in range(n):  # the spec's chunk CRC, by zlib
        counts = shard.counts[i * c * bits // 8 : (i + 1) * c * bits // 8 if i + 1 < n else None]
        e0, e1 = (int(x) * eb for x in shard.chunk_offsets[i : i + 2])
        assert shard.chunk_crcs[i] == zlib.crc32(shard.entries[e0:e1], zlib.crc32(counts))
    assert not list(tmp_path.glob("*.tmp"))


def test_a_wrong_entry_byte_count_or_a_failed_check_leaves_no_file(tmp_path):
    kw, entries = _shard(np.random.default_rng(0))
    for bad in ([entries[:-1]], [entries, entries[:1]]):
        with pytest.raises(CacheFormatError, match="entry bytes"):
            write_shard_file(tmp_path / "s.slkd", entries=bad, **kw)
    assert not list(tmp_path.iterdir())

    def refuse(written):
        raise RuntimeError("lost ownership")

    with pytest.raises(RuntimeError, match="lost ownership"):
        write_shard_file(tmp_path / "s.slkd", entries=[entries], check=refuse, **kw)
    assert not list(tmp_path.iterdir())
