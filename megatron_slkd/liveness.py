"""Heartbeats between the processes of one model-parallel group, so that a process whose
peer died stops with one line instead of waiting in a collective.

When a process of a tensor- or pipeline-parallel group is killed (the out-of-memory
killer, a lost node, ``kill -9``), the others wait for it in their next collective.
Under ``srun`` nothing stops them: NCCL gives up only at its timeout (10 minutes by
default), with a C++ abort; gloo fails at once with a traceback. Each process of the
group adds to a counter of its own in the launch's key-value store (the one
``torch.distributed`` rendezvoused through, at ``MASTER_ADDR:MASTER_PORT``) every
``interval_s`` from a daemon thread, and reads the others'. A peer whose counter has not
moved for ``timeout_s``, or a store that stopped answering (its host, rank 0 or the
torchrun agent, is gone), ends this process: one line on stderr naming the peer's rank,
host and pid, then ``os._exit`` with the given status, since the main thread may be
blocked inside a collective that no exception can reach. What was committed stays;
running the same command again resumes.

A peer that is alive but slow (a long checkpoint load, a stalled file system) keeps
beating from its thread, so it is never taken for dead; a stopped process (``SIGSTOP``)
or a frozen machine is.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta

from megatron_slkd.errors import first_line

__all__ = ["PeerWatch"]

_log = logging.getLogger(__name__)
_watches = 0  # watches started by this process


class PeerWatch:
    """Heartbeats of ``ranks`` (global ranks, this one among them) in the launch's store.

    Args:
        ranks: the global ranks of the group; this process beats for its own and reads
            the others'.
        rank: this process's global rank.
        stop_line: called with the reason when a peer is lost; returns the line to print
            (the command's usual ``slkd CMD: error: ...`` form).
        timeout_s: seconds without a beat before a peer counts as lost.
        interval_s: seconds between beats.
        status: exit status of a process that stops because of a lost peer.
        exit: called with ``status`` after the line is printed (``os._exit``; tests
            replace it).
        address: the store's (host, port); None: ``MASTER_ADDR`` and ``MASTER_PORT``.
        name: the store keys' namespace, the same for every process of the group; None:
            the torchrun restart and how many watches this process has started.
    """

    def __init__(
        self,
        ranks: Sequence[int],
        rank: int,
        stop_line: Callable[[str], str],
        *,
        timeout_s: float = 60.0,
        interval_s: float | None = None,
        status: int = 1,
        exit: Callable[[int], None] = os._exit,
        address: tuple[str, int] | None = None,
        name: str | None = None,
    ) -> None:
        self.peers = [r for r in ranks if r != rank]
        self.rank = rank
        self.stop_line = stop_line
        self.timeout_s = float(timeout_s)
        self.interval_s = interval_s or max(0.2, min(5.0, self.timeout_s / 6))
        self.status = status
        self.exit = exit
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._store = None
        self.address = address
        self.name = name

    def start(self) -> PeerWatch:
        """Connect to the store, beat once, and watch from a daemon thread (no-op alone)."""
        if not self.peers:
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
        name = self.name or f"{attempt}/{_watches}"
        try:
            # A client of its own: the watch thread never shares a connection with the
            # main thread's collectives and barriers.
            base = dist.TCPStore(addr, port, is_master=False, timeout=timedelta(seconds=30))
            self._store = dist.PrefixStore(f"slkd-liveness/{name}/", base)
            me = f"host {socket.gethostname()}, pid {os.getpid()}"
            self._store.set(f"who/{self.rank}", me)
            self._store.add(f"beat/{self.rank}", 1)
        except Exception as exc:  # the work can go on; only the early stop is lost
            _log.warning("no heartbeats between the group's processes (store %s: %s): a lost "
                         "peer is found only at the collective's timeout", self._where,
                         first_line(exc, type(exc).__name__))  # fmt: skip
            return self
        self._thread = threading.Thread(target=self._run, name="slkd-peer-watch", daemon=True)
        self._thread.start()
        return self

    def close(self, failure: str | None = None) -> None:
        """Stop beating and watching: the group is done with its collectives, or, with
        ``failure`` (one line), this process stops on an error, which its peers then
        quote as they stop at their next look instead of waiting out the timeout."""
        with self._lock:  # a stop line being printed is this process's last word
            self._stop.set()
        if failure is not None and self._store is not None:
            try:
                self._store.set(f"gone/{self.rank}", failure)
            except Exception:
                pass  # the peers fall back on the heartbeat's timeout
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval_s + 30)
            self._thread = None

    def __enter__(self) -> PeerWatch:
        return self.start()

    def __exit__(self, kind, exc, tb) -> None:
        self.close(None if exc is None else first_line(exc, type(exc).__name__))

    def _run(self) -> None:
        seen = {p: (-1, time.monotonic()) for p in self.peers}  # last count, when it moved
        while not self._stop.wait(self.interval_s):
            try:
                self._store.add(f"beat/{self.rank}", 1)
                counts = {p: self._store.add(f"beat/{p}", 0) for p in self.peers}
            except Exception as exc:  # the store's host is gone
                if self._stop.is_set():
                    return
                self._lose(
                    f"the launch's key-value store at {self._where} (rank 0 or the torchrun "
                    f"agent) stopped answering ({first_line(exc, type(exc).__name__)}): that "
                    "process is gone"
                )
                return
            now = time.monotonic()
            for p, count in counts.items():
                if count != seen[p][0]:
                    seen[p] = (count, now)
                    continue
                if self._stop.is_set():
                    return
                failure = self._read(f"gone/{p}")
                if failure is not None:
                    self._lose(f"rank {p} of this model-parallel group ({self._who(p)}) "
                               f"stopped: {failure}")  # fmt: skip
                    return
                if now - seen[p][1] > self.timeout_s:
                    self._lose(
                        f"rank {p} of this model-parallel group ({self._who(p)}) has sent no "
                        f"heartbeat for {now - seen[p][1]:.0f} s: it was killed, or it or its "
                        "machine hangs"
                    )
                    return

    def _read(self, key: str) -> str | None:
        """The value at ``key``, or None when it is not there (or the store is gone)."""
        try:
            if self._store.check([key]):  # get() would wait for a missing key
                return self._store.get(key).decode()
        except Exception:
            pass
        return None

    def _who(self, peer: int) -> str:
        return self._read(f"who/{peer}") or "host and pid unknown"

    def _lose(self, reason: str) -> None:
        with self._lock:
            if self._stop.is_set():  # the main thread got there first, with its own error
                return
            sys.stderr.write(self.stop_line(reason) + "\n")
            sys.stderr.flush()
            self.exit(self.status)
