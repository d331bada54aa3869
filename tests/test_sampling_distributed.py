"""Tier 2: the vocab-parallel sampler on gloo equals the unsharded one."""

import pytest
import torch
import torch.distributed as dist

from megatron_slkd.sampling import sample_sparse_targets
from megatron_slkd.testing import run_distributed


def _sharded_equals_unsharded(rank, world_size, vocab, method):
    g = torch.Generator().manual_seed(vocab)
    rows = 37
    padded = -(-vocab // world_size) * world_size
    # Padding logits are large on purpose: they must never be drawn.
    logits = torch.cat(
        [torch.randn(rows, vocab, generator=g) * 3, torch.full((rows, padded - vocab), 9.0)], -1
    )
    positions = torch.randint(0, 2**35, (rows,), generator=g)
    width = padded // world_size
    shard = logits[:, rank * width : (rank + 1) * width].clone()
    kwargs = dict(method=method, seed=99, positions=positions, k=12, vocab_size=vocab)
    ref = sample_sparse_targets(logits, **kwargs)
    got = sample_sparse_targets(shard, tp_group=dist.group.WORLD, **kwargs)
    assert torch.equal(got.num_valid, ref.num_valid)
    assert torch.equal(got.ids, ref.ids)
    if method == "rs":
        assert torch.equal(got.counts, ref.counts)
        assert torch.equal(got.weights, ref.weights)
    else:
        assert torch.allclose(got.weights, ref.weights, rtol=1e-6, atol=1e-9)
        assert torch.allclose(got.residual, ref.residual, atol=1e-6)
    assert int(got.ids[got.weights > 0].max()) < vocab


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("method", ["rs", "topk"])
def test_vocab_parallel_sampler_equals_unsharded(tp, method):
    run_distributed(_sharded_equals_unsharded, tp, 1001, method)


def _rank_of_padding_only(rank, world_size):
    # Vocabulary 5 padded to 8 over TP 4: rank 3 holds only padding ids.
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 8, generator=g)
    shard = logits[:, rank * 2 : rank * 2 + 2].clone()
    for method in ("rs", "topk"):
        kw = dict(method=method, seed=3, positions=torch.arange(9), k=4, vocab_size=5)
        ref = sample_sparse_targets(logits, **kw)
        got = sample_sparse_targets(shard, tp_group=dist.group.WORLD, **kw)
        assert torch.equal(got.ids, ref.ids) and torch.equal(got.num_valid, ref.num_valid)
        assert int(got.ids[got.weights > 0].max()) < 5


def test_a_rank_holding_only_padding():
    run_distributed(_rank_of_padding_only, 4)
