"""Helpers for tests and benchmarks: gloo process groups on CPU, a tiny teacher.

``run_distributed(fn, world_size, *args, tp=1, pp=1)`` starts ``world_size``
processes, initializes a gloo process group on a free local port (retrying
when another process grabs the port first), optionally initializes
megatron-core ``parallel_state`` with the given tensor and pipeline sizes
(data parallel takes the rest), calls ``fn(rank, world_size, *args)`` in each,
and re-raises the first failure in the caller. ``fn`` must be importable by
name (a module-level function), as ``torch.multiprocessing`` spawns fresh
interpreters.

``write_tiny_teacher(directory, tokenizer)`` saves a small random Llama with the
vocabulary of a Hugging Face tokenizer (and that tokenizer) as a teacher
directory: it loads in a second and runs thousands of tokens per second on one
core, for tests of everything around the teacher.
"""

from __future__ import annotations

import os
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_slkd.launch import close_distributed, free_port

__all__ = ["free_port", "run_distributed", "write_tiny_teacher"]

_PORT_ERRORS = ("Address already in use", "EADDRINUSE", "address already in use")


def _worker(rank, world_size, port, fn, args, tp, pp, megatron, threads, cp=1):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        if megatron:
            from megatron.core import parallel_state

            from megatron_slkd.compat import cpu

            cpu.enable()
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=tp,
                pipeline_model_parallel_size=pp,
                context_parallel_size=cp,
            )
        fn(rank, world_size, *args)
    except BaseException as exc:
        raise RuntimeError(f"rank {rank} failed:\n{traceback.format_exc()}") from exc
    finally:
        close_distributed()  # also the groups a cycle holds (pytest.raises keeps one)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    megatron: bool = False,
    retries: int = 3,
) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes.

    Args:
        fn: module-level function; its assertions fail the run.
        world_size: number of processes.
        tp, pp, cp: megatron-core tensor, pipeline and context parallel sizes (used
            when ``megatron`` is true; data parallel is ``world_size / (tp * pp * cp)``).
        megatron: initialize megatron-core ``parallel_state`` (with the CPU
            compat module enabled) before calling ``fn``.
        retries: attempts when the chosen port is taken before gloo binds it.
    """
    if megatron and world_size % (tp * pp * cp):
        raise ValueError(f"world size {world_size} is not divisible by tp*pp*cp={tp * pp * cp}")
    threads = max(1, (os.cpu_count() or 1) // world_size)
    for attempt in range(retries):
        try:
            mp.spawn(
                _worker,
                args=(world_size, free_port(), fn, args, tp, pp, megatron, threads, cp),
                nprocs=world_size,
                join=True,
            )
            return
        except mp.ProcessRaisedException as exc:
            if attempt + 1 < retries and any(e in str(exc) for e in _PORT_ERRORS):
                continue
            raise


def write_tiny_teacher(directory, tokenizer, *, seed: int = 0, layers: int = 2,
                       hidden: int = 32) -> None:  # fmt: skip
    """Save a random Llama (4 heads in 2 query groups, so it shards at TP=2) with the
    vocabulary of ``tokenizer`` (a path the data tokenizer loads from) to ``directory``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_slkd.data.tokenizers import HFTokenizer

    tok = HFTokenizer(str(tokenizer))
    tok._tok.save_pretrained(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=1.0,  # logits of a few units, so comparisons mean something
    )
    LlamaForCausalLM(config).save_pretrained(directory)
