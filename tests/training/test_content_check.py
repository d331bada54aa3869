"""`slkd train` reads a dataset's tokens for its content check once per (dataset, cache)."""

import os
import shutil

import numpy as np
from helpers import slkd

from megatron_slkd.data.indexed import open_dataset


def _args(prefix, cache, run_dir):
    return [
        "train", "--data-path", prefix, "--kd-caches", f"{prefix}={cache}",
        "--data-split", "90,10,0", "--data-index-cache", str(run_dir.parent / "index-cache"),
        "--data-num-workers", "0", "--model-num-layers", "1", "--model-hidden-size", "32",
        "--model-ffn-hidden-size", "64", "--model-seq-length", "64", "--train-steps", "1",
        "--train-global-batch-size", "2", "--eval-batches", "1", "--checkpoint-dir", str(run_dir),
    ]  # fmt: skip


def _contents_line(r) -> str:
    return next(x for x in r.stdout.splitlines() if x.startswith("cache contents:"))


def test_a_second_start_reads_no_dataset_token_for_the_check(markov, tmp_path):
    src, cache = markov
    prefix = str(tmp_path / "data")
    for ext in (".bin", ".idx", ".meta.json"):
        shutil.copy(src + ext, prefix + ext)
    stamps = {}
    for ext in (".bin", ".idx"):  # written a while ago: a verdict on them may be recorded
        st = os.stat(prefix + ext)
        os.utime(prefix + ext, ns=(st.st_atime_ns, st.st_mtime_ns - 10**10))
        stamps[ext] = os.stat(prefix + ext)
    first = slkd(*_args(prefix, cache, tmp_path / "r1"))
    assert "1 prefix(es) shown to match" in _contents_line(first)
    # The tokens rewritten in place behind the check's back, size and time stamp kept: a
    # start that read them would refuse the cache. The second start trains, reading none.
    ds = open_dataset(prefix)
    inner = np.ones(int(ds.sequence_lengths.sum()), bool)
    inner[np.cumsum(ds.sequence_lengths) - 1] = False  # the end-of-document ids stay
    tokens = np.memmap(prefix + ".bin", dtype=ds.dtype, mode="r+")
    tokens[inner] = (tokens[inner] + 1) % 100  # still inside the vocabulary
    tokens.flush()
    del tokens
    st = stamps[".bin"]
    os.utime(prefix + ".bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    second = slkd(*_args(prefix, cache, tmp_path / "r2"))
    assert "1 prefix(es) known to match (no token read)" in _contents_line(second)
    # Any write moves the time stamp: the next start reads the tokens again and refuses.
    os.utime(prefix + ".bin")
    third = slkd(*_args(prefix, cache, tmp_path / "r3"), check=False)
    assert third.returncode == 2, third.stderr[-2000:]
    last = third.stderr.strip().splitlines()[-1]
    assert "token identity of documents" in last and "differs from the dataset's" in last


def test_a_cache_of_format_version_1_trains_and_says_what_it_cannot_prove(markov, tmp_path):
    from helpers import as_format_version_1

    from megatron_slkd.cache import open_cache
    from megatron_slkd.data.verify import verify_cache

    src, cache = markov
    old = tmp_path / "old-cache"
    shutil.copytree(cache, old)
    as_format_version_1(old)
    c = open_cache(old)
    assert c.manifest.unproven_shards() == [s["file"] for s in c.manifest.shards]
    assert verify_cache(old, src)["ok"]
    r = slkd(*_args(src, old, tmp_path / "run"))
    warned = [x for x in r.stderr.splitlines() if "record only a CRC-32" in x]
    assert len(warned) == 1 and str(old) in warned[0], r.stderr[-3000:]
    assert "step 1/1" in r.stdout
