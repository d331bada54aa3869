"""Drive examples/megatron_lm/pretrain_gpt_slkd.py inside a Megatron-LM checkout on CPU.

    PYTHONPATH=$MEGATRON_LM_DIR python megatron_lm_harness.py PREFIX CACHE WORK [ARG...]

Everything the entry script contributes runs as Megatron-LM runs it: Megatron-LM's
argument parser with the ``--slkd-*`` arguments, its dataset config, the dataset
provider, Megatron-LM's pretraining data loader (its default collate), its model
provider and ``gpt_builder``, and megatron-core's schedule calling ``forward_step``
and ``loss_func``. Only ``pretrain()`` itself is replaced (its initialization
asserts CUDA): gloo, megatron-core's parallel state and the CPU compat module stand
in for it. Prints one JSON line per micro-batch report and the gradient count.
"""

import json
import os
import sys
from pathlib import Path

import torch

os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
os.environ.setdefault("MASTER_PORT", "29877")
from megatron_slkd.data.tokenizers import NullTokenizer  # noqa: E402

prefix, cache, work = sys.argv[1], sys.argv[2], sys.argv[3]
extra = sys.argv[4:]  # more Megatron-LM arguments (--num-workers 1 ...)
sys.argv = [
    "pretrain_gpt_slkd.py",
    "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
    "--num-attention-heads", "4", "--seq-length", "64", "--max-position-embeddings", "64",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2", "--lr", "1e-3",
    "--data-path", prefix, "--split", "100,0,0", "--data-cache-path", work, "--num-workers", "0",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", str(NullTokenizer.vocab_size_flag(127)),
    "--slkd-cache", f"{prefix}={cache}", "--slkd-alpha", "0.1",
    "--transformer-impl", "local", "--normalization", "RMSNorm", "--swiglu",
    "--position-embedding-type", "rope", "--disable-bias-linear", "--use-cpu-initialization",
    "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion",
    "--no-persist-layer-norm", "--no-rope-fusion", "--distributed-backend", "gloo", *extra,
]  # fmt: skip
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "megatron_lm"))

import pretrain_gpt_slkd as entry  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402
from megatron.training.arguments import parse_args, validate_args  # noqa: E402
from megatron.training.datasets.data_samplers import build_pretraining_data_loader  # noqa: E402
from megatron.training.global_vars import set_global_variables  # noqa: E402

from megatron_slkd.compat import cpu  # noqa: E402

args = parse_args(extra_args_provider=entry.add_slkd_args)
validate_args(args, {"tokenizer_type": "GPT2BPETokenizer"})
set_global_variables(args)
torch.distributed.init_process_group("gloo", rank=0, world_size=1)
cpu.enable()
ps.initialize_model_parallel(1, 1)
torch.manual_seed(args.seed)  # as Megatron-LM's _set_random_seed: the same model every run
model_parallel_cuda_manual_seed(args.seed)
train, _, _ = entry.train_valid_test_datasets_provider([8, 0, 0])
loader = build_pretraining_data_loader(train, 0)
model = entry.model_provider(entry.gpt_builder)
reports = get_forward_backward_func()(
    forward_step_func=entry.forward_step, data_iterator=iter(loader), model=[model],
    num_microbatches=2, seq_length=64, micro_batch_size=2, forward_only=False,
)  # fmt: skip
for r in reports:
    print(json.dumps({k: float(v[0] / v[1]) for k, v in r.items()}))
grads = sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())
print(json.dumps({"params": len(list(model.parameters())), "with_grad": grads}))
