"""Graceful preemption: SIGTERM and SIGUSR1 end long commands at a resumable point.

Slurm sends SIGTERM at preemption and ``scancel``, and SIGUSR1 (or any signal
asked with ``--signal=B:USR1@SECONDS``) ahead of the time limit. A command
that watches for them (:class:`PreemptionWatch`) finishes what it is doing,
makes its progress durable (``build-cache`` commits the shard, ``slkd train``
finishes the step and saves a checkpoint), says so in one log line, and exits
with status :data:`EXIT_PREEMPTED` (75, EX_TEMPFAIL), which the sbatch scripts
answer with ``scontrol requeue`` (:mod:`megatron_slkd.slurm`). Rerunning the
same command resumes. The ``slkd`` entry point installs a watch for those two
commands before anything heavy is imported, so an early signal is not fatal.

The other commands are short, or (``merge-cache``, ``thin-cache``,
``remap-cache``, ``prepare-data``) resume by rerunning whatever state they were
stopped in. Under :func:`stopped_by_sigterm` a SIGTERM raises
:class:`Preempted` where they are: their cleanups run (claims released, partial
files removed), one line is printed, and the status is 75 too.
"""

from __future__ import annotations

import contextlib
import signal
import threading

from megatron_slkd.errors import EXIT_PREEMPTED, Preempted

__all__ = ["EXIT_PREEMPTED", "Preempted", "PreemptionWatch", "stopped_by_sigterm"]

_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker now, while the watch installs.

    CPython's ``resource_tracker.ensure_running`` unblocks SIGINT and SIGTERM after
    launching the tracker, whatever the mask was. Launched later (megatron-core's
    checkpoint writer starts a ``spawn`` manager, which starts it), every process
    started after it (that manager, loader workers) would die of Slurm's SIGTERM
    mid-save. The tracker ignores SIGTERM itself, and inherits the block of SIGUSR1.
    """
    from multiprocessing import resource_tracker

    try:
        resource_tracker.ensure_running()
    except OSError:  # no tracker (a file-descriptor limit, a sandbox): the block still holds
        pass


class PreemptionWatch:
    """Records SIGTERM / SIGUSR1 instead of dying on them (while installed).

    ``signal`` is the name of the first signal received (None before any).
    Install from the main thread; elsewhere it is a no-op watch that never fires.

    Slurm signals every process of a job step, and the helpers a run starts
    (data-loader workers, megatron-core's checkpoint writer processes) would die
    of them mid-save. So the watch also *blocks* the two signals in the main
    thread: processes and threads started from it inherit the block, and the
    signal stays pending there while this process finishes its step; it is read
    with ``sigpending``. A signal delivered to another thread runs the handler.
    """

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict = {}
        self._mask: set | None = None

    def install(self) -> PreemptionWatch:
        if threading.current_thread() is not threading.main_thread():
            return self
        outer = getattr(signal.getsignal(_SIGNALS[0]), "__self__", None)
        if isinstance(outer, PreemptionWatch) and self.signal is None:
            self.signal = outer.signal  # a watch from the start of the command saw it first
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        _start_resource_tracker()  # with SIGUSR1 blocked, which it inherits
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)  # it lifted the block of SIGTERM
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is None:
            self.signal = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        if self._mask is not None:
            signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)  # again, should anything lift it
            pending = signal.sigpending() & set(_SIGNALS) if self.signal is None else set()
            if pending:
                info = signal.sigtimedwait(pending, 0)  # take it: it is handled here
                if info is not None:
                    self._handle(info.si_signo, None)
        return self.signal is not None

    def restore(self) -> None:
        if self._mask is not None:  # a signal still pending reaches the handler, not a default
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
            self._mask = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> PreemptionWatch:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()


@contextlib.contextmanager
def stopped_by_sigterm(what: str):
    """Within it, SIGTERM raises :class:`Preempted` in the main thread (``what``: the
    command, for the message). Its default action killed the process on the spot: a
    claim left behind refused the requeued job on another node for ``--lock-timeout``,
    and partial files stayed until a rerun. A second SIGTERM while the first is handled
    is ignored, so the cleanups finish (Slurm sends SIGKILL after its KillWait anyway).
    Outside the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Preempted(
            f"{what} stopped by {signal.Signals(signum).name} before it finished; what it "
            "had finished is kept: rerun the same command to go on"
        )

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
