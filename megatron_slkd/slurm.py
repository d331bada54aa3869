"""Run a Slurm job step so that a job longer than the time limit finishes by itself.

The sbatch scripts ask Slurm for a warning ahead of the time limit and end with

    #SBATCH --signal=B:USR1@300 --requeue --open-mode=append
    exec "$PYTHON" -m megatron_slkd.slurm --name slkd-build -- srun "$PYTHON" -m megatron_slkd ...

so this process *is* the batch shell, the one process ``B:`` signals. It runs the
step as a child and:

- passes SIGUSR1 and SIGTERM on to ``srun``, which passes them to every process of
  the step; ``slkd build-cache`` and ``slkd train`` then stop at a resumable point
  with exit status 75 (:data:`megatron_slkd.preempt.EXIT_PREEMPTED`);
- when the step stopped that way, or ended after SIGUSR1 (the time-limit warning,
  or ``scancel --batch --signal=USR1 JOB`` by hand), requeues the job with
  ``scontrol requeue``: Slurm starts it again and the command resumes where it
  stopped, at most ``--max-requeues`` times (``SLURM_RESTART_COUNT``);
- after SIGTERM alone (``scancel``, preemption) it does not requeue: whoever sent it
  decides (a partition with ``PreemptMode=REQUEUE`` requeues the job itself);
- otherwise exits with the step's status.

Outside a Slurm job (no ``SLURM_JOB_ID``) it only runs the step and passes signals on.

``--block-usr1 -- COMMAND`` is for what runs *inside* the step, in front of a
launcher that would die of SIGUSR1 (the torchrun agent handles SIGTERM only):
it executes COMMAND with SIGUSR1 blocked. A blocked signal is not lost, unlike
an ignored one (``trap "" USR1``, inherited by every process the launcher
starts, discards the warning until a training process has installed its watch):
the training processes inherit the block, and their watch finds the signal
pending however early it came.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from megatron_slkd.preempt import EXIT_PREEMPTED

__all__ = ["exec_with_usr1_blocked", "main", "run_step"]

_FORWARDED = (signal.SIGUSR1, signal.SIGTERM)


def _say(name: str, text: str) -> None:
    print(f"{name}: {text} at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}", flush=True)


def run_step(command: list[str], *, name: str, max_requeues: int) -> int:
    """Run ``command``, pass preemption signals on, requeue when it stopped resumably.

    Returns the exit status for the batch script (0 once a requeue was asked).
    """
    received: list[int] = []
    child = subprocess.Popen(command)

    def forward(signum, frame):
        received.append(signum)
        if child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in _FORWARDED}
    try:
        status = child.wait()  # PEP 475: the wait resumes after each handled signal
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if status < 0:  # killed by a signal: report it the shell's way
        status = 128 - status
    if status == 0:
        _say(name, "done")
        return 0
    warned = signal.SIGUSR1 in received
    if status != EXIT_PREEMPTED and not warned:
        _say(name, f"step failed with exit status {status}")
        return status
    if signal.SIGTERM in received and not warned:
        _say(name, f"step stopped on SIGTERM (exit status {status}); not requeued, whoever "
                   "sent it decides (scancel, or the partition's PreemptMode)")  # fmt: skip
        return status
    job = os.environ.get("SLURM_JOB_ID") or None
    if os.environ.get("SLURM_ARRAY_TASK_ID"):  # the last task's job id names the whole array
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if job is None:
        _say(name, f"step stopped at a resumable point (exit status {status}); not in a Slurm "
                   "job, so nothing to requeue: rerun the same command to resume")  # fmt: skip
        return status
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if restarts >= max_requeues:
        _say(name, f"step stopped at a resumable point after {restarts} requeues, the most "
                   "allowed (--max-requeues); resubmit the job to go on")  # fmt: skip
        return status
    why = "SIGUSR1 (time limit ahead)" if warned else f"exit status {status}"
    _say(name, f"step stopped on {why}; requeueing job {job} (restart {restarts + 1})")
    # Requeueing makes Slurm end this batch shell: everything is said before it.
    requeue = ["scontrol", "requeue", job]
    r = subprocess.run(requeue, capture_output=True, text=True)
    if r.returncode != 0:
        _say(name, f"`{' '.join(requeue)}` failed: {r.stderr.strip()}; resubmit the job to go on")
        return status
    return 0


def exec_with_usr1_blocked(command: list[str]) -> None:
    """Replace this process with ``command``, SIGUSR1 blocked (inherited through exec and
    by every process it starts); does not return."""
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        sys.exit(f"python -m megatron_slkd.slurm: cannot run {command[0]}: {exc.strerror}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m megatron_slkd.slurm",
        description=__doc__.split("\n\n")[0],
        epilog="Example: exec python -m megatron_slkd.slurm --name slkd-train -- srun python "
        "-m megatron_slkd train ...",
    )
    p.add_argument("--name", default="slkd", help="prefix of the log lines (default: slkd)")
    p.add_argument(
        "--max-requeues",
        type=int,
        default=int(os.environ.get("MAX_REQUEUES", "20")),
        help="requeue at most this many times (Slurm's SLURM_RESTART_COUNT); "
        "default: $MAX_REQUEUES or 20",
    )
    p.add_argument(
        "--block-usr1",
        action="store_true",
        help="instead of running a step: exec the command with SIGUSR1 blocked (in front of "
        "torchrun inside a step; its training processes find the signal pending)",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="the step, after `--`")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command to run: give it after `--`")
    if args.block_usr1:
        exec_with_usr1_blocked(command)
    return run_step(command, name=args.name, max_requeues=args.max_requeues)


if __name__ == "__main__":
    sys.exit(main())
