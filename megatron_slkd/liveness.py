"""Heartbeats between the processes of a group (a teacher's model-parallel group, a
training run), so that a process whose peer died or hangs stops with one line instead of
waiting in a collective.

When a process is killed (the out-of-memory killer, a lost node, ``kill -9``) or hangs,
the others wait for it in their next collective. Under ``srun`` nothing stops them: NCCL
gives up only at its timeout (10 minutes by default), with a C++ abort; gloo fails at once
with a traceback. Each process of the group adds to a counter of its own in the launch's
key-value store (the one ``torch.distributed`` rendezvoused through, at
``MASTER_ADDR:MASTER_PORT``) every ``interval_s`` from a daemon thread, and reads the
counter of the next rank of the group (the ranks form a ring, so each is watched by one
other and the store's load grows with the group, not its square). A peer whose counter
has not moved for ``timeout_s`` is lost: its watcher writes why to the group's ``stop``
key, which every process reads at each beat, and stops. A process that stops on an error
of its own writes that error there first, so the others quote the root cause at once
instead of waiting out the timeout. A store that stopped answering (its host, rank 0 or
the torchrun agent, is gone) is lost too. Stopping is one line on stderr naming the rank,
host and pid, then ``os._exit`` with the given status, since the main thread may be
blocked inside a collective that no exception can reach. What was committed stays;
running the same command again resumes.

A peer that is alive but slow (a long checkpoint load, a stalled file system) keeps
beating from its thread, so it is never taken for dead; a stopped process (``SIGSTOP``)
or a frozen machine is. A process that ends normally says so (``done``), so a peer
still busy after the group's last collective (writing a report) is not taken for lost
by the rank that watches it; a process that read the group's reason to stop says so
too, and a process that stops on its own error waits (a beat at most) for that before it
exits, since the store may be its own. Store keys, under ``slkd-liveness/NAME/``:
``who/R`` (host and pid), ``beat/R`` (the counter), ``done/R`` (ended, or has the
word), and ``stop`` (the first reason).

A process that hangs while its heartbeat thread goes on (its main thread blocked where no
exception or timeout reaches) is not found by its peers; a :class:`Deadline` around such a
call ends it the same way, and gives its reason to the group.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta

from megatron_slkd.errors import PeerFailedError, first_line

# What torch's TCPStore raises when its host (rank 0, or the torchrun agent) is gone:
# DistStoreError and DistNetworkError (RuntimeError), the socket's OSError (timeouts
# included), and ValueError for a value cut short (decode).
_STORE_GONE = (RuntimeError, OSError, ValueError)

__all__ = ["Deadline", "PeerWatch", "peer_failure", "peer_gone", "stop_line", "watching"]

_log = logging.getLogger(__name__)
_watches = 0  # watches started by this process


def _end(status: int) -> None:
    """End this process now, whatever its main thread is doing, and its helper processes
    with it (loader workers, megatron-core's checkpoint writer): ``os._exit`` runs no exit
    handler, and they would outlive it, orphaned."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.kill()
    os._exit(status)


def _here() -> str:
    return f"host {socket.gethostname()}, pid {os.getpid()}"


class PeerWatch:
    """Heartbeats of ``ranks`` (global ranks, this one among them) in the launch's store.

    Args:
        ranks: the global ranks of the group; this process beats for its own and watches
            the next one's (the last rank watches the first).
        rank: this process's global rank.
        stop_line: called with the reason when the group is lost; returns the line to
            print (the command's usual ``slkd CMD: stopped: ...`` form).
        what: how the reason names the group (``rank 3 of this run``).
        timeout_s: seconds without a beat before a peer counts as lost.
        interval_s: seconds between beats (None: a sixth of the timeout, 0.2 to 5 s).
        grace_s: how long a process waits, once a peer has written a reason to stop,
            for its own main thread to end the watch: errors that every rank raises
            together (agreed after a collective, a preemption) reach them all within
            moments, and each then reports its own.
        status: exit status of a process that stops because of a lost peer.
        exit: called with ``status`` after the line is printed (None: :func:`_end`; tests
            replace it).
        address: the store's (host, port); None: ``MASTER_ADDR`` and ``MASTER_PORT``.
        name: the store keys' namespace, the same for every process of the group; None:
            the torchrun restart, how many watches this process has started, and the
            group's first rank (groups of one launch never share a ``stop`` key).
    """

    def __init__(
        self,
        ranks: Sequence[int],
        rank: int,
        stop_line: Callable[[str], str],
        *,
        what: str = "this model-parallel group",
        timeout_s: float = 60.0,
        interval_s: float | None = None,
        grace_s: float = 2.0,
        status: int = 1,
        exit: Callable[[int], None] | None = None,
        address: tuple[str, int] | None = None,
        name: str | None = None,
    ) -> None:
        group = sorted(set(ranks) | {rank})
        self.ranks = group
        self.rank = rank
        nxt = group[(group.index(rank) + 1) % len(group)]
        self.watched = [] if nxt == rank else [nxt]
        self.stop_line = stop_line
        self.what = what
        self.timeout_s = float(timeout_s)
        self.interval_s = interval_s or max(0.2, min(5.0, self.timeout_s / 6))
        self.grace_s = grace_s
        self.status = status
        self.exit = exit or _end
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._store = None
        self._reason: str | None = None
        self.address = address
        self.name = name

    def start(self) -> PeerWatch:
        """Connect to the store, beat once, and watch from a daemon thread (no-op alone)."""
        if not self.watched:
            return self
        import torch.distributed as dist

        addr, port = self.address or (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
        self._where = f"{addr}:{port}"
        # Keys of an earlier watch of this launch (a torchrun restart, a build resumed in
        # the same processes) must not be read as this one's: every rank makes its
        # watches in the same order, so the count names the same watch everywhere
        # (counted before connecting, so a rank that cannot connect keeps counting).
        global _watches
        _watches += 1
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        name = self.name or f"{attempt}/{_watches}/{self.ranks[0]}"
        try:
            # A client of its own: the watch thread never shares a connection with the
            # main thread's collectives and barriers.
            base = dist.TCPStore(addr, port, is_master=False, timeout=timedelta(seconds=30))
            self._store = dist.PrefixStore(f"slkd-liveness/{name}/", base)
            self._store.set(f"who/{self.rank}", _here())
            self._store.add(f"beat/{self.rank}", 1)
        except Exception as exc:  # the work can go on; only the early stop is lost
            _log.warning("no heartbeats between the processes of %s (store %s: %s): a lost "
                         "peer is found only at the collective's timeout", self.what,
                         self._where, first_line(exc, type(exc).__name__))  # fmt: skip
            self._store = None
            return self
        self._thread = threading.Thread(target=self._run, name="slkd-peer-watch", daemon=True)
        self._thread.start()
        return self

    def close(self, failure: str | None = None) -> None:
        """Stop beating and watching: this process is done with the group's collectives,
        or, with ``failure`` (one line), it stops on an error, which the others then quote
        as they stop at their next beat instead of waiting out the timeout. A failing
        process waits (at most a beat interval and a second) until every other has read
        its word or ended too: where it hosts the store (rank 0 under srun), its exit
        would take the word with it."""
        with self._lock:  # a stop line being printed is this process's last word
            self._stop.set()
        if self._store is not None:
            try:
                if failure is not None:
                    self._announce(f"{self._name(self.rank)} stopped: {failure}")
                self._store.set(f"done/{self.rank}", "1")
                if failure is not None:
                    others = [f"done/{r}" for r in self.ranks if r != self.rank]
                    deadline = time.monotonic() + self.interval_s + 1.0
                    while not self._store.check(others) and time.monotonic() < deadline:
                        time.sleep(0.05)
            except _STORE_GONE:
                pass  # the peers fall back on the heartbeat's timeout
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval_s + self.grace_s + 30)
            self._thread = None

    def reason(self) -> str | None:
        """Why the group stopped, as the first process to stop wrote it (None: no word)."""
        if self._store is not None:
            self._reason = self._read("stop") or self._reason
        return self._reason

    def __enter__(self) -> PeerWatch:
        return self.start()

    def __exit__(self, kind, exc, tb) -> None:
        from megatron_slkd.preempt import EXIT_PREEMPTED

        # A preemption stops every rank together, with its progress saved: not a failure.
        ended = exc is None or getattr(exc, "exit_status", None) == EXIT_PREEMPTED
        self.close(None if ended else first_line(exc, type(exc).__name__))

    def _run(self) -> None:
        seen = {p: (-1, time.monotonic()) for p in self.watched}  # last count, when it moved
        while not self._stop.wait(self.interval_s):
            try:
                self._store.add(f"beat/{self.rank}", 1)
                counts = {p: self._store.add(f"beat/{p}", 0) for p in self.watched}
                reason = self._store.get("stop").decode() if self._store.check(["stop"]) else None
            except _STORE_GONE as exc:  # the store's host is gone
                self._lose(
                    f"the launch's key-value store at {self._where} (rank 0 or the torchrun "
                    f"agent) stopped answering ({first_line(exc, type(exc).__name__)}): that "
                    "process is gone"
                )
                return
            if reason is not None:
                self._reason = reason  # kept: the store's host may be the one stopping
                try:
                    self._store.set(f"done/{self.rank}", "1")  # word received
                except _STORE_GONE:
                    pass  # the word was for the others' grace only: this process stops anyway
                if not self._stop.wait(self.grace_s):  # not a stop this process makes too
                    self._lose(reason)
                return
            now = time.monotonic()
            for p, count in counts.items():
                if count != seen[p][0]:
                    seen[p] = (count, now)
                elif now - seen[p][1] > self.timeout_s and self._read(f"done/{p}") is None:
                    why = (f"{self._name(p)} has sent no heartbeat for {now - seen[p][1]:.0f} "
                           "s: it was killed, or it or its machine hangs")  # fmt: skip
                    try:  # the others learn it at their next beat
                        self._announce(why)
                    except _STORE_GONE:
                        pass  # then they learn it from their own heartbeat timeout
                    self._lose(why)
                    return

    def _announce(self, reason: str) -> None:
        """Write ``reason`` to the group's ``stop`` key, unless a first reason is there."""
        self._store.compare_set("stop", "", reason)

    def _read(self, key: str) -> str | None:
        """The value at ``key``, or None when it is not there (or the store is gone)."""
        try:
            if self._store.check([key]):  # get() would wait for a missing key
                return self._store.get(key).decode()
        except _STORE_GONE:
            pass  # documented: None when the store is gone
        return None

    def _name(self, rank: int) -> str:
        who = _here() if rank == self.rank else self._read(f"who/{rank}")
        return f"rank {rank} of {self.what} ({who or 'host and pid unknown'})"

    def _lose(self, reason: str) -> None:
        with self._lock:
            if self._stop.is_set():  # the main thread got there first, with its own error
                return
            sys.stderr.write(self.stop_line(reason) + "\n")
            sys.stderr.flush()
            self.exit(self.status)


class Deadline:
    """A time limit on calls that can block where no exception or timeout reaches them.

    ``with deadline:`` guards one call. When it has run ``seconds``, a daemon thread gives
    ``reason`` to ``watch``'s group (where there is one: the others quote it and stop),
    writes ``line`` to stderr, and ends this process with its helper processes (status
    ``status``): its main thread cannot be interrupted. One thread per deadline, started
    by the first guarded call.
    """

    def __init__(self, seconds: float, reason: str, line: str, *, watch: PeerWatch | None = None,
                 status: int = 1, exit: Callable[[int], None] | None = None) -> None:  # fmt: skip
        self.seconds = float(seconds)
        self.reason, self.line, self.watch, self.status = reason, line, watch, status
        self.exit = exit or _end
        self._cv = threading.Condition()
        self._due: float | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Deadline:
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="slkd-deadline",
                                                daemon=True)  # fmt: skip
                self._thread.start()
            self._due = time.monotonic() + self.seconds
            self._cv.notify()
        return self

    def __exit__(self, *exc) -> None:
        with self._cv:
            self._due = None
            self._cv.notify()

    def _run(self) -> None:
        with self._cv:
            while self._due is None or self._due > time.monotonic():
                self._cv.wait(None if self._due is None else self._due - time.monotonic())
        if self.watch is not None:
            self.watch.close(self.reason)
        sys.stderr.write(self.line + "\n")
        sys.stderr.flush()
        self.exit(self.status)


def peer_gone(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective's report of a peer that went away (gloo fails at
    once: a traceback, then often an abort at exit)."""
    import torch.distributed as dist

    text = str(exc)
    return isinstance(exc, getattr(dist, "DistNetworkError", ())) or (
        isinstance(exc, RuntimeError)
        and any(s in text for s in ("Connection closed by peer", "Connection reset by peer",
                                    "Broken pipe"))  # fmt: skip
    )


def peer_failure(exc: BaseException, watch: PeerWatch, then: str) -> PeerFailedError | None:
    """``exc`` as a :class:`PeerFailedError` (exit status 1) when :func:`peer_gone`, else
    None. The message is the group's reason to stop where a process wrote one (its own
    error, or a lost peer it found), else gloo's words; then ``then``."""
    if not peer_gone(exc):
        return None
    reason = watch.reason() or (
        f"a process of {watch.what} stopped (its own log says why): {first_line(exc)}"
    )
    return PeerFailedError(_then(reason, then), 1)


@contextlib.contextmanager
def watching(watch: PeerWatch, then: str,
             typed: Callable[[BaseException], Exception | None] = lambda exc: None):  # fmt: skip
    """Run the body under ``watch``. An error it raises is typed before the watch closes
    (``typed(exc)``, else :func:`peer_failure` with ``then``), so the word the others read
    from the store is the typed one."""
    with watch:
        try:
            yield watch
        except BaseException as exc:
            error = typed(exc) or peer_failure(exc, watch, then)
            if error is None:
                raise
            raise error from None


def stop_line(command: str, then: str) -> Callable[[str], str]:
    """A :class:`PeerWatch` ``stop_line`` for ``slkd COMMAND``: the reason, then ``then``
    (what was kept, how to go on)."""
    return lambda reason: (
        f"slkd {command}: stopped: "
        + _then(f"{reason}; this process stops rather than wait for it in a collective", then)
    )


def _then(reason: str, then: str) -> str:
    """``reason``, then ``then`` unless the reason (a peer's own error) already says how to
    go on."""
    return reason if "the same command" in reason else f"{reason}; {then}"
