"""Tier 3: verify-cache under a real mpirun (Open MPI from PyPI) splits the shards."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_dataset, write_synthetic_cache

MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")

pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(MPIRUN is None, reason="mpirun not found: pip install 'megatron-slkd[mpi]'"),
]


def _mpirun(n, *args):
    cmd = [
        MPIRUN,
        "--allow-run-as-root",
        "--oversubscribe",
        "-n",
        str(n),
        sys.executable,
        "-m",
        "megatron_slkd",
        *map(str, args),
    ]
    env = {**os.environ, "OMPI_MCA_btl": "self,tcp", "OMPI_MCA_btl_tcp_if_include": "lo"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_verify_cache_under_mpirun(tmp_path):
    cache = write_synthetic_cache(tmp_path / "c", [30, 4, 50, 9, 70, 12, 3], num_shards=4)
    prefix = write_dataset(tmp_path / "ds", cache.docs)
    r = _mpirun(3, "verify-cache", cache.path, "--data-prefix", prefix, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1  # only rank 0 reports
    assert lines[0]["ok"] and lines[0]["ranks"] == 3

    p = cache.path / "shard-00003.slkd"
    raw = bytearray(p.read_bytes())
    raw[-2] ^= 0x10
    p.write_bytes(raw)
    r = _mpirun(2, "verify-cache", cache.path, "--json")
    assert r.returncode == 1
    report = json.loads([x for x in r.stdout.splitlines() if x.startswith("{")][0])
    assert not report["ok"] and any("shard-00003" in x for x in report["problems"])
