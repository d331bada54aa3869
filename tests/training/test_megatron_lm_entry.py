"""The Megatron-LM entry script inside a real Megatron-LM tree.

``MEGATRON_LM_DIR``: a Megatron-LM source tree of the release of the installed
megatron-core (core_r0.16.0 for 0.16, core_r0.19.0 for 0.19), its dataset helpers
compiled, its extra packages in ``MEGATRON_LM_EXTRA_PATH``; ``.ci/megatron_lm.sh``
prepares both from ``../shared/megatron-lm/``. Without it the tests skip (CI requires it).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import megatron_lm_defines, megatron_lm_env, needs_megatron_lm

from megatron_slkd.cache import Manifest

HARNESS = Path(__file__).resolve().parents[1] / "system" / "megatron_lm_harness.py"
ENTRY = Path(__file__).resolve().parents[2] / "examples" / "megatron_lm" / "pretrain_gpt_slkd.py"


@needs_megatron_lm
def test_entry_script_trains_inside_megatron_lm(markov, tmp_path):
    prefix, cache = markov
    env = megatron_lm_env()
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


@needs_megatron_lm
def test_entry_script_refuses_bad_inputs_before_megatron_lm_starts(markov, tmp_path):
    # The script itself, as torchrun starts it on each rank: it stops before pretrain()
    # (whose initialization would need CUDA here, and minutes on a cluster).
    prefix, cache = markov
    other = str(tmp_path / "other")
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, other + ext)
    older = tmp_path / "older-cache"  # the copy's cache, as an older teacher wrote it
    shutil.copytree(cache, older)
    m = Manifest.read(older)
    m.teacher = {**m.teacher, "checkpoint_hash": "sha256:older"}
    (older / "manifest.json").write_text(m.to_json())
    cut = str(tmp_path / "cut")
    shutil.copy(prefix + ".bin", cut + ".bin")
    Path(cut + ".idx").write_bytes(Path(prefix + ".idx").read_bytes()[:40])
    model = [
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "64", "--max-position-embeddings", "64", "--micro-batch-size", "2",
        "--train-iters", "2", "--tokenizer-type", "NullTokenizer", "--vocab-size", "127",
    ]  # fmt: skip
    cases = {
        "no such cache directory": ["--data-path", prefix, "--slkd-cache",
                                    f"{prefix}={tmp_path / 'typo'}"],
        f"data prefix(es) ['{other}'] have no sparse-logit cache; give --slkd-cache": [
            "--data-path", "0.5", prefix, "0.5", other, "--slkd-cache", f"{prefix}={cache}"],
        "have no sparse-logit cache": ["--train-data-path", prefix, "--valid-data-path", other,
                                       "--slkd-cache", f"{prefix}={cache}"],
        "no manifest": ["--data-path", prefix, "--slkd-cache", f"{prefix}={tmp_path}"],
        "the index is truncated": ["--data-path", cut, "--slkd-cache", f"{cut}={cache}"],
        "--slkd-allow-mixed-teachers": ["--data-path", "0.5", prefix, "0.5", other,
                                        "--slkd-cache", f"{prefix}={cache}", f"{other}={older}"],
        "the middle pipeline stages read no batch": [
            "--data-path", prefix, "--slkd-cache", f"{prefix}={cache}", "--reset-attention-mask",
            "--pipeline-model-parallel-size", "4"],
    }  # fmt: skip
    if megatron_lm_defines("--logits-load-dir"):
        for theirs in ("--logits-load-dir", "--logits-save-dir"):  # core_r0.19.0's own KD
            cases[f"--slkd-cache with {theirs}: two knowledge-distillation paths"] = [
                "--data-path", prefix, "--slkd-cache", f"{prefix}={cache}", theirs,
                str(tmp_path / "logits")]  # fmt: skip
    runs = [(needle, data, "0") for needle, data in cases.items()]
    runs.append((None, cases["no such cache directory"], "1"))  # one line per job, not per rank
    for needle, data, rank in runs:
        env = dict(megatron_lm_env(), RANK=rank, WORLD_SIZE="2")
        r = subprocess.run([sys.executable, str(ENTRY), *model, *data], capture_output=True,
                           text=True, env=env, timeout=300)  # fmt: skip
        assert r.returncode == 2, (needle, r.stderr[-3000:])
        assert "Traceback" not in r.stderr and "initializing" not in r.stdout, r.stderr
        said = [ln for ln in r.stderr.splitlines() if "pretrain_gpt_slkd.py: error:" in ln]
        assert len(said) == (rank == "0") and (needle is None or needle in said[0]), (
            needle, r.stderr[-3000:])  # fmt: skip
