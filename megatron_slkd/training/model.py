"""The student on megatron-core: GPTModel chunks, DDP, the (distributed) optimizer, the schedule.

Weights are initialized independently of the parallel layout: every tensor is
drawn whole from a generator keyed by the run seed and its checkpoint key (and
its layer), and each rank keeps the slice that megatron-core's sharded state
dict assigns it. A TP2xPP2 run therefore starts from bitwise the same model as
a one-process run with the same seed, which is what lets layouts be compared
step by step (and lets a run change layout through a checkpoint).
"""

from __future__ import annotations

import hashlib
import math
import random

import numpy as np
import torch
import torch.nn.functional as F

from megatron_slkd.errors import ConfigError
from megatron_slkd.training.config import ModelConfig, OptimConfig, TrainConfig

__all__ = [
    "padded_vocab_size",
    "transformer_config",
    "layer_spec",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "init_weights",
]


def padded_vocab_size(vocab_size: int, cfg: ModelConfig, tensor_parallel: int) -> int:
    """The embedding rows: the vocabulary padded so every tensor-parallel shard is equal."""
    multiple = cfg.make_vocab_size_divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def transformer_config(cfg: TrainConfig, dtype: torch.dtype, device: str = "cpu"):
    """megatron-core TransformerConfig of the student for this run's layout."""
    from megatron.core.transformer import TransformerConfig

    m, p = cfg.model, cfg.parallel
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        normalization=m.normalization,
        gated_linear_unit=m.swiglu,
        activation_func=F.silu if m.swiglu else F.gelu,
        add_bias_linear=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline,
        sequence_parallel=p.sequence_parallel,
        use_cpu_initialization=True,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        calculate_per_token_loss=True,
        # gloo pairs batched isend/irecv wrongly in the interleaved schedule (later
        # micro-batches received other activations); NCCL batches them correctly.
        batch_p2p_comm=device.startswith("cuda"),
    )


def layer_spec(cfg: ModelConfig, device: str, sequence_parallel: bool = False,
               document_mask: bool = False):  # fmt: skip
    """Transformer Engine's layer spec when it imports on GPU (or is asked for), else local.
    ``document_mask``: the dataset's attention mask keeps each document to itself."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    impl = cfg.transformer_impl
    if impl == "auto":
        try:
            import transformer_engine  # noqa: F401

            impl = "transformer_engine" if device.startswith("cuda") else "local"
        except ImportError:
            impl = "local"
    if impl == "transformer_engine" and document_mask:
        # Its causal attention never reads the mask: documents would see each other, silently.
        raise ConfigError(
            "data.reset_attention_mask needs the local layer spec: Transformer Engine's causal "
            "attention ignores the dataset's attention mask; add --model-transformer-impl "
            "local, or drop --data-reset-attention-mask"
        )
    if impl == "transformer_engine":
        try:
            return specs.get_gpt_layer_with_transformer_engine_spec()
        except Exception as exc:  # TE missing or broken: say so rather than fall back silently
            raise ConfigError(f"model.transformer_impl=transformer_engine: {exc}") from exc
    if sequence_parallel:
        raise ConfigError(
            "parallel.sequence_parallel needs the Transformer Engine layer spec (megatron-core's "
            "local spec uses torch norms, which do not support it); drop "
            "--parallel-sequence-parallel or install transformer_engine"
        )
    return specs.get_gpt_layer_local_spec(normalization=cfg.normalization)


def _draw(key: str, layer: tuple[int, ...], shape, std: float, seed: int) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}|{key}|{layer}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=g)


def init_weights(chunks, cfg: ModelConfig, seed: int) -> None:
    """Layout-independent initialization (module docstring), in place, before DDP wraps.

    Norm weights and biases keep megatron-core's constant initialization;
    output projections (attention ``linear_proj``, MLP ``linear_fc2``) get
    std / sqrt(2 * layers), everything else std.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    std = cfg.init_method_std
    scaled = std / math.sqrt(2.0 * cfg.num_layers)
    with torch.no_grad():
        for chunk in chunks:
            sd = chunk.sharded_state_dict()
            apply_factories(sd)
            for sh in nested_values(sd):
                if not isinstance(sh, ShardedTensor) or sh.data is None:
                    continue
                name = sh.key.rsplit(".", 1)
                if "norm" in sh.key or name[-1] != "weight":
                    continue
                k = sh.prepend_axis_num
                sigma = scaled if name[0].endswith(("linear_proj", "linear_fc2")) else std
                full = _draw(sh.key, tuple(sh.global_offset[:k]), sh.global_shape[k:], sigma, seed)
                offsets = zip(sh.global_offset[k:], sh.data.shape, strict=True)
                index = tuple(slice(o, o + n) for o, n in offsets)
                sh.data.copy_(full[index])


def build_model(cfg: TrainConfig, vocab_size: int, device: str, dtype: torch.dtype):
    """This rank's model chunks (one per virtual stage), initialized and wrapped in megatron DDP."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    # Every generator whose state a checkpoint saves is seeded, as Megatron-LM does, so a
    # checkpoint depends on nothing but the run's settings (the weights draw from their own).
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed % 2**32)
    torch.manual_seed(cfg.train.seed)
    model_parallel_cuda_manual_seed(cfg.train.seed)
    tconf = transformer_config(cfg, dtype, device)
    spec = layer_spec(cfg.model, device, cfg.parallel.sequence_parallel,
                      document_mask=cfg.data.reset_attention_mask)  # fmt: skip
    vocab = padded_vocab_size(vocab_size, cfg.model, cfg.parallel.tensor)
    chunks = []
    vp = cfg.parallel.virtual_pipeline
    for stage in range(vp or 1):
        vp_stage = stage if vp else None
        model = GPTModel(
            tconf,
            spec,
            vocab_size=vocab,
            max_sequence_length=cfg.model.seq_length,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=cfg.model.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=int(cfg.model.rotary_base),
            vp_stage=vp_stage,
        )
        model.model_type = getattr(model, "model_type", None)
        chunks.append(model.to(device))
    init_weights(chunks, cfg.model, cfg.train.seed)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        check_for_nan_in_grad=True,
    )
    wrapped = [
        DistributedDataParallel(tconf, ddp_config, chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    tconf.finalize_model_grads_func = finalize_model_grads
    tconf.no_sync_func = [w.no_sync for w in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    return wrapped


def build_optimizer(chunks, cfg: OptimConfig, dtype: torch.dtype, distributed: bool):
    """megatron-core's Adam over the chunks (sharded over data parallel when ``distributed``)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=distributed,
    )
    return get_megatron_optimizer(config, chunks)


def build_scheduler(optimizer, cfg: OptimConfig, steps: int):
    """Linear warmup then cosine decay to ``min_lr`` over the run (megatron-core's scheduler).

    Its settings win over a checkpoint's on resume (megatron-core's default is the
    checkpoint's, silently: a resume with more steps or another learning rate kept the old
    schedule); the loop says which changed."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    warmup = min(cfg.warmup_steps, max(steps - 1, 0))
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=steps,
        lr_decay_style="cosine",
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
