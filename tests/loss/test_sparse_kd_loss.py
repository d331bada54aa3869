"""Tier 1/2: the vocab-parallel sparse KD loss against an unsharded float64 reference."""

import pytest
import torch
import torch.distributed as dist

from megatron_slkd.loss import vocab_parallel_sparse_kd_loss
from megatron_slkd.testing import run_distributed

S, B, K = 7, 3, 9


def _case(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(S, B, vocab, generator=g, dtype=torch.float64) * 2
    ids = torch.randint(0, vocab, (S, B, K), generator=g)
    ids[0, 0, 1] = ids[0, 0, 0]  # a repeated id
    ids[2, 1, :3] = ids[2, 1, 3]  # four times
    w = torch.rand(S, B, K, generator=g, dtype=torch.float64)
    w[..., -2:] = 0  # padding entries
    w = w / w.sum(-1, keepdim=True)
    w[1, 2] = 0  # a position without teacher targets: falls back to CE
    labels = torch.randint(0, vocab, (S, B), generator=g)
    mask = (torch.rand(S, B, generator=g) > 0.2).double()
    grad_out = torch.randn(S, B, generator=g, dtype=torch.float64)
    return z, ids, w, labels, mask, grad_out


def _reference(z, ids, w, labels, alpha, vocab_size=None):
    z = z.clone().requires_grad_()
    zz = (
        z
        if vocab_size is None
        else z.masked_fill(torch.arange(z.shape[-1]) >= vocab_size, float("-inf"))
    )
    lp = torch.log_softmax(zz, -1)
    kd = -(w * lp.gather(-1, ids)).sum(-1)
    ce = -lp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    has = w.sum(-1) > 0
    loss = torch.where(has, alpha * ce + (1 - alpha) * kd, ce)
    wlogw = torch.where(w > 0, w * w.clamp(min=1e-30).log(), 0.0).sum(-1)
    kl = torch.where(has, wlogw + kd, 0.0)
    return z, loss, kl.detach(), ce.detach()


def _compare(rank, world, vocab, padded, alpha, dtype):
    tp_group = dist.group.WORLD if world > 1 else None
    z, ids, w, labels, mask, g = _case(vocab)
    # Pad the vocabulary for TP divisibility; the padding columns are excluded.
    zp = torch.cat([z, torch.randn(S, B, padded - vocab, dtype=torch.float64) * 5], -1)
    width = padded // world
    shard = zp[..., rank * width : (rank + 1) * width].to(dtype).requires_grad_()
    out = vocab_parallel_sparse_kd_loss(
        shard, ids, w.float(), labels, alpha=alpha, tp_group=tp_group, vocab_size=vocab
    )
    ((out.loss * mask.float() * g.float()).sum()).backward()
    zr, loss, kl, ce = _reference(zp, ids, w, labels, alpha, vocab_size=vocab)
    (loss * mask * g).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert torch.allclose(out.loss.double(), loss, atol=tol, rtol=tol)
    assert torch.allclose(out.kl.double(), kl, atol=tol, rtol=tol)
    assert torch.allclose(out.ce.double(), ce, atol=tol, rtol=tol)
    ref_grad = zr.grad[..., rank * width : (rank + 1) * width]
    assert shard.grad.dtype == dtype
    assert torch.allclose(shard.grad.double(), ref_grad, atol=tol, rtol=tol)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_unsharded_matches_reference(alpha):
    _compare(0, 1, 61, 61, alpha, torch.float32)


def test_bf16_logits_use_float32_math():
    _compare(0, 1, 64, 64, 0.5, torch.bfloat16)


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_matches_reference(tp):
    # 61 ids padded to 64 (not divisible by TP), for each alpha.
    for alpha in (0.0, 0.5, 1.0):
        run_distributed(_compare, tp, 61, 64, alpha, torch.float32)


def _equals_megatron_ce(rank, world):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    z, ids, w, labels, _, g = _case(64, seed=3)
    width = 64 // world
    r = ps.get_tensor_model_parallel_rank()
    a = z[..., r * width : (r + 1) * width].float().requires_grad_()
    b = a.detach().clone().requires_grad_()
    ours = vocab_parallel_sparse_kd_loss(
        a, ids, w.float(), labels, alpha=1.0, tp_group=ps.get_tensor_model_parallel_group()
    )
    theirs = vocab_parallel_cross_entropy(b, labels)
    (ours.loss * g.float()).sum().backward()
    (theirs * g.float()).sum().backward()
    assert torch.allclose(ours.loss, theirs, atol=1e-6)
    assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_alpha_one_equals_megatron_vocab_parallel_cross_entropy():
    run_distributed(_equals_megatron_ce, 2, tp=2, megatron=True)


def test_caller_logits_are_left_intact_unless_inplace():
    z, ids, w, labels, _, _ = _case(40)
    logits = z.float()
    before = logits.clone()
    vocab_parallel_sparse_kd_loss(logits, ids, w.float(), labels)
    assert torch.equal(logits, before)
    out = vocab_parallel_sparse_kd_loss(logits, ids, w.float(), labels, inplace=True)
    assert not torch.equal(logits, before)  # now the softmax buffer
    assert torch.allclose(logits.sum(-1), torch.ones(S, B), atol=1e-5)
    assert torch.isfinite(out.loss).all()


def test_zero_targets_is_plain_cross_entropy():
    z, _, _, labels, _, _ = _case(30)
    empty = torch.zeros(S, B, 0, dtype=torch.int64)
    out = vocab_parallel_sparse_kd_loss(z.float(), empty, empty.float(), labels, alpha=0.3)
    ref = torch.nn.functional.cross_entropy(
        z.reshape(-1, 30), labels.reshape(-1), reduction="none"
    ).view(S, B)
    assert torch.allclose(out.loss.double(), ref, atol=1e-5)


def test_bad_input(monkeypatch):
    import megatron_slkd.loss.vocab_parallel as vp

    z, ids, w, labels, _, _ = _case(30)
    x = z.float()
    with pytest.raises(ValueError, match=r"\[s, b, V/tp\]"):
        vocab_parallel_sparse_kd_loss(x[0], ids, w.float(), labels)
    with pytest.raises(ValueError, match="must both be"):
        vocab_parallel_sparse_kd_loss(x, ids[..., :3], w.float(), labels)
    with pytest.raises(TypeError, match="integer"):
        vocab_parallel_sparse_kd_loss(x, ids.float(), w.float(), labels)
    with pytest.raises(ValueError, match="labels are required"):
        vocab_parallel_sparse_kd_loss(x, ids, w.float(), None, alpha=0.5)
    monkeypatch.setattr(vp, "_DEBUG", True)  # value checks, as the tests' debug flag
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab_parallel_sparse_kd_loss(x, ids + 30, w.float(), labels)
    with pytest.raises(ValueError, match="non-negative"):
        vocab_parallel_sparse_kd_loss(x, ids, -w.float(), labels)
    # Ids of weight 0 may be anything, even under the value checks.
    ids0 = torch.where(w > 0, ids, 10_000)
    assert torch.isfinite(vocab_parallel_sparse_kd_loss(x, ids0, w.float(), labels).loss).all()


@pytest.mark.parametrize("total", [0.7, 1.0, 1.3])
def test_unnormalized_weights_value_and_gradient_are_those_of_the_weighted_log_loss(total):
    # The contract: -sum_k w_k log p_k for any non-negative weights, value and
    # gradient consistent (float64 reference, and a finite difference of the loss itself).
    z, ids, w, labels, mask, g = _case(50, seed=11)
    w = w * total
    for alpha in (0.0, 0.4):
        x = z.clone().requires_grad_()
        out = vocab_parallel_sparse_kd_loss(x, ids, w, labels, alpha=alpha)
        (out.loss * mask * g).sum().backward()
        zr, loss, _, _ = _reference(z, ids, w, labels, alpha)
        (loss * mask * g).sum().backward()
        assert torch.allclose(out.loss.double(), loss, atol=1e-5), (out.loss - loss).abs().max()
        assert torch.allclose(x.grad.double(), zr.grad, atol=1e-6)
        # Directional finite difference (float64 logits; the loss computes in float32).
        d = torch.randn(z.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        eps = 1e-2

        def f(t, alpha=alpha):
            o = vocab_parallel_sparse_kd_loss(t, ids, w, labels, alpha=alpha).loss.double()
            return float((o * mask * g).sum())

        fd = (f(z + eps * d) - f(z - eps * d)) / (2 * eps)
        assert abs(fd - float((x.grad * d).sum())) < 5e-3 * max(1.0, abs(fd)), fd


def test_zero_weight_entries_on_padding_columns_contribute_nothing():
    z, ids, w, labels, mask, g = _case(61, seed=4)
    zp = torch.cat([z, torch.randn(S, B, 3, dtype=torch.float64)], -1)  # 61 ids padded to 64
    ids = ids.clone()
    ids[w == 0] = 62  # every zero-weight entry points at a padding column
    x = zp.float().requires_grad_()
    out = vocab_parallel_sparse_kd_loss(x, ids, w.float(), labels, alpha=0.3, vocab_size=61)
    (out.loss * mask.float() * g.float()).sum().backward()
    ref_ids = torch.where(w > 0, ids, 0)  # the same targets with harmless ids
    zr, loss, kl, _ = _reference(zp, ref_ids, w, labels, 0.3, vocab_size=61)
    (loss * mask * g).sum().backward()
    assert torch.isfinite(out.loss).all() and torch.isfinite(out.kl).all()
    assert torch.allclose(out.loss.double(), loss, atol=1e-5)
    assert torch.allclose(out.kl.double(), kl, atol=1e-5)
    assert torch.allclose(x.grad.double(), zr.grad, atol=1e-5)
    assert float(x.grad[..., 61:].abs().max()) == 0.0
