"""Tier 1: owner files: one writer per output, takeover of dead owners, checksummed records."""

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

import pytest

from megatron_slkd.errors import CacheFormatError
from megatron_slkd.ownership import OwnerLock, OwnershipError, claim
from megatron_slkd.records import dump_record, load_record, parse_record


def _owner_file(target, **fields):
    record = {"host": "other-host", "pid": 1, "slurm_job": "4242", "slurm_array_task": "3",
              "since": "2026-11-29T00:00:00+0000", "token": "t", **fields}  # fmt: skip
    path = target.with_name(target.name + ".owner")
    path.write_text(dump_record(record))
    return path


def test_second_claim_is_refused_naming_the_owner(tmp_path):
    target = tmp_path / "shard.slkd"
    with claim(target, what="cache shard"):
        with pytest.raises(OwnershipError) as err:
            claim(target, what="cache shard")
        msg = str(err.value)
        assert f"pid {os.getpid()}" in msg and "since" in msg and "--lock-timeout" in msg
    claim(target, what="cache shard").release()  # free again once released
    assert not (tmp_path / "shard.slkd.owner").exists()


def test_live_owner_on_another_host_is_refused_with_its_slurm_job(tmp_path):
    target = tmp_path / "run"
    _owner_file(target)
    with pytest.raises(OwnershipError, match=r"host other-host pid 1, Slurm job 4242 array task 3"):
        claim(target, what="training run", timeout_s=60)


def test_dead_owners_are_taken_over_and_logged(tmp_path, caplog):
    target = tmp_path / "out"
    # Same host, a pid that has exited.
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                       capture_output=True, text=True)  # fmt: skip
    import socket

    _owner_file(target, host=socket.gethostname(), pid=int(p.stdout))
    with caplog.at_level("WARNING", logger="megatron_slkd.ownership"):
        lock = claim(target, what="merge output")
    assert "that process has exited" in caplog.text
    lock.release()
    # Another host, heartbeat older than the timeout.
    path = _owner_file(target)
    old = time.time() - 120
    os.utime(path, (old, old))
    claim(target, what="merge output", timeout_s=60).release()
    # A file cut short by a crash: refused while young, taken over once old.
    path.write_text('{"host": "x", "pi')
    with pytest.raises(OwnershipError, match="being written"):
        claim(target, what="merge output", timeout_s=60)
    os.utime(path, (old, old))
    claim(target, what="merge output", timeout_s=60).release()


def test_heartbeat_keeps_the_claim_fresh_and_detects_a_takeover(tmp_path):
    target = tmp_path / "shard"
    # Heartbeat every timeout/4 = 0.5 s; generous margins, as the machine may be busy.
    lock = claim(target, what="cache shard", timeout_s=2.0)
    time.sleep(2.5)
    age = time.time() - lock.path.stat().st_mtime
    assert age < 2.0  # refreshed by the heartbeat, so nobody may take it over
    with pytest.raises(OwnershipError):
        claim(target, what="cache shard", timeout_s=2.0)
    lock.check()
    _owner_file(target, token="someone-else")  # what a takeover leaves behind
    time.sleep(1.5)
    with pytest.raises(OwnershipError, match="lost its ownership .*taken over by host other-host"):
        lock.check()
    lock.release()
    assert lock.path.exists()  # not ours any more: left to its owner


def _race(target, barrier, results):
    barrier.wait()
    try:
        lock = OwnerLock(target, what="race").acquire()
        results.put("won")
        time.sleep(0.5)
        lock.release()
    except OwnershipError:
        results.put("refused")


def test_concurrent_claims_have_exactly_one_winner(tmp_path):
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(tmp_path / "t", barrier, results)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    got = sorted(results.get(timeout=5) for _ in procs)
    assert got == ["refused"] * 5 + ["won"]


def test_records_carry_a_checksum(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(dump_record({"a": 1, "b": [1, 2], "name": "x"}))
    assert load_record(path, CacheFormatError)["b"] == [1, 2]
    d = json.loads(path.read_text())
    d["name"] = "y"  # an edit that leaves valid JSON
    path.write_text(json.dumps(d))
    with pytest.raises(CacheFormatError, match=r"r\.json: checksum mismatch"):
        load_record(path, CacheFormatError)
    path.write_text(dump_record({"a": 1})[:-6])  # truncated
    with pytest.raises(CacheFormatError, match=r"r\.json: damaged or truncated record"):
        load_record(path, CacheFormatError)
    assert parse_record('{"old": true}', "old.json", CacheFormatError) == {"old": True}
