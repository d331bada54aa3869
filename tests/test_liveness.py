"""Heartbeats between the processes of a group (megatron_slkd.liveness): a silent peer, a
peer that stopped on an error and a lost store each end the watching processes with one
line, across a ring of watchers; peers that beat, that end together, that end before the
others or that stop together on an error they agreed on, never do; a call past its
deadline ends its process and tells the group."""

import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from megatron_slkd.launch import free_port
from megatron_slkd.liveness import PeerWatch


class _Exit:
    """Stands for os._exit: records the status and wakes the test."""

    def __init__(self):
        self.status, self.done = None, threading.Event()

    def __call__(self, status: int) -> None:
        self.status = status
        self.done.set()


def _watch(rank, port, exit, timeout_s=1.0, ranks=(0, 1), grace_s=0.5):
    return PeerWatch(ranks, rank, lambda why: f"slkd test: stopped: {why}", timeout_s=timeout_s,
                     interval_s=0.1, grace_s=grace_s, status=3, exit=exit,
                     address=("127.0.0.1", port), name="test")  # fmt: skip


@pytest.fixture
def store():
    """A store server as rank 0's process would host it, and its port."""
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=30))
    yield server, port


def test_a_silent_peer_ends_the_watcher_with_one_line(store, capfd):
    _, port = store
    mine, theirs = _Exit(), _Exit()
    watch, peer = _watch(0, port, mine).start(), _watch(1, port, theirs).start()
    time.sleep(0.5)
    assert mine.status is None and theirs.status is None  # both beat
    peer._stop.set()  # rank 1 freezes: no more beats, no word of why
    t = time.monotonic()
    assert mine.done.wait(10), "the watcher never noticed"
    waited = time.monotonic() - t
    watch.close()
    peer.close()
    err = capfd.readouterr().err.strip().splitlines()
    assert mine.status == 3 and 0.8 <= waited < 6.0, (mine.status, waited)  # since its last beat
    assert len(err) == 1 and err[0].startswith("slkd test: stopped: rank 1 of this "), err
    assert "has sent no heartbeat for 1 s" in err[0] and "pid" in err[0], err


def test_a_peer_that_stopped_on_an_error_is_quoted_at_once(store, capfd):
    _, port = store
    mine = _Exit()
    watch = _watch(0, port, mine, timeout_s=60).start()
    with pytest.raises(OSError), _watch(1, port, _Exit()):
        time.sleep(0.3)
        raise OSError("writing shard-00000: No space left on device")
    assert mine.done.wait(5), "the watcher waited for the timeout instead"  # 0.5 s of grace
    watch.close()
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [f"slkd test: stopped: rank 1 of this model-parallel group ({_me()}) stopped: "
                   "writing shard-00000: No space left on device"], err  # fmt: skip


def test_peers_that_end_together_do_not_stop_each_other(store):
    _, port = store
    exits = [_Exit(), _Exit()]
    watches = [_watch(r, port, exits[r], timeout_s=2.0).start() for r in (0, 1)]
    time.sleep(1.0)
    for w in watches:
        w.close()
    time.sleep(2.5)
    assert [e.status for e in exits] == [None, None]


def test_a_peer_that_ended_is_not_taken_for_lost_by_one_still_busy(store):
    # Rank 1 is done after the last collective; rank 0 still writes its report for longer
    # than the timeout.
    _, port = store
    exits = [_Exit(), _Exit()]
    watches = [_watch(r, port, exits[r], timeout_s=0.5).start() for r in (0, 1)]
    time.sleep(0.3)
    watches[1].close()
    time.sleep(2.0)
    watches[0].close()
    assert [e.status for e in exits] == [None, None]


def test_an_error_every_rank_raises_together_is_each_ranks_own(store, capfd):
    # Every rank raises the same error after agreeing on it (or is preempted): each
    # reports it itself; none is stopped by the others' word in the store.
    _, port = store
    exits = [_Exit() for _ in range(3)]
    watches = [_watch(r, port, exits[r], ranks=range(3), grace_s=1.0).start() for r in range(3)]
    time.sleep(0.3)
    for w in watches:
        w.close("ConfigError: the same for all")
        time.sleep(0.05)
    time.sleep(1.5)
    assert [e.status for e in exits] == [None] * 3
    assert "slkd test" not in capfd.readouterr().err


def test_a_ring_of_watchers_stops_every_process_with_the_first_reason(store, capfd):
    # Four ranks, each watching the next: rank 2 freezes; rank 1 finds it, says why in
    # the store, and ranks 0 and 3 (which do not watch it) stop with that line.
    _, port = store
    exits = [_Exit() for _ in range(4)]
    watches = [_watch(r, port, exits[r], ranks=range(4)).start() for r in range(4)]
    assert [w.watched for w in watches] == [[1], [2], [3], [0]]
    time.sleep(0.5)
    watches[2]._stop.set()
    for r in (0, 1, 3):
        assert exits[r].done.wait(10), f"rank {r} never stopped"
    for w in watches:
        w.close()
    err = capfd.readouterr().err.strip().splitlines()
    want = f"slkd test: stopped: rank 2 of this model-parallel group ({_me()}) has sent no"
    assert len(err) == 3 and all(ln.startswith(want) for ln in err), err
    assert exits[2].status is None


def test_a_lost_store_ends_the_watcher(capfd):
    port = free_port()
    code = (f"import time, datetime, torch.distributed as d; s = d.TCPStore('127.0.0.1', {port}, "
            "is_master=True, timeout=datetime.timedelta(seconds=30)); print(flush=True); "
            "time.sleep(60)")  # fmt: skip
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        server.stdout.readline()  # listening
        mine = _Exit()
        watch = _watch(1, port, mine, timeout_s=60).start()
        time.sleep(0.3)
        server.kill()
        assert mine.done.wait(10), "the watcher never noticed"
        watch.close()
    finally:
        server.kill()
        server.wait()
    # (torch's own client logs the broken connection first, a C++ warning with a trace)
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("slkd ")]
    assert len(err) == 1 and f"store at 127.0.0.1:{port} (rank 0 or the torchrun agent) " \
        "stopped answering" in err[0], err  # fmt: skip


def _me() -> str:
    import os
    import socket

    return f"host {socket.gethostname()}, pid {os.getpid()}"


def test_a_call_past_its_deadline_ends_the_process_and_tells_the_group(store, capsys):
    from megatron_slkd.liveness import Deadline

    _, port = store
    exits = [_Exit(), _Exit()]
    w0, w1 = (_watch(r, port, exits[r], timeout_s=30.0) for r in (0, 1))
    w0.start(), w1.start()
    stuck = _Exit()
    deadline = Deadline(0.3, "a wait that never ends", "slkd test: stopped: stuck", watch=w0,
                        status=4, exit=stuck)  # fmt: skip
    for _ in range(3):  # calls that end in time, re-armed each time
        with deadline:
            time.sleep(0.1)
    time.sleep(0.5)
    assert stuck.status is None
    with deadline:
        assert stuck.done.wait(5)  # the guarded call is still running
    assert stuck.status == 4
    assert capsys.readouterr().err.splitlines()[-1] == "slkd test: stopped: stuck"
    assert exits[1].done.wait(5) and exits[1].status == 3  # the peer quotes it
    assert "stopped: a wait that never ends" in w1.reason()
    w1.close()
