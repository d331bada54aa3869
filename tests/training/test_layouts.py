"""Tier 2: `slkd train` on gloo at every layout reproduces the one-process run.

Three optimizer steps of the same student on the same data and seed at TP2,
PP2, DP2, TP2xPP2 (and interleaved PP2 x VP2): the per-step training loss
must equal the TP1 run's within 1e-5, and it must go down.
"""

import json

import pytest

from megatron_slkd.testing import run_distributed
from megatron_slkd.training.config import load_config


def small_config(prefix, cache, run_dir, **overrides):
    """A 4-layer toy student with every run artifact under ``run_dir``."""
    values = {
        "data.path": [prefix],
        "data.split": "90,10,0",
        "data.index_cache": str(run_dir.parent / "index-cache"),
        "data.num_workers": 0,
        "kd.caches": {prefix: str(cache)},
        "model.num_layers": 4,
        "model.hidden_size": 64,
        "model.ffn_hidden_size": 128,
        "model.num_attention_heads": 4,
        "model.num_query_groups": 2,
        "model.seq_length": 64,
        "train.steps": 3,
        "train.micro_batch_size": 2,
        "train.global_batch_size": 8,
        "optim.lr": 1e-2,
        "optim.warmup_steps": 0,
        "eval.interval": 0,
        "eval.batches": 1,
        "checkpoint.dir": str(run_dir),
        "checkpoint.interval": 0,
        "log.tensorboard": False,
    }
    values.update(overrides)
    return load_config(None, values)


def _train(rank, world, cfg):
    from megatron_slkd.training import train

    train(cfg)


def train_log(run_dir, kind="train"):
    """The run's JSONL records of ``kind``, one per step."""
    rows = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def run_layout(markov, tmp_path, name, world, **overrides):
    prefix, cache = markov
    cfg = small_config(prefix, cache, tmp_path / name, **overrides)
    run_distributed(_train, world, cfg)
    return [r["loss"] for r in train_log(tmp_path / name)]


@pytest.fixture(scope="module")
def reference(markov, tmp_path_factory):
    return run_layout(markov, tmp_path_factory.mktemp("ref"), "tp1", 1)


@pytest.mark.parametrize(
    "name, world, overrides",
    [
        ("tp2", 2, {"parallel.tensor": 2}),
        ("pp2", 2, {"parallel.pipeline": 2}),
        ("dp2", 2, {}),
        ("tp2pp2", 4, {"parallel.tensor": 2, "parallel.pipeline": 2}),
        ("pp2vp2", 2, {"parallel.pipeline": 2, "parallel.virtual_pipeline": 2}),
    ],
)
def test_layout_matches_one_process(markov, tmp_path, reference, name, world, overrides):
    losses = run_layout(markov, tmp_path, name, world, **overrides)
    assert len(losses) == len(reference) == 3
    assert losses[-1] < losses[0], losses
    for step, (got, want) in enumerate(zip(losses, reference, strict=False), 1):
        assert abs(got - want) <= 1e-5, f"{name} step {step}: {got} vs TP1 {want}"


# Packed documents kept apart (data.reset_attention_mask): the mask must reach the layers
# of every pipeline stage, not just the first, or a layout computes another loss.
DOCUMENTS = {"data.reset_attention_mask": True, "data.eod_mask_loss": True}


@pytest.fixture(scope="module")
def documents_reference(markov, tmp_path_factory):
    return run_layout(markov, tmp_path_factory.mktemp("ref_documents"), "tp1", 1, **DOCUMENTS)


@pytest.mark.parametrize(
    "name, world, overrides",
    [
        ("pp2", 2, {"parallel.pipeline": 2}),
        ("pp2vp2", 2, {"parallel.pipeline": 2, "parallel.virtual_pipeline": 2}),
    ],
)
def test_documents_kept_apart_at_every_layout(markov, tmp_path, reference, documents_reference,
                                              name, world, overrides):  # fmt: skip
    want = documents_reference
    assert max(abs(a - b) for a, b in zip(want, reference, strict=True)) > 1e-3, (want, reference)
    losses = run_layout(markov, tmp_path, name, world, **DOCUMENTS, **overrides)
    for step, (got, ref) in enumerate(zip(losses, want, strict=True), 1):
        assert abs(got - ref) <= 1e-5, f"{name} step {step}: {got} vs TP1 {ref}"
