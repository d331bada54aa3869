"""megatron_slkd.slurm, the batch shell of the sbatch scripts: signals passed on to the
step, requeue decisions, against a fake step and a fake `scontrol` (the real cluster
is in tests/system/test_slurm.py)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The step: says it is ready, then exits 75 on USR1/TERM (what slkd does), or with
# the status given on its command line when no signal comes.
STEP = """
import signal, sys, time
def stop(signum, frame):
    print("step got", signal.Signals(signum).name, flush=True)
    sys.exit(75)
signal.signal(signal.SIGUSR1, stop)
signal.signal(signal.SIGTERM, stop)
open(sys.argv[1], "w").close()
time.sleep(float(sys.argv[2]))
sys.exit(int(sys.argv[3]))
"""


@pytest.fixture
def bench(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    scontrol = fake / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.calls\n')
    scontrol.chmod(0o755)
    (tmp_path / "step.py").write_text(STEP)
    return tmp_path


def _run(bench, *, sleep=30.0, status=0, send=None, env=None):
    ready = bench / "ready"
    ready.unlink(missing_ok=True)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
        "PATH": f"{bench / 'bin'}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        **(env or {}),
    }
    cmd = [sys.executable, "-m", "megatron_slkd.slurm", "--name", "t", "--",
           sys.executable, str(bench / "step.py"), str(ready), str(sleep), str(status)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    if send is not None:
        deadline = time.time() + 30
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(send)
    out, _ = proc.communicate(timeout=60)
    calls = bench / "scontrol.calls"
    return proc.returncode, out, calls.read_text() if calls.exists() else ""


def test_time_limit_warning_is_passed_on_and_the_job_requeued(bench):
    rc, out, calls = _run(bench, send=signal.SIGUSR1)
    assert rc == 0, out
    assert "step got SIGUSR1" in out
    assert "t: step stopped on SIGUSR1 (time limit ahead); requeueing job 4242 (restart 1)" in out
    assert calls == "requeue 4242\n"


def test_resumable_stop_without_warning_requeues_too(bench):
    rc, out, calls = _run(bench, sleep=0, status=75, env={"SLURM_RESTART_COUNT": "3"})
    assert rc == 0 and calls == "requeue 4242\n", out
    assert "on exit status 75; requeueing job 4242 (restart 4)" in out


def test_sigterm_is_passed_on_but_not_requeued(bench):
    rc, out, calls = _run(bench, send=signal.SIGTERM)
    assert rc == 75 and calls == "", out
    assert "step got SIGTERM" in out and "not requeued" in out


def test_success_and_failure_keep_their_status(bench):
    rc, out, calls = _run(bench, sleep=0, status=0)
    assert rc == 0 and "t: done" in out and calls == ""
    rc, out, calls = _run(bench, sleep=0, status=3)
    assert rc == 3 and "step failed with exit status 3" in out and calls == ""


def test_requeues_stop_at_the_limit(bench):
    rc, out, calls = _run(bench, send=signal.SIGUSR1, env={"SLURM_RESTART_COUNT": "20"})
    assert rc == 75 and calls == "", out
    assert "after 20 requeues, the most allowed" in out


def test_outside_slurm_nothing_is_requeued(bench):
    rc, out, calls = _run(bench, sleep=0, status=75, env={"SLURM_JOB_ID": ""})
    assert rc == 75 and calls == "", out
    assert "not in a Slurm job" in out


def test_sbatch_scripts_ask_for_the_warning_and_requeue():
    for name in ("build_cache.sbatch", "pretrain_student.sbatch"):
        text = (Path(__file__).resolve().parents[1] / "slurm" / name).read_text()
        for line in ("#SBATCH --signal=B:USR1@", "#SBATCH --requeue", "#SBATCH --open-mode=append"):
            assert line in text, (name, line)
        assert "-m megatron_slkd.slurm --name" in text, name


def test_an_array_task_requeues_itself_only(bench):
    # Slurm gives the array's last task the array's own job id: `scontrol requeue 31`
    # would requeue every task of array 31.
    env = {"SLURM_JOB_ID": "31", "SLURM_ARRAY_JOB_ID": "31", "SLURM_ARRAY_TASK_ID": "1"}
    rc, out, calls = _run(bench, sleep=0, status=75, env=env)
    assert rc == 0 and calls == "requeue 31_1\n", out
