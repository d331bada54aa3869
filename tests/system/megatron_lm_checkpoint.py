"""Write a checkpoint with Megatron-LM's own ``save_checkpoint``, and its model's logits.

    PYTHONPATH=$MEGATRON_LM_DIR python megatron_lm_checkpoint.py SAVE TOKENS LOGITS \
        [--slkd-hf-weights HF_DIR] [ARG...]

Megatron-LM's argument parser and ``validate_args`` take the model arguments
(ARG...), Megatron-LM's ``model_provider`` with ``gpt_builder`` builds the GPT
model, every parameter is moved off its initial value (norm weights and biases
included, so a misplaced one shows), or, with ``--slkd-hf-weights``, takes the
weights of a Hugging Face Llama-family model of that architecture, and
``megatron.training.checkpointing.save_checkpoint`` writes iteration 3 under
SAVE, as ``pretrain_gpt.py --save`` would (torch_dist format, no optimizer).
The model's full-vocabulary logits on the ``[B, S]`` token tensor in TOKENS,
computed in float32 from the saved values, are saved to LOGITS.
``pretrain()`` itself is not run (its initialization asserts CUDA): gloo,
megatron-core's parallel state and the CPU compat module stand in for it.
"""

import os
import sys

import torch

os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
os.environ.setdefault("MASTER_PORT", "29878")

from gpt_builders import gpt_builder  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402
from megatron.training.arguments import parse_args, validate_args  # noqa: E402
from megatron.training.checkpointing import save_checkpoint  # noqa: E402
from megatron.training.global_vars import set_global_variables  # noqa: E402
from model_provider import model_provider  # noqa: E402

from megatron_slkd.compat import cpu  # noqa: E402


def _load_hf(model, directory: str) -> None:
    """The Hugging Face model's weights, in megatron-core's layout, into ``model``."""
    from transformers import AutoModelForCausalLM

    from megatron_slkd.gguf import dtype_kwargs
    from megatron_slkd.teacher.megatron import _convert_state_dict, _spec_from_hf

    hf = AutoModelForCausalLM.from_pretrained(directory, **dtype_kwargs(torch.float32))
    spec = _spec_from_hf(hf.config)
    spec["padded_vocab_size"] = model.embedding.word_embeddings.weight.shape[0]
    missing, unexpected = model.load_state_dict(
        _convert_state_dict(hf.state_dict(), spec), strict=False
    )
    missing = [k for k in missing if not k.endswith("_extra_state")]
    assert not missing and not unexpected, (missing[:5], unexpected[:5])


def main() -> None:
    save, tokens_path, logits_path = sys.argv[1:4]
    rest, hf_weights = sys.argv[4:], None
    if rest[:1] == ["--slkd-hf-weights"]:
        hf_weights, rest = rest[1], rest[2:]
    sys.argv = [
        "pretrain_gpt.py", "--micro-batch-size", "1", "--global-batch-size", "1",
        "--train-iters", "3", "--lr", "1e-3", "--save", save, "--save-interval", "3",
        "--no-save-optim", "--no-save-rng",
        "--use-cpu-initialization", "--no-gradient-accumulation-fusion",
        "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion", "--no-bias-gelu-fusion",
        "--no-persist-layer-norm", "--no-rope-fusion", "--distributed-backend", "gloo",
        "--transformer-impl", "local", *rest,
    ]  # fmt: skip
    args = parse_args()
    validate_args(args, {})
    set_global_variables(args)
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    cpu.enable()
    ps.initialize_model_parallel(1, 1)
    torch.manual_seed(args.seed)
    model_parallel_cuda_manual_seed(args.seed)
    model = model_provider(gpt_builder)
    with torch.no_grad():
        if hf_weights:
            _load_hf(model, hf_weights)
        else:
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        if args.bf16:
            model.bfloat16()  # what Megatron-LM's Float16Module does to the weights it saves
    save_checkpoint(3, [model], None, None, 0)
    with torch.no_grad():
        # In float32 from the saved values: a reference for the weights, not for bf16 math.
        model.float().eval()
        tokens = torch.load(tokens_path)
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        causal = torch.ones(1, 1, tokens.shape[1], tokens.shape[1], dtype=torch.bool).triu(1)
        logits = model(tokens, positions, causal)
    torch.save(logits[..., : args.padded_vocab_size].contiguous(), logits_path)
    print("saved", save, tuple(logits.shape))


if __name__ == "__main__":  # megatron-core's checkpoint writer spawns processes
    main()
