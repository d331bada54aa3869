"""Evaluation metrics against a float64 reference: LM loss, top-1 calibration, ECE."""

import math

import numpy as np
import pytest
import torch

from megatron_slkd.records import dump_record
from megatron_slkd.testing import run_distributed
from megatron_slkd.training.evaluate import EvalSums, calibration_terms


def reference(logits: np.ndarray, labels: np.ndarray, mask: np.ndarray, bins: int):
    """Float64 LM loss and ECE by their definitions, one position at a time."""
    z = logits.astype(np.float64).reshape(-1, logits.shape[-1])
    y, m = labels.reshape(-1), mask.reshape(-1)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    rows = [i for i in range(len(y)) if m[i]]
    ce = [-math.log(p[i, y[i]]) for i in rows]
    conf = [p[i].max() for i in rows]
    hit = [float(np.argmax(p[i]) == y[i]) for i in rows]
    ece = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [j for j, c in enumerate(conf) if lo <= c < hi or (b == bins - 1 and c == 1.0)]
        if members:
            acc = sum(hit[j] for j in members) / len(members)
            avg = sum(conf[j] for j in members) / len(members)
            ece += len(members) / len(rows) * abs(acc - avg)
    return sum(ce) / len(rows), ece, sum(hit) / len(rows)


def _case(seed=0, vocab=40):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(7, 3, vocab, generator=g) * torch.linspace(0.3, 4.0, 7).view(7, 1, 1)
    labels = torch.randint(0, vocab, (7, 3), generator=g)
    labels[::2] = logits[::2].argmax(-1)  # some correct predictions
    mask = (torch.rand(7, 3, generator=g) > 0.2).float()
    return logits, labels, mask


@pytest.mark.parametrize("bins", [10, 15])
def test_lm_loss_and_ece_match_float64_reference(bins):
    logits, labels, mask = _case()
    ce, conf, correct = calibration_terms(logits, labels)
    sums = EvalSums(bins)
    sums.add(ce, conf, correct, mask)
    got = sums.summary()
    want_loss, want_ece, want_acc = reference(logits.numpy(), labels.numpy(), mask.numpy(), bins)
    assert got["lm_loss"] == pytest.approx(want_loss, abs=1e-6)
    assert got["ece"] == pytest.approx(want_ece, abs=1e-6)
    assert got["accuracy"] == pytest.approx(want_acc, abs=1e-12)
    assert sum(got["bin_count"]) == int(mask.sum())


def test_ece_on_known_inputs():
    # four positions at confidence 0.9, three of them right: ECE = |0.75 - 0.9| = 0.15
    p = torch.tensor([0.9, 0.05, 0.05])
    logits = p.log().expand(4, 1, 3).clone()
    labels = torch.tensor([[0], [0], [0], [1]])
    ce, conf, correct = calibration_terms(logits, labels)
    sums = EvalSums(10)
    sums.add(ce, conf, correct, torch.ones(4, 1))
    got = sums.summary()
    assert got["ece"] == pytest.approx(0.15, abs=1e-6)
    assert got["lm_loss"] == pytest.approx((3 * -math.log(0.9) - math.log(0.05)) / 4, abs=1e-6)
    b = got["bin_count"].index(4)  # one bin (0.9 in float32 falls just below or at its edge)
    assert b in (8, 9) and got["bin_accuracy"][b] == 0.75


def test_padding_columns_are_ignored():
    logits, labels, mask = _case(vocab=40)
    padded = torch.cat([logits, torch.full((7, 3, 24), 50.0)], -1)  # would win the argmax
    a = calibration_terms(logits, labels)
    b = calibration_terms(padded, labels, vocab_size=40)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_kl_is_averaged_over_positions_with_targets():
    sums = EvalSums(10)
    z = torch.zeros(3, 1)
    sums.add(z, z + 0.5, z, torch.ones(3, 1), kl=torch.tensor([[1.0], [2.0], [9.0]]),
             kl_mask=torch.tensor([[1.0], [1.0], [0.0]]))  # fmt: skip
    assert sums.summary()["kl"] == pytest.approx(1.5)
    assert EvalSums(10).summary()["kl"] is None


def _vocab_parallel(rank, world):
    from megatron.core import parallel_state as ps

    logits, labels, _ = _case(seed=3, vocab=64)
    logits[0, 0, 5] = logits[0, 0, 40] = logits[0, 0].max() + 1  # a tie across shards
    labels[0, 0] = 5  # the smaller id wins the tie
    width = 64 // world
    r = ps.get_tensor_model_parallel_rank()
    shard = logits[..., r * width : (r + 1) * width]
    got = calibration_terms(
        shard, labels, tp_group=ps.get_tensor_model_parallel_group(), vocab_size=60
    )
    want = calibration_terms(logits, labels, vocab_size=60)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    assert got[2][0, 0] == 1.0


def test_vocab_parallel_matches_unsharded():
    run_distributed(_vocab_parallel, 2, tp=2, megatron=True)


def test_reliability_diagram_and_last_eval(tmp_path):
    import json

    from megatron_slkd.training.report import last_eval, reliability_diagram

    logits, labels, mask = _case()
    sums = EvalSums(10)
    sums.add(*calibration_terms(logits, labels), mask)
    ev = sums.summary()
    run = tmp_path / "run"
    run.mkdir()
    assert last_eval(run) is None
    rows = [{"kind": "train", "step": 1}, {"kind": "eval", "step": 1, **ev, "lm_loss": 9.0},
            {"kind": "eval", "step": 2, **ev}]  # fmt: skip
    (run / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert last_eval(run)["step"] == 2 and last_eval(run)["lm_loss"] == ev["lm_loss"]
    png = reliability_diagram({"a": ev, "b": ev}, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_kl_floor_is_the_positions_weighted_teacher_figure(tmp_path):
    import json

    from helpers import write_synthetic_cache

    from megatron_slkd.training.evaluate import kl_floor

    dirs = []
    for name, figures in (("a", [(10, 0.5), (30, 0.9)]), ("b", [(60, 0.2), (0, 0.0)])):
        c = write_synthetic_cache(tmp_path / name, [5, 7, 9, 4], num_shards=2)
        m = json.loads((c.path / "manifest.json").read_text())
        for rec, (n, kl) in zip(m["shards"], figures, strict=True):
            rec["teacher_stats"] = {"positions": n, "sample_kl": kl * n, "entropy": 2.0 * n}
        (c.path / "manifest.json").write_text(dump_record(m))
        dirs.append(c.path)
    got = kl_floor(dirs, 1.0)
    expect = (0.5 * 10 + 0.9 * 30 + 0.2 * 60) / 100
    assert got["kl_floor"] == pytest.approx(expect)
    assert got["kl_minus_floor"] == pytest.approx(1.0 - expect)
    # A cache without the record (thinned, older): no floor rather than a wrong one.
    plain = write_synthetic_cache(tmp_path / "plain", [5, 7], num_shards=1)
    assert kl_floor([*dirs, plain.path], 1.0) == {"kl_floor": None, "kl_minus_floor": None}
