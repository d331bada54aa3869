"""Tier 1/3: rank discovery, and build-cache splitting shards under a real mpirun."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import SLKD, prepare_hf_dataset

from megatron_slkd.data.verify import verify_cache
from megatron_slkd.launch import launch_rank
from megatron_slkd.teacher import smollm2_gguf


@pytest.mark.parametrize(
    "env, expect",
    [
        ({}, (0, 1)),
        ({"RANK": "3", "WORLD_SIZE": "8"}, (3, 8)),
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, (1, 2)),
        ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4"}, (2, 4)),
        (
            {
                "SLURM_PROCID": "1",
                "SLURM_NTASKS": "2",
                "SLURM_ARRAY_TASK_ID": "3",
                "SLURM_ARRAY_TASK_COUNT": "4",
                "SLURM_ARRAY_TASK_MIN": "0",
            },
            (7, 8),
        ),
        (
            {
                "SLURM_ARRAY_TASK_ID": "5",
                "SLURM_ARRAY_TASK_COUNT": "2",
                "SLURM_ARRAY_TASK_MIN": "4",
            },
            (1, 2),
        ),
    ],
)
def test_launch_rank(env, expect):
    assert launch_rank(env) == expect


MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent))


@pytest.mark.mpi
@pytest.mark.skipif(MPIRUN is None or smollm2_gguf() is None, reason="needs mpirun and SmolLM2")
@pytest.mark.slow
def test_build_cache_under_mpirun_splits_shards(tmp_path):
    prefix = prepare_hf_dataset(tmp_path / "smol", smollm2_gguf(), 3)
    env = {**os.environ, "OMPI_MCA_btl": "self,tcp", "OMPI_MCA_btl_tcp_if_include": "lo"}
    r = subprocess.run(
        [
            MPIRUN,
            "--allow-run-as-root",
            "--oversubscribe",
            "-n",
            "2",
            *SLKD,
            "build-cache",
            "--data-prefix",
            str(prefix),
            "--output",
            str(tmp_path / "cache"),
            "--context-length",
            "128",
            "--stride",
            "64",
            "--no-progress",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    reports = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert sorted(x["shard_indices"][0] for x in reports) == [0, 1]
    assert all(x["shards"] == 2 and x["shards_built"] == 1 for x in reports)
    assert all(0 < x["overhead_vs_teacher"] < 1 and 0 < x["teacher_nll"] < 10 for x in reports)
    assert verify_cache(tmp_path / "cache", str(prefix))["ok"]
