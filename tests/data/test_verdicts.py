"""A (dataset, cache) pair shown aligned once is not read again; the first check is split
over the ranks there are."""

import os
import threading

import numpy as np
import pytest
from helpers import write_dataset, write_synthetic_cache

from megatron_slkd.cache import open_cache
from megatron_slkd.data import verify as verify_mod
from megatron_slkd.data.verify import check_content, check_contents, verify_cache

LENGTHS = [5, 1, 40, 17, 3, 90, 2, 33, 12, 60, 7, 21]


@pytest.fixture(autouse=True)
def _own_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SLKD_CACHE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(verify_mod, "_VERIFIED", set())


def _settle(prefix):
    for ext in (".bin", ".idx"):
        st = os.stat(prefix + ext)
        os.utime(prefix + ext, ns=(st.st_atime_ns, st.st_mtime_ns - 10**10))


def _pair(tmp_path, name="d", shards=3):
    cache = write_synthetic_cache(tmp_path / f"{name}-cache", LENGTHS, num_shards=shards)
    prefix = write_dataset(tmp_path / name, cache.docs)
    return prefix, cache


def _reads(monkeypatch):
    """The document ranges whose tokens are read, from here on."""
    read = []
    real = verify_mod.token_identities

    def spy(ds, ranges, **kw):
        ranges = list(ranges)
        read.extend(ranges)
        return real(ds, ranges, **kw)

    monkeypatch.setattr(verify_mod, "token_identities", spy)
    return read


def test_a_verdict_spares_the_next_check_and_a_write_ends_it(tmp_path, monkeypatch):
    from megatron_slkd.data.indexed import open_dataset

    prefix, made = _pair(tmp_path)
    cache = open_cache(made.path)
    read = _reads(monkeypatch)
    assert check_content(cache, prefix, open_dataset(prefix)) == []
    assert len(read) == 3
    monkeypatch.setattr(verify_mod, "_VERIFIED", set())  # another process
    assert check_content(cache, prefix, open_dataset(prefix)) == []
    assert len(read) == 6  # too fresh to be recorded: read again
    _settle(prefix)
    assert check_content(cache, prefix, open_dataset(prefix)) == [] and len(read) == 9
    monkeypatch.setattr(verify_mod, "_VERIFIED", set())
    assert check_content(cache, prefix, open_dataset(prefix)) == [] and len(read) == 9
    # Rewritten with other tokens of the same lengths: the time stamp moved, read again.
    docs = [d.copy() for d in made.docs]
    docs[4] = docs[4][::-1].copy()
    write_dataset(prefix, docs)
    problems = check_content(cache, prefix, open_dataset(prefix))
    assert len(read) == 12 and "token identity of documents" in problems[0]


def test_verify_cache_leaves_a_verdict_train_uses(tmp_path, monkeypatch):
    from megatron_slkd.data.indexed import open_dataset

    prefix, made = _pair(tmp_path)
    _settle(prefix)
    assert verify_cache(made.path, prefix)["ok"]
    monkeypatch.setattr(verify_mod, "_VERIFIED", set())
    read = _reads(monkeypatch)
    assert check_content(open_cache(made.path), prefix, open_dataset(prefix)) == []
    assert read == []


def _ranks(pairs, size):
    """check_contents on ``size`` simulated ranks (threads), with an all-gather."""
    box, results = {}, [None] * size
    barrier = threading.Barrier(size)

    def gather(obj, rank):
        box[rank] = obj
        barrier.wait()
        out = [box[r] for r in range(size)]
        barrier.wait()
        return out

    def run(rank):
        results[rank] = check_contents(pairs, rank=rank, size=size,
                                       all_gather=lambda o: gather(o, rank))  # fmt: skip

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_the_first_check_is_split_over_the_ranks(tmp_path, monkeypatch):
    good, good_cache = _pair(tmp_path, "good", shards=4)
    bad, bad_cache = _pair(tmp_path, "bad", shards=2)
    docs = [d.copy() for d in bad_cache.docs]
    docs[2] = docs[2][::-1].copy()
    write_dataset(bad, docs)
    _settle(good)
    _settle(bad)
    pairs = [(good, open_cache(good_cache.path)), (bad, open_cache(bad_cache.path))]
    read = _reads(monkeypatch)
    results = _ranks(pairs, 2)
    # Every shard read once, by one rank; each rank read some.
    assert sorted(read) == sorted([(r["doc_start"], r["doc_end"]) for _, c in pairs
                                   for r in c.manifest.shards])  # fmt: skip
    assert results[0]["problems"] == results[1]["problems"]
    assert len(results[0]["problems"]) == 1 and "documents 0..5" in results[0]["problems"][0]
    assert results[0]["read"] == [good, bad] and results[0]["tokens"] == 2 * sum(LENGTHS)
    # The aligned pair got its verdict, the other did not.
    monkeypatch.setattr(verify_mod, "_VERIFIED", set())
    del read[:]
    again = _ranks(pairs, 2)
    assert again[0]["known"] == [good] and again[0]["read"] == [bad]
    assert sorted(read) == [(0, 6), (6, 12)]
    assert np.all([len(r["problems"]) == 1 for r in again])
