"""Tier 1/3: document windows, shard plans, and cache building with resume."""

import dataclasses
import json
import os
import shutil
import time

import numpy as np
import pytest
import torch
from helpers import write_dataset
from hypothesis import given
from hypothesis import strategies as st

from megatron_slkd.cache import open_cache
from megatron_slkd.data.verify import verify_cache
from megatron_slkd.errors import CacheMismatchError, ConfigError
from megatron_slkd.records import dump_record
from megatron_slkd.sampling import sample_sparse_targets
from megatron_slkd.teacher import BuildConfig, build_cache, document_windows, plan_shards
from megatron_slkd.teacher.build import check_existing_shards, finished_report, shard_file_name

VOCAB = 64


@given(length=st.integers(1, 300), context=st.integers(1, 64), data=st.data())
def test_windows_score_every_position_once_with_enough_context(length, context, data):
    stride = data.draw(st.integers(1, context))
    windows = document_windows(length, context, stride)
    scored = []
    for w in windows:
        assert 0 <= w.start <= w.score_from < w.end <= length and w.end - w.start <= context
        for p in range(w.score_from, w.end):
            assert p - w.start >= min(context - stride, p)  # C - S tokens, or the whole prefix
        scored += range(w.score_from, w.end)
    assert scored == list(range(length))


def test_plan_shards_is_contiguous_and_balanced():
    lengths = np.array([100, 5, 5, 5, 100, 50, 50, 90, 10, 100])
    plan = plan_shards(lengths, 4)
    assert plan[0][0] == 0 and plan[-1][1] == 10
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(plan, plan[1:], strict=False))
    tokens = [lengths[a:b].sum() for a, b in plan]
    assert max(tokens) <= 2 * lengths.sum() / 4
    assert plan_shards(lengths, 10) == [(i, i + 1) for i in range(10)]
    with pytest.raises(ConfigError, match="num-shards 11: a dataset of 10 documents"):
        plan_shards(lengths, 11)


class PrefixTeacher:
    """Logits at a position depend on every token of the window up to it (a
    running hash), so a wrong window or misaligned row changes the output."""

    vocab_size = VOCAB
    max_context = 512

    def __init__(self, fail_after: int | None = None):
        self.calls, self.fail_after = 0, fail_after

    def describe(self):
        return {"kind": "test", "name": "prefix-hash"}

    def tokenizer(self):
        return _Tok()

    def logits(self, windows):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated crash")
        out = []
        for w in windows:
            h = torch.cumsum(w * 1_000_003 % 97, 0)
            g = torch.Generator()
            rows = []
            for v in h.tolist():
                g.manual_seed(int(v))
                rows.append(torch.randn(VOCAB, generator=g) * 3)
            out.append(torch.stack(rows))
        return out


class _Tok:
    def fingerprint(self):
        return "test-vocab"


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, VOCAB, n) for n in (40, 3, 1, 90, 17, 60, 8, 25)]
    prefix = write_dataset(tmp_path / "ds", docs)
    meta = {"tokenizer": {"fingerprint": "test-vocab", "vocab_size": VOCAB, "kind": "test"}}
    (tmp_path / "ds.meta.json").write_text(json.dumps(meta))
    return prefix, docs


def _cfg(prefix, out, **kw):
    return BuildConfig(
        data_prefix=prefix,
        output=str(out),
        context_length=16,
        stride=8,
        tokens_per_batch=40,
        commit_tokens=20,
        progress=False,
        **kw,
    )


def test_rows_match_the_teacher_on_each_documents_prefix(dataset, tmp_path):
    prefix, docs = dataset
    report = build_cache(_cfg(prefix, tmp_path / "c", method="topk", k=5), PrefixTeacher())
    assert report["complete"]
    cache = open_cache(tmp_path / "c")
    teacher = PrefixTeacher()
    for d, doc in enumerate(docs):
        rows = cache.read(d, 0, len(doc))
        for w in document_windows(len(doc), 16, 8):
            logits = teacher.logits([torch.as_tensor(doc[w.start : w.end])])[0]
            for p in range(w.score_from, min(w.end, len(doc) - 1)):
                expect = torch.softmax(logits[p - w.start].double(), -1).topk(5).indices
                assert rows.ids[p, :5].tolist() == expect.tolist(), (d, p)
        assert rows.num_entries[-1] == 0
    assert verify_cache(tmp_path / "c", prefix)["ok"]


@pytest.mark.parametrize("method,shards", [("rs", 1), ("topk", 1), ("rs", 3)])
def test_empty_documents_get_no_rows_and_leave_the_others_unchanged(tmp_path, method, shards):
    # preprocess_data.py writes a sequence of length 0 for an empty input line. In three
    # shards, the second holds only an empty document, the third ends with one.
    rng = np.random.default_rng(3)
    lengths = (0, 40, 0, 0, 3, 1, 0)
    docs = [rng.integers(0, VOCAB, n) for n in lengths]
    outs, per_position = {}, {}
    for name, kept in (("with", docs), ("without", [d for d in docs if len(d)])):
        prefix = write_dataset(tmp_path / name, kept)
        meta = {"tokenizer": {"fingerprint": "test-vocab", "vocab_size": VOCAB, "kind": "test"}}
        (tmp_path / f"{name}.meta.json").write_text(json.dumps(meta))
        n = shards if name == "with" else 1
        report = build_cache(_cfg(prefix, tmp_path / f"c-{name}", method=method, k=5,
                                  num_shards=n), PrefixTeacher())  # fmt: skip
        assert report["complete"] and verify_cache(tmp_path / f"c-{name}", prefix)["ok"]
        outs[name] = open_cache(tmp_path / f"c-{name}")
        # The summary's figure is the cache's (it divided by tokens - documents: 4 empty
        # documents of 44 tokens in 7 gave 1.3 times the cache's count in the summary).
        per_position[name] = report["unique_ids_per_position"]
        assert per_position[name] == report["cache_unique_ids_per_position"]
    assert per_position["with"] == per_position["without"]
    nonempty = [d for d, n in enumerate(lengths) if n]
    for j, d in enumerate(nonempty):  # same positions, so the same draws
        a, b = outs["with"].read(d, 0, lengths[d]), outs["without"].read(j, 0, lengths[d])
        assert np.array_equal(a.num_entries, b.num_entries), d
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.weights, b.weights), d
    for d in set(range(len(lengths))) - set(nonempty):
        assert outs["with"].read(d, 0, 0).num_entries.size == 0


def test_crash_and_resume_is_byte_identical(dataset, tmp_path):
    prefix, _ = dataset
    clean = build_cache(_cfg(prefix, tmp_path / "clean", num_shards=3), PrefixTeacher())
    assert clean["complete"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_cache(_cfg(prefix, tmp_path / "crash", num_shards=3), PrefixTeacher(fail_after=5))
    assert not (tmp_path / "crash" / "manifest.json").exists()
    build_cache(_cfg(prefix, tmp_path / "crash", num_shards=3), PrefixTeacher())
    for i in range(3):
        name = shard_file_name(i, 3)
        assert (tmp_path / "crash" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
    assert (tmp_path / "crash" / "manifest.json").read_text() == (
        tmp_path / "clean" / "manifest.json"
    ).read_text()


def test_shards_built_separately_then_merged(dataset, tmp_path):
    prefix, _ = dataset
    whole = build_cache(_cfg(prefix, tmp_path / "one", num_shards=1), PrefixTeacher())
    assert whole["complete"]
    for i in (2, 0, 1):  # as three job-array tasks would, in any order
        r = build_cache(
            _cfg(prefix, tmp_path / "parts", num_shards=3, shard_indices=[i]), PrefixTeacher()
        )
        assert r["complete"] == (i == 1)
    a, b = open_cache(tmp_path / "one"), open_cache(tmp_path / "parts")
    ra, rb = a.read_tokens(0, a.num_tokens), b.read_tokens(0, b.num_tokens)
    assert np.array_equal(ra.ids, rb.ids) and np.array_equal(ra.weights, rb.weights)


def test_refuses_other_parameters_and_other_vocabulary(dataset, tmp_path):
    prefix, _ = dataset
    build_cache(_cfg(prefix, tmp_path / "c", num_shards=2), PrefixTeacher())
    with pytest.raises(CacheMismatchError, match="other parameters"):
        build_cache(_cfg(prefix, tmp_path / "c", num_shards=2, seed=7), PrefixTeacher())
    meta = json.loads((tmp_path / "ds.meta.json").read_text())
    meta["tokenizer"]["vocab_size"] = VOCAB + 1
    (tmp_path / "ds.meta.json").write_text(dump_record(meta))
    with pytest.raises(CacheMismatchError, match="cannot score ids"):
        build_cache(_cfg(prefix, tmp_path / "d"), PrefixTeacher())


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(stride=0), "--stride 0 must be in"),
        (dict(stride=17), "--stride 17 must be in"),
        (dict(context_length=1024, stride=8), "exceeds the teacher's 512"),
        (dict(method="topk"), "needs --k"),
        (dict(temperature=0.0), r"--temperature 0.0 must be positive and finite"),
        (dict(temperature=float("nan")), r"--temperature nan must be positive"),
        (dict(num_shards=2, shard_indices=[5]), r"--shard-index 5: the shards of --num-shards "
                                                r"2 are 0\.\.1"),
        (dict(num_shards=2, shard_indices=[-1]), r"--shard-index -1: the shards"),
        (dict(num_shards=0), r"--num-shards 0 must be at least 1"),
        (dict(tokens_per_batch=10), r"--tokens-per-batch 10 holds no whole window of "
                                    r"--context-length 16; give 16 or more"),
    ],
)
def test_bad_options_are_refused(dataset, tmp_path, kw, match):
    prefix, _ = dataset
    cfg = _cfg(prefix, tmp_path / "c")
    with pytest.raises(ConfigError, match=match):
        build_cache(dataclasses.replace(cfg, **kw), PrefixTeacher())
    # Refused before a shard was opened: a partial one would pin the bad setting, and
    # the corrected command would be refused as "other settings".
    assert not list((tmp_path / "c").glob("*.partial"))


def test_resume_from_a_moved_dataset_keeps_finished_shards(dataset, tmp_path):
    prefix, _ = dataset
    build_cache(_cfg(prefix, tmp_path / "c", num_shards=2, shard_indices=[0]), PrefixTeacher())
    moved = tmp_path / "elsewhere" / "ds"
    moved.parent.mkdir()
    for ext in (".bin", ".idx", ".meta.json"):
        shutil.copy(prefix + ext, str(moved) + ext)
    # Same content at another path: shard 0 is kept, shard 1 is built, they merge.
    r = build_cache(_cfg(str(moved), tmp_path / "c", num_shards=2), PrefixTeacher())
    assert r["shards_built"] == 1 and r["complete"]
    assert verify_cache(tmp_path / "c", str(moved))["ok"]


class HashedTeacher(PrefixTeacher):
    def describe(self):
        return {**super().describe(), "checkpoint_hash": "sha256:0123"}


def test_finished_build_is_reported_without_the_teacher(dataset, tmp_path):
    prefix, _ = dataset
    cfg = _cfg(prefix, tmp_path / "c", num_shards=2)
    assert finished_report(cfg, "sha256:0123") is None  # nothing built yet
    built = build_cache(_cfg(prefix, tmp_path / "c", num_shards=2, shard_indices=[0]),
                        HashedTeacher())  # fmt: skip
    assert finished_report(cfg, "sha256:0123") is None  # shard 1 is missing
    part = finished_report(dataclasses.replace(cfg, shard_indices=[0]), "sha256:0123")
    assert part["shards_built"] == 0 and not part["complete"]
    assert part["tokens"] == built["tokens"]
    build_cache(cfg, HashedTeacher())
    done = finished_report(cfg, "sha256:0123")
    assert done["complete"] and done["cache_bytes_per_token"] > 0
    # Other settings or another teacher file: the teacher is loaded and decides.
    assert finished_report(dataclasses.replace(cfg, seed=7), "sha256:0123") is None
    assert finished_report(cfg, "sha256:other") is None
    assert finished_report(cfg, None) is None


class OtherTeacher(PrefixTeacher):
    def describe(self):
        return {"kind": "test", "name": "another-teacher"}


@pytest.mark.parametrize(
    "change, teacher, setting",
    [
        (dict(seed=2), PrefixTeacher, "sampling.seed: 1234 here, 2 asked"),
        (dict(temperature=1.5), PrefixTeacher, "sampling.temperature"),
        (dict(context_length=12), PrefixTeacher, "sampling.context_length"),
        (dict(stride=4), PrefixTeacher, "sampling.stride"),
        (dict(method="topk", k=5), PrefixTeacher, "sampling.method"),
        ({}, OtherTeacher, "teacher.name: 'prefix-hash' here, 'another-teacher' asked"),
    ],
)
def test_unfinished_shard_resumes_only_under_the_same_settings(
    dataset, tmp_path, change, teacher, setting
):
    prefix, _ = dataset
    out = tmp_path / "c"
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_cache(_cfg(prefix, out), PrefixTeacher(fail_after=3))
    assert (out / (shard_file_name(0, 1) + ".partial") / "progress.json").exists()
    cfg = dataclasses.replace(_cfg(prefix, out), **change)
    with pytest.raises(CacheMismatchError, match="unfinished shard") as err:
        build_cache(cfg, teacher())
    assert setting in str(err.value) and "documents 0..7" in str(err.value)
    # The sampling settings are refused before a teacher is loaded as well.
    if change:
        with pytest.raises(CacheMismatchError, match=f"unfinished shard .*{setting}"):
            check_existing_shards(cfg, None)
    # The same settings resume, and the shard equals an uninterrupted build.
    check_existing_shards(_cfg(prefix, out), None)
    build_cache(_cfg(prefix, out), PrefixTeacher())
    build_cache(_cfg(prefix, tmp_path / "clean"), PrefixTeacher())
    name = shard_file_name(0, 1)
    assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()


def test_existing_shards_of_another_teacher_file_are_refused_before_it_loads(dataset, tmp_path):
    prefix, _ = dataset
    out = tmp_path / "c"
    build_cache(_cfg(prefix, out, num_shards=2, shard_indices=[0]), HashedTeacher())
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_cache(_cfg(prefix, out, num_shards=2, shard_indices=[1]), HashedTeacher(fail_after=2))
    cfg = _cfg(prefix, out, num_shards=2)
    check_existing_shards(cfg, "sha256:0123")  # the same teacher: fine
    check_existing_shards(cfg, None)  # a teacher of unknown hash: decided after it loads
    with pytest.raises(CacheMismatchError, match="finished shard .*checkpoint_hash"):
        check_existing_shards(cfg, "sha256:other")
    with pytest.raises(CacheMismatchError, match="unfinished shard .*checkpoint_hash"):
        check_existing_shards(dataclasses.replace(cfg, shard_indices=[1]), "sha256:other")


def test_cli_refuses_a_partial_shard_of_other_settings_before_loading_the_teacher(
    dataset, tmp_path
):
    from helpers import slkd

    prefix, _ = dataset
    out = tmp_path / "c"
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_cache(_cfg(prefix, out), PrefixTeacher(fail_after=3))
    # A teacher directory that cannot load: the refusal must come first.
    junk = tmp_path / "teacher"
    junk.mkdir()
    (junk / "config.json").write_text("{}")
    r = slkd("build-cache", "--data-prefix", prefix, "--teacher", junk, "--output", out,
             "--context-length", "16", "--stride", "8", "--seed", "99", check=False)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "unfinished shard" in r.stderr and "sampling.seed: 1234 here, 99 asked" in r.stderr
    assert "Traceback" not in r.stderr


def test_teacher_figures_are_recorded_and_equal_a_float64_reference(dataset, tmp_path):
    # Every 8th absolute position with a next token: the teacher's NLL, entropy and the
    # KL of its own sparse targets to it (the floor of the evaluation's KL to the cache).
    prefix, docs = dataset
    build_cache(_cfg(prefix, tmp_path / "c", num_shards=2), PrefixTeacher())
    cache = open_cache(tmp_path / "c")
    got = cache.teacher_figures()
    teacher, pos0 = PrefixTeacher(), 0
    sums = dict(nll=0.0, entropy=0.0, sample_kl=0.0)
    n = 0
    for d, doc in enumerate(docs):
        rows = cache.read(d, 0, len(doc))
        for w in document_windows(len(doc), 16, 8):
            logits = teacher.logits([torch.as_tensor(doc[w.start : w.end])])[0].double()
            for p in range(w.score_from, w.end):
                if p == len(doc) - 1 or (pos0 + p) % 8:
                    continue
                lp = torch.log_softmax(logits[p - w.start], -1)
                k = rows.num_entries[p]
                ids = torch.as_tensor(rows.ids[p, :k].astype(np.int64))
                wt = torch.as_tensor(rows.weights[p, :k]).double()
                wt = wt / wt.sum()
                sums["nll"] -= float(lp[int(doc[p + 1])])
                sums["entropy"] -= float((lp.exp() * lp).sum())
                sums["sample_kl"] += float((wt * (wt.log() - lp[ids])).sum())
                n += 1
        pos0 += len(doc)
    assert got["positions"] == n > 10
    for k, v in sums.items():
        assert got[k] == pytest.approx(v / n, rel=1e-4, abs=1e-4), k
    assert got["sample_kl"] > 0.05  # N = 50 draws: a visible floor


def test_kl_above_the_floor_estimates_the_true_kl():
    # The evaluation's claim: E[KL(w || q)] - E[KL(w || p)] = KL(p || q) for RS targets
    # w of a teacher p, whatever the floor itself is.
    from megatron_slkd.sampling import sample_sparse_targets

    g = torch.Generator().manual_seed(3)
    rows, vocab = 4000, 200
    zp = torch.randn(vocab, generator=g, dtype=torch.float64) * 2
    zq = zp + torch.randn(vocab, generator=g, dtype=torch.float64) * 0.7
    lp, lq = torch.log_softmax(zp, -1), torch.log_softmax(zq, -1)
    t = sample_sparse_targets(zp.float().expand(rows, vocab), method="rs", seed=1,
                              positions=torch.arange(rows), num_samples=50)  # fmt: skip
    w = t.weights.double()
    wlogw = torch.where(w > 0, w * w.clamp(min=1e-300).log(), 0.0).sum(-1)
    kl_q = (wlogw - (w * lq[t.ids]).sum(-1)).mean()
    floor = (wlogw - (w * lp[t.ids]).sum(-1)).mean()
    true = float((lp.exp() * (lp - lq)).sum())
    assert float(floor) > 0.3 * true  # the floor is not small next to the KL
    assert float(kl_q - floor) == pytest.approx(true, rel=0.03)


def test_sentence_split_dataset_keys_rows_by_sequence(tmp_path):
    # preprocess_data.py --split-sentences writes several sequences per document; the cache
    # (like megatron-core's GPTDataset) treats each sequence as a document: the teacher sees
    # the sequence's own prefix and the last position of each sequence has no entries.
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, VOCAB - 1, n) for n in (12, 30, 3, 25, 1, 18, 40)]
    prefix = str(tmp_path / "split")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for i, s in enumerate(seqs):
        builder.add_item(torch.as_tensor(s.astype(np.int64)))
        if i in (2, 4, 6):  # documents of 3, 2 and 2 sequences
            builder.end_document()
    builder.finalize(prefix + ".idx")
    meta = {"tokenizer": {"fingerprint": "test-vocab", "vocab_size": VOCAB, "eod": VOCAB - 1,
                          "kind": "test"}}  # fmt: skip
    (tmp_path / "split.meta.json").write_text(json.dumps(meta))
    build_cache(_cfg(prefix, tmp_path / "c", num_shards=2), PrefixTeacher())
    cache = open_cache(tmp_path / "c")
    assert cache.num_documents == len(seqs)  # sequences, not the 3 documents
    assert verify_cache(tmp_path / "c", prefix)["ok"]
    teacher = PrefixTeacher()
    for d, seq in enumerate(seqs):
        rows = cache.read(d, 0, len(seq))
        assert rows.num_entries[-1] == 0
        for w in document_windows(len(seq), 16, 8):
            logits = teacher.logits([torch.as_tensor(seq[w.start : w.end])])[0]
            for p in range(w.score_from, min(w.end, len(seq) - 1)):
                row = logits[p - w.start : p - w.start + 1]
                pos = torch.tensor([sum(len(s) for s in seqs[:d]) + p])  # absolute position
                expect = sample_sparse_targets(row, method="rs", seed=1234, num_samples=50,
                                               positions=pos)  # fmt: skip
                k = rows.num_entries[p]
                assert sorted(rows.ids[p, :k].tolist()) == sorted(
                    expect.ids[0, : int(expect.num_valid[0])].tolist()
                ), (d, p)


def _live_owner(target):
    """An owner file of a live process on another host (fresh heartbeat)."""
    record = {"host": "node-17", "pid": 4321, "slurm_job": "880", "slurm_array_task": "2",
              "since": "2026-11-29T01:00:00+0000", "token": "x"}  # fmt: skip
    target.parent.mkdir(parents=True, exist_ok=True)
    target.with_name(target.name + ".owner").write_text(dump_record(record))


def test_a_second_writer_of_a_shard_stops_before_loading_the_teacher(dataset, tmp_path):
    from helpers import slkd

    prefix, _ = dataset
    out = tmp_path / "c"
    _live_owner(out / shard_file_name(1, 2))
    junk = tmp_path / "teacher"  # would fail to load: the refusal must come first
    junk.mkdir()
    args = ["build-cache", "--data-prefix", prefix, "--teacher", junk, "--output", out,
            "--num-shards", "2", "--context-length", "16", "--stride", "8"]  # fmt: skip
    r = slkd(*args, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "is being written by host node-17 pid 4321, Slurm job 880 array task 2" in r.stderr
    assert not (out / (shard_file_name(0, 2) + ".owner")).exists()  # shard 0's claim released
    # Only shard 0 is ours: the other writer's shard is not touched.
    r = slkd(*args, "--shard-index", "0", check=False)
    assert "is being written" not in r.stderr and "cannot load" in r.stderr, r.stderr
    # A dead owner (no heartbeat for longer than --lock-timeout) is taken over.
    old = time.time() - 30
    os.utime(out / (shard_file_name(1, 2) + ".owner"), (old, old))
    r = slkd(*args, "--lock-timeout", "10", check=False)
    assert "is being written" not in r.stderr and "cannot load" in r.stderr, r.stderr


class _WatchAfter:
    """A preemption watch that fires on its ``n``-th look (as if the signal came then)."""

    def __init__(self, n):
        self.n, self.signal = n, None

    @property
    def requested(self):
        self.n -= 1
        if self.n <= 0:
            self.signal = "SIGUSR1"
        return self.signal is not None


def test_preemption_commits_and_resumes_byte_identical(dataset, tmp_path):
    from megatron_slkd.preempt import Preempted

    prefix, _ = dataset
    build_cache(_cfg(prefix, tmp_path / "clean", num_shards=2), PrefixTeacher())
    for n in (1, 3, 6):
        out = tmp_path / f"p{n}"
        with pytest.raises(Preempted, match=r"preempted by SIGUSR1: shard-00000-of-00002\.slkd "
                                            r"committed (through document|before)"):  # fmt: skip
            build_cache(_cfg(prefix, out, num_shards=2), PrefixTeacher(), watch=_WatchAfter(n))
        assert (out / (shard_file_name(0, 2) + ".partial") / "progress.json").exists()
        build_cache(_cfg(prefix, out, num_shards=2), PrefixTeacher())
        for i in range(2):
            name = shard_file_name(i, 2)
            assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()


class BatchShapeTeacher(PrefixTeacher):
    """Logits that also depend on the batch a window is in (its padded shape), as a real
    teacher's do in their last bits; exaggerated here so that draws move with it."""

    def logits(self, windows):
        batch = tuple(len(w) for w in windows)
        out = []
        for i, o in enumerate(super().logits(windows)):
            g = torch.Generator().manual_seed(hash((batch, i)) % 2**31)
            out.append(o + torch.randn(o.shape, generator=g))
        return out


def test_a_resumed_build_runs_the_batches_of_an_uninterrupted_one(tmp_path):
    # Out of disk space, preempted or killed at any document: the resumed build must see
    # the teacher's logits of the clean build, so it batches from the shard's start.
    from megatron_slkd.preempt import Preempted

    rng = np.random.default_rng(1)
    prefix = write_dataset(tmp_path / "ds", [rng.integers(0, VOCAB, n)
                                             for n in rng.integers(2, 60, 40)])  # fmt: skip
    meta = {"tokenizer": {"fingerprint": "test-vocab", "vocab_size": VOCAB, "kind": "test"}}
    (tmp_path / "ds.meta.json").write_text(json.dumps(meta))
    build_cache(_cfg(prefix, tmp_path / "clean"), BatchShapeTeacher())
    clean = {p.name: p.read_bytes() for p in (tmp_path / "clean").iterdir()}
    for n in (3, 8, 13, 21):
        out = tmp_path / f"p{n}"
        with pytest.raises(Preempted):
            build_cache(_cfg(prefix, out), BatchShapeTeacher(), watch=_WatchAfter(n))
        build_cache(_cfg(prefix, out), BatchShapeTeacher())
        assert {p.name: p.read_bytes() for p in out.iterdir()} == clean, n


class StageTeacher(PrefixTeacher):
    """PrefixTeacher split over a two-stage pipeline: rank 0 is the first stage (no
    logits), rank 1 the last; one model-parallel group of both."""

    def __init__(self, rank):
        super().__init__()
        self.has_logits = rank == 1
        self.model_parallel_group = torch.distributed.group.WORLD

    def logits(self, windows):
        out = super().logits(windows)
        return out if self.has_logits else None


def _pipelined_build(rank, world, prefix, out):
    from megatron_slkd.teacher import build

    made = []

    class Counted(build._DocumentRows):
        def __init__(self, tokens):
            super().__init__(tokens)
            made.append(len(tokens))

    build._DocumentRows = Counted
    build_cache(_cfg(prefix, out), StageTeacher(rank))
    # Only the stage that samples holds documents' rows; an earlier stage holding every
    # document's tokens until the shard ends grows with the shard.
    assert len(made) == (8 if rank == 1 else 0), (rank, made)
    torch.distributed.barrier()  # the writer has its manifest before either rank tears down


def test_a_pipelined_teacher_writes_the_same_cache_and_only_its_last_stage_keeps_rows(
    dataset, tmp_path
):
    from megatron_slkd.testing import run_distributed

    prefix, _ = dataset
    build_cache(_cfg(prefix, tmp_path / "one"), PrefixTeacher())
    run_distributed(_pipelined_build, 2, prefix, str(tmp_path / "pp"))
    one = {p.name: p.read_bytes() for p in (tmp_path / "one").iterdir()}
    assert {p.name: p.read_bytes() for p in (tmp_path / "pp").iterdir()} == one


def test_an_implausible_teacher_is_warned_about_before_a_long_document_ends(tmp_path):
    # Random logits on random ids: an NLL far above 75% of log(64). The warning is counted
    # batch by batch, so it comes once 128 positions are measured (every 8th of the first
    # ~1024 tokens), not when the one 4000-token document is done.
    import logging

    rng = np.random.default_rng(1)
    prefix = write_dataset(tmp_path / "long", [rng.integers(0, VOCAB, 4000)])
    meta = {"tokenizer": {"fingerprint": "test-vocab", "vocab_size": VOCAB, "kind": "test"}}
    (tmp_path / "long.meta.json").write_text(json.dumps(meta))
    teacher, at = PrefixTeacher(), []

    class Seen(logging.Handler):
        def emit(self, record):
            if "of a uniform guess" in record.getMessage():
                at.append(teacher.calls)

    handler = Seen()
    logging.getLogger("megatron_slkd.teacher.build").addHandler(handler)
    try:
        build_cache(_cfg(prefix, tmp_path / "c"), teacher)
    finally:
        logging.getLogger("megatron_slkd.teacher.build").removeHandler(handler)
    assert len(at) == 1, at  # once
    assert at[0] < 0.4 * teacher.calls, (at, teacher.calls)


def _pipelined_stop(rank, world, prefix, out, how):
    """Both stages of StageTeacher build until the writer (rank 1) fails or is signalled
    on its 4th batch; rank 0's own watch never fires. Both must stop at that batch."""
    import errno

    from megatron_slkd.cache.writer import ShardWriter
    from megatron_slkd.errors import PeerFailedError
    from megatron_slkd.preempt import Preempted

    teacher, watch = StageTeacher(rank), None
    if how == "preempted":
        watch = _WatchAfter(4 if rank == 1 else 10**9)
        want = Preempted
    else:
        commits = [0]
        real = ShardWriter.commit

        def commit(self):
            commits[0] += 1
            if commits[0] > 3:  # the first is at open: fail on the third commit of rows
                raise OSError(errno.ENOSPC, "No space left on device")
            real(self)

        ShardWriter.commit = commit
        want = OSError if rank == 1 else PeerFailedError
    with pytest.raises(want) as got:
        build_cache(_cfg(prefix, out), teacher, watch=watch)
    calls = [None, None]
    torch.distributed.all_gather_object(calls, teacher.calls)
    assert calls[0] == calls[1], calls  # the same batches on both stages, none after the stop
    if how == "preempted":
        assert "committed through document" in str(got.value)
    elif rank == 0:
        assert got.value.exit_status == 2
        assert str(got.value).startswith(
            "the writing process of this model-parallel group (rank 1) failed, so this one "
            f"stops too: writing under {out}: No space left on device (errno 28)"
        ), got.value


@pytest.mark.parametrize("how", ["preempted", "out of space"])
def test_a_pipelined_group_stops_together_when_its_writer_stops(dataset, tmp_path, how):
    # Only the writer touches the shard: its stop (a signal it saw, a write that failed)
    # is agreed at the next batch, so the other stage neither runs on alone nor waits in
    # a collective; what was committed resumes to the cache of an uninterrupted build.
    from megatron_slkd.testing import run_distributed

    prefix, _ = dataset
    build_cache(_cfg(prefix, tmp_path / "one"), PrefixTeacher())
    run_distributed(_pipelined_stop, 2, prefix, str(tmp_path / "pp"), how)
    assert json.loads(next((tmp_path / "pp").glob("*.partial/progress.json")).read_text())["docs"]
    build_cache(_cfg(prefix, tmp_path / "pp"), PrefixTeacher())
    one = {p.name: p.read_bytes() for p in (tmp_path / "one").iterdir()}
    assert {p.name: p.read_bytes() for p in (tmp_path / "pp").iterdir()} == one


def test_a_teacher_saved_without_its_tokenizer_takes_teacher_tokenizer(tiny, tmp_path):
    # `model.save_pretrained(DIR)` alone writes no tokenizer files: the teacher's tokenizer,
    # which must be the data's, then comes from --teacher-tokenizer.
    from helpers import slkd

    from megatron_slkd.data import open_dataset

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(tiny / "model" / name, bare / name)
    prefix = str(tiny / "data")
    common = ["--data-prefix", prefix, "--context-length", "256", "--stride", "128"]
    r = slkd("build-cache", *common, "--teacher", bare, "--output", tmp_path / "c0", check=False)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("slkd build-cache: error: ") and "--teacher-tokenizer" in line, line
    slkd("build-cache", *common, "--teacher", bare, "--teacher-tokenizer", tiny / "model",
         "--output", tmp_path / "bare_cache")  # fmt: skip
    slkd("build-cache", *common, "--teacher", tiny / "model", "--output", tmp_path / "cache")
    got, want = open_cache(tmp_path / "bare_cache"), open_cache(tmp_path / "cache")
    for doc, length in enumerate(open_dataset(prefix).sequence_lengths):
        a, b = got.read(doc, 0, int(length)), want.read(doc, 0, int(length))
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


def test_the_default_window_is_the_teachers_positions_where_it_has_fewer(tiny, tmp_path):
    # The tiny teacher takes 1024 positions (GPT-2's count), fewer than the default 2048
    # window: it gets all of them rather than a refusal to use it without --context-length.
    from helpers import slkd

    from megatron_slkd.cache import Manifest

    config = json.loads((tiny / "model" / "config.json").read_text())
    assert config["max_position_embeddings"] == 1024
    slkd("build-cache", "--data-prefix", tiny / "data", "--teacher", tiny / "model", "--output",
         tmp_path / "cache")  # fmt: skip
    sampling = Manifest.read(tmp_path / "cache").sampling
    assert (sampling["context_length"], sampling["stride"]) == (1024, 512)
    r = slkd("build-cache", "--data-prefix", tiny / "data", "--teacher", tiny / "model",
             "--output", tmp_path / "c2", "--context-length", "2048", check=False)  # fmt: skip
    assert r.returncode == 2 and "--context-length 2048 exceeds the teacher's 1024" in r.stderr


def test_an_unfinished_shard_resumes_only_onto_its_own_tokens(dataset, tmp_path):
    # The dataset at the prefix rewritten between the crash and the rerun: the same
    # document lengths, other tokens. Its resume key held document and token counts only,
    # so the shard finished on a mixture of the two datasets, matching neither.
    from helpers import slkd

    prefix, docs = dataset
    out = tmp_path / "c"
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_cache(_cfg(prefix, out), PrefixTeacher(fail_after=3))
    write_dataset(prefix, [(d + 1) % VOCAB for d in docs])
    with pytest.raises(CacheMismatchError, match=r"unfinished shard .* started on other tokens: "
                                                 r"documents 0\.\.7"):  # fmt: skip
        check_existing_shards(_cfg(prefix, out), None)
    with pytest.raises(CacheMismatchError, match="content.token_xxh128"):  # the writer's own
        build_cache(_cfg(prefix, out), PrefixTeacher())
    # The CLI refuses it before the teacher loads (this one cannot).
    junk = tmp_path / "teacher"
    junk.mkdir()
    (junk / "config.json").write_text("{}")
    r = slkd("build-cache", "--data-prefix", prefix, "--teacher", junk, "--output", out,
             "--context-length", "16", "--stride", "8", check=False)  # fmt: skip
    assert r.returncode == 2 and "started on other tokens" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    # Back on its own tokens, it resumes to an uninterrupted build's bytes.
    write_dataset(prefix, docs)
    build_cache(_cfg(prefix, out), PrefixTeacher())
    build_cache(_cfg(prefix, tmp_path / "clean"), PrefixTeacher())
    name = shard_file_name(0, 1)
    assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
