"""The Megatron-LM entry script against a real Megatron-LM checkout (outside CI).

Set ``MEGATRON_LM_DIR`` to a Megatron-LM source tree of the branch that matches
the installed megatron-core (core_r0.16.0 for 0.16), with its dataset helpers
compiled (``make -C megatron/core/datasets``) and its Python dependencies
installed (or in ``MEGATRON_LM_EXTRA_PATH``); without it the test skips.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[1] / "system" / "megatron_lm_harness.py"
TREE = os.environ.get("MEGATRON_LM_DIR")


@pytest.mark.skipif(not TREE, reason="set MEGATRON_LM_DIR to a Megatron-LM checkout to run")
def test_entry_script_trains_inside_megatron_lm(markov, tmp_path):
    prefix, cache = markov
    path = os.pathsep.join(filter(None, [TREE, os.environ.get("MEGATRON_LM_EXTRA_PATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    r = subprocess.run([sys.executable, str(HARNESS), prefix, str(cache), str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    *reports, grads = lines
    assert len(reports) == 2
    for rep in reports:
        assert set(rep) == {"lm loss", "kd loss", "kl to teacher"}
        assert 3.0 < rep["lm loss"] < 6.0 and rep["kl to teacher"] > 0
    assert grads["with_grad"] == grads["params"]
