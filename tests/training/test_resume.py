"""Checkpoints: a resumed run logs bitwise the losses of an uninterrupted one.

The CLI run is killed with SIGKILL right after its step-5 line (its last
checkpoint is step 4; none of the processes it started may outlive it), rerun
with the same command, and its JSONL log compared
exactly with a run that was never interrupted. The signalled runs are held at
their step line until the signal is there (``held_slkd.py``), so the step they
stop at is known, however slow the machine. At TP2 the same holds for a
run rolled back to an earlier checkpoint.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import SLKD
from test_layouts import run_layout, train_log

from megatron_slkd.training.checkpoint import latest_checkpoint
from megatron_slkd.training.config import load_config


def _cli_args(prefix, cache, run_dir, steps=12):
    return [
        "train", "--data-path", prefix, "--kd-caches", f"{prefix}={cache}",
        "--data-split", "90,10,0", "--data-index-cache", str(run_dir.parent / "index-cache"),
        "--model-num-layers", "2", "--model-hidden-size", "64", "--model-ffn-hidden-size", "128",
        "--model-seq-length", "64", "--train-steps", str(steps), "--train-micro-batch-size", "2",
        "--train-global-batch-size", "4", "--checkpoint-interval", "4", "--eval-interval", "6",
        "--eval-batches", "1", "--checkpoint-dir", str(run_dir), "--data-num-workers", "1",
    ]  # fmt: skip


def _held_at(step: int) -> list[str]:
    """``slkd``, held after its ``step``'s line until it is signalled (see held_slkd.py)."""
    return [sys.executable, str(Path(__file__).with_name("held_slkd.py")), str(step)]


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in train_log(run_dir)}


def _left_in_session(sid: int) -> list[str]:
    """The command lines of the live processes of session ``sid``."""
    left = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, _, session = stat.read_text().rsplit(")", 1)[1].split()[:4]
            if int(session) == sid and state != "Z":
                left.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, ValueError):  # ended meanwhile
            continue
    return left


@pytest.mark.slow
def test_sigkill_and_resume_is_bitwise(markov, tmp_path):
    prefix, cache = markov
    env = dict(os.environ, OMP_NUM_THREADS="1")
    whole = tmp_path / "whole"
    subprocess.run([*SLKD, *_cli_args(prefix, cache, whole)], check=True, env=env,
                   capture_output=True)  # fmt: skip

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*_held_at(5), *_cli_args(prefix, cache, killed)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("step 5/12"):
                os.kill(proc.pid, signal.SIGKILL)  # the process alone, as no launcher is there
                break
        proc.wait()
        # Nothing it started lives on (megatron-core's checkpoint writer keeps a Manager
        # server process, started with spawn: it used to, reparented, for ever).
        deadline, left = time.time() + 20, _left_in_session(proc.pid)
        while left and time.time() < deadline:
            time.sleep(0.2)
            left = _left_in_session(proc.pid)
        assert not left, left
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    assert latest_checkpoint(killed).name == "iter_0000004"
    assert max(_losses(killed)) < 12

    r = subprocess.run([*SLKD, *_cli_args(prefix, cache, killed)], env=env, text=True,
                       capture_output=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "at step 4" in r.stdout
    assert _losses(killed) == _losses(whole)  # bitwise: floats compared exactly
    assert list((whole / "tensorboard").glob("events.out.tfevents.*"))
    saved = load_config(killed / "config.yaml")  # the resolved config, loadable as is
    assert saved.model.num_layers == 2 and saved.checkpoint.dir == str(killed)
    evals = lambda d: [(e["step"], e["lm_loss"], e["ece"], e["kl"]) for e in train_log(d, "eval")]  # noqa: E731
    assert evals(killed) == evals(whole)

    # Preemption: SIGUSR1 (Slurm's time-limit warning), then in the resumed run SIGTERM
    # (Slurm's preemption), each to the whole process group, loader workers included: the
    # step finishes, a checkpoint is saved, exit status 75.
    preempted = tmp_path / "preempted"
    step = 0
    for sig, at in ((signal.SIGUSR1, 5), (signal.SIGTERM, 9)):
        proc = subprocess.Popen([*_held_at(at), *_cli_args(prefix, cache, preempted)], env=env,
                                text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)  # fmt: skip
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(f"step {at}/12"):
                os.killpg(proc.pid, sig)
                break
        out, err = proc.communicate(timeout=300)
        out = "".join(seen) + out
        assert proc.returncode == 75, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"slkd train: stopped: preempted by {sig.name} after step"), last
        assert step == 0 or f"at step {step}" in out  # the second run resumed the first's
        step = int(last.split("after step ")[1].split("/")[0])
        assert step == at and latest_checkpoint(preempted).name == f"iter_{step:07d}"
        assert not (preempted / "run.owner").exists()
    r = subprocess.run([*SLKD, *_cli_args(prefix, cache, preempted)], env=env, text=True,
                       capture_output=True)  # fmt: skip
    assert r.returncode == 0 and f"at step {step}" in r.stdout, r.stderr[-3000:]
    assert _losses(preempted) == _losses(whole)
    assert evals(preempted) == evals(whole)


def test_resume_at_tp2_is_bitwise(markov, tmp_path):
    whole = run_layout(markov, tmp_path, "whole", 2, **{
        "parallel.tensor": 2, "train.steps": 4, "checkpoint.interval": 2})  # fmt: skip
    run_layout(markov, tmp_path, "part", 2, **{
        "parallel.tensor": 2, "train.steps": 4, "checkpoint.interval": 2})  # fmt: skip
    # Roll the second run back to its step-2 checkpoint, then resume it to the end.
    ckpts = tmp_path / "part" / "checkpoints"
    (ckpts / "latest").write_text("iter_0000002\n")
    shutil.rmtree(ckpts / "iter_0000004")
    resumed = run_layout(markov, tmp_path, "part", 2, **{
        "parallel.tensor": 2, "train.steps": 4, "checkpoint.interval": 2})  # fmt: skip
    assert resumed == whole
    assert (
        json.loads((tmp_path / "part" / "train_log.jsonl").read_text().splitlines()[0])["step"] == 1
    )


def test_signal_while_the_command_starts_stops_after_the_first_step(markov, tmp_path):
    # A requeued Slurm job can be warned again while its processes still import torch:
    # the signal waits for the first step, whose checkpoint the next run resumes from.
    prefix, cache = markov
    run = tmp_path / "run"
    proc = subprocess.Popen([*SLKD, *_cli_args(prefix, cache, run, steps=3)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    maps = f"/proc/{proc.pid}/maps"
    deadline = time.time() + 120
    while "libtorch" not in open(maps).read():  # torch is loading: the command's imports
        assert time.time() < deadline and proc.poll() is None, "torch never loaded"
        time.sleep(0.01)
    assert not (run / "checkpoints").exists()
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("slkd train: stopped: preempted by SIGUSR1 after step 1/3"), last
    assert latest_checkpoint(run).name == "iter_0000001"


def _signal_mask(pid: int, field: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.mark.slow
def test_torchrun_agent_blocks_usr1_so_early_workers_still_stop(markov, tmp_path):
    # pretrain_student.sbatch under LAUNCH=torchrun: srun passes the time-limit warning to
    # every process of the step. Workers that get it before their watch is installed must
    # still stop after a step; an ignored signal (trap "" USR1 in front of the agent) was
    # inherited by them and lost. A sitecustomize.py holds each worker for a second at
    # interpreter start, so the signal is sure to come before the watch.
    prefix, cache = markov
    run = tmp_path / "run"
    hold = tmp_path / "hold"
    hold.mkdir()
    (hold / "sitecustomize.py").write_text(
        "import os, time\nif 'TORCHELASTIC_RUN_ID' in os.environ and 'LOCAL_RANK' in os.environ:"
        "\n    time.sleep(1.0)\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(hold), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "megatron_slkd.slurm", "--block-usr1", "--", sys.executable, "-m",
           "torch.distributed.run", "--nproc-per-node", "2", "-m", "megatron_slkd.training",
           *_cli_args(prefix, cache, run, steps=3)[1:]]  # fmt: skip
    proc = subprocess.Popen(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, start_new_session=True)  # fmt: skip
    deadline = time.time() + 120
    workers: list[int] = []
    while len(workers) < 2:
        assert time.time() < deadline and proc.poll() is None, "the workers never started"
        workers = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/stat")
                   if _ppid(p) == proc.pid]  # fmt: skip
        time.sleep(0.01)
    usr1 = 1 << (signal.SIGUSR1 - 1)
    for pid in workers:  # no handler yet, and the signal would wait
        assert not _signal_mask(pid, "SigCgt") & usr1 and _signal_mask(pid, "SigBlk") & usr1
    for pid in (proc.pid, *workers):  # srun signals every process of the step (torchrun
        os.kill(pid, signal.SIGUSR1)  # starts each worker in a session of its own)
    out, err = proc.communicate(timeout=300)
    stops = [x for x in err.splitlines() if "slkd train: stopped: preempted by SIGUSR1" in x]
    assert len(stops) == 2 and all("after step 1/3" in x for x in stops), err[-3000:]
    assert latest_checkpoint(run).name == "iter_0000001"


def _ppid(stat: Path) -> int:
    try:  # the command name may hold spaces and parentheses: the fields after the last ')'
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1
