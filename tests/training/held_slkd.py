"""``slkd`` with its training loop held right after one step's progress line.

    python tests/training/held_slkd.py STEP train ...

After printing ``step STEP/...`` the run waits (at most 120 s) until SIGTERM or SIGUSR1
is pending or recorded by its preemption watch, then goes on to its end-of-step check.
A test that signals the run on reading that line so knows the step at which it is
signalled, however slow the machine: a small student's steps take 50 ms each, and a
test process descheduled for a few of them on a loaded machine used to signal a run
that had already finished. A run killed (SIGKILL) while held dies at that step.
"""

import signal
import sys
import time

from megatron_slkd.cli import main
from megatron_slkd.training import loop

_SIGNALS = {signal.SIGTERM, signal.SIGUSR1}


def _signalled() -> bool:
    watch = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return bool(signal.sigpending() & _SIGNALS) or getattr(watch, "signal", None) is not None


def _held(log, step: str):
    def log_then_wait(*args) -> None:
        log(*args)
        if args and str(args[0]).startswith(f"step {step}/"):
            deadline = time.monotonic() + 120
            while not _signalled() and time.monotonic() < deadline:
                time.sleep(0.01)

    return log_then_wait


if __name__ == "__main__":
    loop._log0 = _held(loop._log0, sys.argv.pop(1))
    sys.exit(main())
