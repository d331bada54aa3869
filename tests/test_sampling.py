"""Tier 1: the sparse-target sampler in one process."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_slkd import _sampling_cpu
from megatron_slkd import sampling as S
from megatron_slkd.sampling import counter_uniform, sample_sparse_targets


def _chi_square(observed: np.ndarray, expected: np.ndarray) -> float:
    keep = expected > 0
    return float((((observed - expected) ** 2)[keep] / expected[keep]).sum())


def test_counter_uniform_is_keyed_and_uniform():
    pos = torch.arange(100_000)
    u = counter_uniform(7, pos, 4)
    assert u.shape == (100_000, 4) and u.dtype == torch.float64
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    # Same key, same number; any key change gives a different one.
    assert torch.equal(u[123], counter_uniform(7, pos[123:124], 4)[0])
    assert not torch.equal(u, counter_uniform(8, pos, 4))
    # 100 equal bins: chi-square with 99 dof stays far below 99 + 6 * sqrt(198).
    hist = np.histogram(u.numpy().ravel(), bins=100, range=(0, 1))[0]
    assert _chi_square(hist, np.full(100, hist.sum() / 100)) < 99 + 6 * math.sqrt(198)
    # Draws of neighbouring positions are uncorrelated.
    corr = np.corrcoef(u[:-1, 0].numpy(), u[1:, 0].numpy())[0, 1]
    assert abs(corr) < 0.02


def test_cpu_mass_matches_exp():
    x = np.linspace(-22.9, 0.0, 200_001, dtype=np.float32)
    z = x.reshape(1, -1)
    # One id per block exposes each element's mass in the block sums.
    out = np.empty((1, x.size), dtype=np.int64)
    _sampling_cpu.block_masses(z, np.zeros(1, np.float32), 1, out)
    exact = np.exp(x.astype(np.float64)) * 2.0**32
    # Within 3e-7 relative, plus the unit lost by the floor.
    assert np.all(np.abs(out[0] - exact) <= 3e-7 * exact + 1.0)
    assert out[0, -1] == 2**32


def _rs_mean(logits, rows, num_samples, temperature):
    t = sample_sparse_targets(
        logits.repeat(rows, 1),
        method="rs",
        seed=3,
        positions=torch.arange(rows),
        num_samples=num_samples,
        temperature=temperature,
    )
    assert torch.allclose(t.weights.sum(-1), torch.ones(rows), atol=1e-6)
    est = torch.zeros(logits.numel(), dtype=torch.float64)
    return est.scatter_add_(0, t.ids.flatten(), t.weights.double().flatten()) / rows


def test_rs_estimate_is_unbiased():
    torch.manual_seed(0)
    logits = torch.randn(6) * 2
    rows = 20_000
    est = _rs_mean(logits, rows, 50, 1.0)
    p = torch.softmax(logits.double(), -1)
    # Standard error of the mean weight is below sqrt(p / (50 * rows)); 5 sigma.
    assert torch.all((est - p).abs() < 5 * torch.sqrt(p / (50 * rows)) + 1e-6), (est, p)


@pytest.mark.parametrize("temperature", [2.0, 0.7])
def test_rs_importance_weights_are_consistent(temperature):
    # Self-normalized importance weights carry an O(1/N) bias: it must shrink.
    torch.manual_seed(0)
    logits = torch.randn(6) * 2
    p = torch.softmax(logits.double(), -1)
    err_small = (_rs_mean(logits, 4000, 5, temperature) - p).abs().max()
    err_large = (_rs_mean(logits, 4000, 400, temperature) - p).abs().max()
    assert err_large < 0.004 and err_large < err_small / 2, (err_small, err_large)


def test_rs_counts_follow_the_multinomial_law():
    torch.manual_seed(1)
    logits = torch.randn(40) * 1.5
    rows = 5_000
    t = sample_sparse_targets(
        logits.repeat(rows, 1), method="rs", seed=11, positions=torch.arange(rows) * 7
    )
    assert torch.equal(t.counts.sum(-1), torch.full((rows,), 50))
    observed = np.zeros(40)
    np.add.at(observed, t.ids.numpy().ravel(), t.counts.numpy().ravel())
    expected = torch.softmax(logits.double(), -1).numpy() * 50 * rows
    dof = 39
    assert _chi_square(observed, expected) < dof + 6 * math.sqrt(2 * dof)
    # Rows are ordered by count desc, then id asc; padding is weight 0.
    c = t.counts
    assert torch.all(c[:, :-1] >= c[:, 1:])
    pad = torch.arange(c.shape[1]) >= t.num_valid.unsqueeze(-1)
    assert torch.all(t.weights[pad] == 0) and torch.all(c[~pad] > 0)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 40),
    vocab=st.integers(2, 700),
    seed=st.integers(0, 2**64 - 1),
    data=st.data(),
)
def test_rs_is_independent_of_batch_split_and_order(rows, vocab, seed, data):
    g = torch.Generator().manual_seed(rows * 1000 + vocab)
    logits = torch.randn(rows, vocab, generator=g) * 4
    pos = torch.randint(0, 2**40, (rows,), generator=g)
    full = sample_sparse_targets(logits, method="rs", seed=seed, positions=pos)
    perm = torch.tensor(data.draw(st.permutations(range(rows))))
    shuffled = sample_sparse_targets(logits[perm], method="rs", seed=seed, positions=pos[perm])
    for i, j in enumerate(perm.tolist()):
        n = int(full.num_valid[j])
        assert int(shuffled.num_valid[i]) == n
        assert torch.equal(shuffled.ids[i, :n], full.ids[j, :n])
        assert torch.equal(shuffled.counts[i, :n], full.counts[j, :n])


def test_torch_path_equals_cpu_kernels_bit_for_bit(monkeypatch):
    # The tensor-op path (what runs on a GPU) computes the CPU kernels' exp polynomial
    # with the same float32 roundings: equal masses, equal draws, equal targets.
    torch.manual_seed(2)
    z = torch.randn(48, 49152 + 37) * 8
    z[0, :8] = torch.tensor([0.0, -23.0, -22.999, -23.0001, -1e-8, -88.0, 1e-7, 0.5])
    m = z.max(-1).values
    cpu_blocks = S._block_masses(z, m)
    assert torch.equal(S._torch_block_masses(z, m), cpu_blocks)
    targets = torch.floor(
        counter_uniform(0, torch.arange(48), 50) * cpu_blocks.sum(-1, keepdim=True)
    ).long()
    targets[:, 0] = -1  # a draw another shard owns
    assert torch.equal(S._torch_resolve(z, m, cpu_blocks, targets),
                       S._resolve(z, m, cpu_blocks, targets))  # fmt: skip
    want = sample_sparse_targets(z, method="rs", num_samples=50, seed=3, positions=torch.arange(48))
    monkeypatch.setattr(S, "_block_masses", S._torch_block_masses)
    monkeypatch.setattr(S, "_resolve", S._torch_resolve)
    got = sample_sparse_targets(z, method="rs", num_samples=50, seed=3, positions=torch.arange(48))
    for a, b in zip(got, want, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


def test_topk_matches_sorted_softmax():
    torch.manual_seed(3)
    logits = torch.randn(8, 300)
    t = sample_sparse_targets(logits, method="topk", seed=0, positions=torch.arange(8), k=12)
    p = torch.softmax(logits.double(), -1)
    ref_p, ref_i = p.topk(12, -1)
    assert torch.equal(t.ids, ref_i)
    assert torch.allclose(t.weights.double(), ref_p, atol=1e-7)
    assert torch.allclose(t.residual.double(), 1 - ref_p.sum(-1), atol=1e-6)
    assert t.counts is None and torch.equal(t.num_valid, torch.full((8,), 12))


def test_topk_ties_break_by_id_and_k_larger_than_vocab():
    logits = torch.zeros(2, 5)
    t = sample_sparse_targets(logits, method="topk", seed=0, positions=torch.arange(2), k=8)
    assert t.ids[0].tolist()[:5] == [0, 1, 2, 3, 4]
    assert t.num_valid.tolist() == [5, 5]


def test_padding_ids_are_never_returned():
    logits = torch.zeros(500, 16)
    logits[:, 10:] = 5.0  # padding ids would dominate if not masked
    t = sample_sparse_targets(
        logits, method="rs", seed=0, positions=torch.arange(500), vocab_size=10
    )
    assert int(t.ids[t.weights > 0].max()) < 10
    k = sample_sparse_targets(
        logits, method="topk", seed=0, positions=torch.arange(500), k=3, vocab_size=10
    )
    assert int(k.ids.max()) < 10
    assert float(logits[0, 12]) == 5.0  # the caller's logits are untouched


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="bogus"), "unknown method"),
        (dict(method="topk"), "needs k"),
        (dict(method="rs", num_samples=0), "num_samples"),
        (dict(method="rs", temperature=0.0), "temperature"),
        (dict(method="rs", seed=-1), "seed"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(seed=0, positions=torch.arange(3)) | kwargs
    with pytest.raises(ValueError, match=match):
        sample_sparse_targets(torch.zeros(3, 10), **args)


def test_bad_shapes():
    with pytest.raises(ValueError, match="positions"):
        sample_sparse_targets(torch.zeros(3, 10), method="rs", seed=0, positions=torch.arange(4))
    with pytest.raises(ValueError, match=r"\[T, V\]"):
        sample_sparse_targets(torch.zeros(3), method="rs", seed=0, positions=torch.arange(3))
