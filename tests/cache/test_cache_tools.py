"""Tier 1: merge, verify, thin and inspect, as functions and through the CLI."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import write_dataset, write_synthetic_cache

from megatron_slkd.cache import open_cache
from megatron_slkd.cache.merge import merge_cache
from megatron_slkd.cache.stats import cache_stats
from megatron_slkd.cache.thin import thin_cache, thin_counts
from megatron_slkd.data.verify import assign_shards, verify_cache
from megatron_slkd.errors import CacheCoverageError, CacheMismatchError
from megatron_slkd.records import dump_record

LENGTHS = [5, 1, 40, 17, 3, 90, 2, 33, 8, 12]


@pytest.fixture
def parts(tmp_path):
    """A cache written as 3 shards with sidecars and no manifest (a job array's output)."""
    return write_synthetic_cache(
        tmp_path / "parts", LENGTHS, num_shards=3, write_manifest=False, sidecars=True
    )


def test_merge_then_read(parts, tmp_path):
    report = merge_cache([parts.path], tmp_path / "merged")
    assert report["shards"] == 3 and report["documents"] == len(LENGTHS)
    merged = open_cache(tmp_path / "merged")
    whole = open_cache(parts.path) if (parts.path / "manifest.json").exists() else None
    assert whole is None
    for d in range(len(LENGTHS)):
        ids, _, n = parts.expected_rows(d)
        r = merged.read(d, 0, LENGTHS[d])
        assert np.array_equal(r.num_entries, n)
    # Merging twice, or a cache with its own shards, is idempotent.
    assert merge_cache([tmp_path / "merged", parts.path], tmp_path / "merged")["shards"] == 3


def test_merge_reports_gaps_and_overlaps(parts, tmp_path):
    for f in parts.path.glob("shard-00001*"):
        f.unlink()
    with pytest.raises(CacheCoverageError, match=r"gap: documents 3\.\.5 are in no shard"):
        merge_cache([parts.path], tmp_path / "out")
    other = write_synthetic_cache(
        tmp_path / "other", LENGTHS, num_shards=2, write_manifest=False, sidecars=True, seed=9
    )
    with pytest.raises(CacheMismatchError, match="differ|share"):
        merge_cache([parts.path, other.path], tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_merge_reports_overlaps(tmp_path):
    a = write_synthetic_cache(
        tmp_path / "a", LENGTHS, num_shards=2, write_manifest=False, sidecars=True
    )
    side = json.loads((a.path / "shard-00001.slkd.json").read_text())
    side["shards"][0]["doc_start"] = 3
    (a.path / "shard-00001.slkd.json").write_text(dump_record(side))
    with pytest.raises(CacheCoverageError, match=r"overlap: documents 3\.\.4"):
        merge_cache([a.path], tmp_path / "out")


def test_verify_clean_and_aligned(tmp_path):
    cache = write_synthetic_cache(tmp_path / "c", LENGTHS, num_shards=3)
    prefix = write_dataset(tmp_path / "ds", cache.docs)
    report = verify_cache(cache.path, prefix)
    assert report["ok"], report["problems"]
    assert report["documents"] == len(LENGTHS)


def test_verify_finds_misalignment(tmp_path):
    cache = write_synthetic_cache(tmp_path / "c", LENGTHS, num_shards=3)
    docs = [d.copy() for d in cache.docs]
    docs[4] = docs[4][::-1].copy()  # same length, different tokens
    r = verify_cache(cache.path, write_dataset(tmp_path / "tok", docs))
    assert not r["ok"] and "token identity of documents 3..5" in r["problems"][0]
    docs = [d.copy() for d in cache.docs]
    docs[7] = np.concatenate([docs[7], [1]])
    r = verify_cache(cache.path, write_dataset(tmp_path / "len", docs))
    assert "document 7 has 33 tokens in the cache and 34 in the dataset" in r["problems"][0]
    r = verify_cache(cache.path, write_dataset(tmp_path / "cnt", cache.docs[:-1]))
    assert "9 documents, the cache 10" in r["problems"][0]
    meta = {"tokenizer": {"fingerprint": "sha256:other", "vocab_size": 300}}
    prefix = write_dataset(tmp_path / "fp", cache.docs)
    (tmp_path / "fp.meta.json").write_text(json.dumps(meta))
    r = verify_cache(cache.path, prefix)
    assert any("tokenizer fingerprint" in p for p in r["problems"])


def test_verify_finds_corruption(tmp_path):
    cache = write_synthetic_cache(tmp_path / "c", LENGTHS, num_shards=3)
    p = cache.path / "shard-00002.slkd"
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 0xFF
    p.write_bytes(raw)
    r = verify_cache(cache.path)
    assert not r["ok"]
    assert any("file CRC" in x for x in r["problems"])
    assert any("CRC mismatch in chunk" in x for x in r["problems"])


def test_assign_shards_balances_bytes():
    plan = assign_shards([10, 1, 1, 1, 9, 2], 2)
    assert sorted(i for p in plan for i in p) == list(range(6))
    loads = [sum([10, 1, 1, 1, 9, 2][i] for i in p) for p in plan]
    assert max(loads) - min(loads) <= 2


def test_thinning_preserves_the_multinomial_law():
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    rows, n, n2 = 20_000, 50, 10
    full = rng.multinomial(n, p, size=rows)
    thinned = thin_counts(full, n2, seed=3, positions=np.arange(rows))
    assert np.all(thinned.sum(-1) == n2) and np.all(thinned <= full)
    # Each id's thinned count must be Binomial(n2, p_i): chi-square per id.
    for i in range(5):
        observed = np.bincount(thinned[:, i], minlength=n2 + 1)
        expected = (
            np.array([math.comb(n2, c) * p[i] ** c * (1 - p[i]) ** (n2 - c) for c in range(n2 + 1)])
            * rows
        )
        keep = expected > 5
        chi = (((observed - expected) ** 2)[keep] / expected[keep]).sum()
        dof = keep.sum() - 1
        assert chi < dof + 6 * math.sqrt(2 * dof), (i, chi)
    # Pairs are negatively correlated exactly as a multinomial's: cov = -n2 p_i p_j.
    cov = np.cov(thinned[:, 0], thinned[:, 1])[0, 1]
    assert abs(cov - (-n2 * p[0] * p[1])) < 0.05


def test_thin_cache_is_an_exact_smaller_cache(tmp_path):
    src = write_synthetic_cache(tmp_path / "src", LENGTHS, num_shards=2)
    report = thin_cache(src.path, tmp_path / "n8", 8, seed=1)
    assert report["from"] == 50 and report["num_samples"] == 8
    thin = open_cache(tmp_path / "n8")
    assert thin.manifest.encoding.num_samples == 8 and thin.manifest.sampling["num_samples"] == 8
    assert verify_cache(tmp_path / "n8", write_dataset(tmp_path / "ds", src.docs))["ok"]
    full, small = (
        open_cache(src.path).read_tokens(0, thin.num_tokens),
        thin.read_tokens(0, thin.num_tokens),
    )
    has = full.num_entries > 0
    assert np.allclose(small.weights[has].sum(-1), 1.0)
    assert np.all(small.num_entries <= np.minimum(full.num_entries, 8))
    for r in np.flatnonzero(has)[:50]:  # kept ids are a subset of the source ids
        assert set(small.ids[r, : small.num_entries[r]]) <= set(full.ids[r, : full.num_entries[r]])
    # Deterministic: a second run gives the same bytes.
    thin_cache(src.path, tmp_path / "again", 8, seed=1)
    for f in ("shard-00000.slkd", "shard-00001.slkd"):
        assert (tmp_path / "n8" / f).read_bytes() == (tmp_path / "again" / f).read_bytes()
    with pytest.raises(CacheMismatchError, match="must be in"):
        thin_cache(src.path, tmp_path / "bad", 50)


def test_thin_cache_resumes_after_a_finished_shard(tmp_path):
    src = write_synthetic_cache(tmp_path / "src", LENGTHS, num_shards=2)
    thin_cache(src.path, tmp_path / "ref", 8)
    shutil.copytree(tmp_path / "ref", tmp_path / "out")
    (tmp_path / "out" / "manifest.json").unlink()
    (tmp_path / "out" / "shard-00001.slkd").unlink()
    thin_cache(src.path, tmp_path / "out", 8)
    assert (tmp_path / "out" / "manifest.json").read_text() == (
        tmp_path / "ref" / "manifest.json"
    ).read_text()
    with pytest.raises(CacheMismatchError, match=r"other parameters .*sampling\.num_samples"):
        thin_cache(src.path, tmp_path / "out", 6)


def test_stats_figures(tmp_path):
    cache = write_synthetic_cache(tmp_path / "c", LENGTHS, num_shards=2)
    s = cache_stats(open_cache(cache.path))
    assert s["tokens"] == sum(LENGTHS)
    entries = sum(int(t.num_valid[:-1].sum()) for t in cache.targets)
    assert s["entries"] == entries
    assert s["positions_without_entries"] == len(LENGTHS)  # each document's last token
    assert s["unique_ids_per_position_mean"] == pytest.approx(
        entries / (sum(LENGTHS) - len(LENGTHS))
    )
    size = sum(os.path.getsize(p) for p in cache.path.glob("*.slkd"))
    assert s["bytes_per_token"] == pytest.approx(size / sum(LENGTHS))


def _slkd(*args):
    return subprocess.run(
        [sys.executable, "-m", "megatron_slkd", *map(str, args)], capture_output=True, text=True
    )


def test_cli_round_trip(parts, tmp_path):
    out = tmp_path / "cli"
    r = _slkd("merge-cache", parts.path, "--output", out, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["shards"] == 3
    prefix = write_dataset(tmp_path / "ds", parts.docs)
    r = _slkd("verify-cache", out, "--data-prefix", prefix, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"], r.stdout + r.stderr
    r = _slkd("inspect-cache", out, "--doc", 2, "--offset", 5, "--plot", tmp_path / "h.png")
    assert r.returncode == 0, r.stderr
    assert "bytes/token" in r.stdout and (tmp_path / "h.png").stat().st_size > 1000
    r = _slkd("inspect-cache", out, "--doc", 2, "--top", 0)
    assert r.returncode == 2 and "argument --top: 0: give 1 or more" in r.stderr, r.stderr
    n, last = len(parts.docs), len(parts.docs[2])
    for doc, offset, needle in ((n, 0, f"document {n} outside [0, {n})"),
                                (2, last, f"outside document 2 of {last} tokens")):  # fmt: skip
        r = _slkd("inspect-cache", out, "--doc", doc, "--offset", offset)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith(f"slkd inspect-cache: error: --doc {doc} --offset {offset}: ")
        assert needle in r.stderr and str(out) in r.stderr, r.stderr
    r = _slkd("thin-cache", out, "--num-samples", 5, "--output", tmp_path / "n5", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["num_samples"] == 5
    # Bad input: one line naming the problem, exit status 2 (or 1 for verify problems).
    r = _slkd("merge-cache", tmp_path / "nowhere", "--output", tmp_path / "x")
    assert r.returncode == 2 and "not a directory" in r.stderr and "Traceback" not in r.stderr
    (out / "shard-00001.slkd").unlink()
    r = _slkd("verify-cache", out)
    assert r.returncode == 1 and "missing shard for documents 3..5" in r.stdout


def test_merge_and_thin_outputs_have_one_owner(tmp_path):
    from helpers import slkd

    a = write_synthetic_cache(tmp_path / "a", LENGTHS, num_shards=2, write_manifest=False,
                              sidecars=True)  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    record = {"host": "node-5", "pid": 12, "slurm_job": None, "slurm_array_task": None,
              "since": "2026-11-29T01:00:00+0000", "token": "x"}  # fmt: skip
    (out / "manifest.json.owner").write_text(dump_record(record))
    r = slkd("merge-cache", a.path, "--output", out, check=False)
    assert r.returncode == 2 and "merged cache is being written by host node-5 pid 12" in r.stderr
    assert not (out / "manifest.json").exists()
    r = slkd("thin-cache", a.path, "--num-samples", "10", "--output", out, check=False)
    assert r.returncode == 2 and "is being written by host node-5" in r.stderr, r.stderr
