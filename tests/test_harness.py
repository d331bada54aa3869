"""Tier 2: the gloo harness initializes megatron-core, and the CPU compat module runs it."""

import torch
import torch.nn.functional as F

from megatron_slkd.testing import run_distributed


def _parallel_state_sizes(rank, world_size, layouts):
    from megatron.core import parallel_state as ps

    for i, (tp, pp) in enumerate(layouts):
        if i:  # the next layout in the same processes (one spawn: start-up is the cost)
            ps.destroy_model_parallel()
            ps.initialize_model_parallel(tp, pp)
        assert ps.get_tensor_model_parallel_world_size() == tp
        assert ps.get_pipeline_model_parallel_world_size() == pp
        assert ps.get_data_parallel_world_size() == world_size // (tp * pp)
        group = ps.get_tensor_model_parallel_group()
        t = torch.tensor([float(rank)])
        torch.distributed.all_reduce(t, group=group)
        first = rank - ps.get_tensor_model_parallel_rank()
        assert t.item() == sum(range(first, first + tp))


def test_parallel_state_on_gloo():
    layouts = [(2, 1), (2, 2), (1, 2)]
    run_distributed(_parallel_state_sizes, 4, layouts, tp=2, pp=1, megatron=True)


def _vocab_parallel_ce(rank, world_size):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 2, 64, generator=g)
    target = torch.randint(0, 64, (6, 2), generator=g)
    width = 64 // world_size
    r = ps.get_tensor_model_parallel_rank()
    shard = logits[..., r * width : (r + 1) * width].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, target)
    loss.sum().backward()
    full = logits.clone().requires_grad_()
    ref = F.cross_entropy(full.view(-1, 64), target.view(-1), reduction="none").view(6, 2)
    ref.sum().backward()
    assert torch.allclose(loss, ref, atol=1e-6)
    assert torch.allclose(shard.grad, full.grad[..., r * width : (r + 1) * width], atol=1e-6)


def test_megatron_vocab_parallel_cross_entropy_on_cpu():
    run_distributed(_vocab_parallel_ce, 2, tp=2, megatron=True)


def _gpt_forward_backward(rank, world_size):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    model_parallel_cuda_manual_seed(123)
    cfg = TransformerConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        tensor_model_parallel_size=2,
        use_cpu_initialization=True,
    )
    model = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=128, max_sequence_length=16)
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(16).unsqueeze(0).expand(2, -1)
    mask = torch.ones(1, 1, 16, 16, dtype=torch.bool).triu(1)
    loss = model(tokens, pos, mask, labels=tokens)
    assert loss.shape == (2, 16) and torch.isfinite(loss).all()
    loss.mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_gpt_model_trains_on_cpu_with_tp2():
    run_distributed(_gpt_forward_backward, 2, tp=2, megatron=True)
