"""Peak extra memory of vocab-parallel RS sampling per rank, at TP 1, 2 and 4 on gloo.

    python benchmarks/sampling_memory.py [--tokens 1024 --vocab 131072] [--no-save]

Each rank holds its float32 logit shard [T, V/tp], made in place; the rise of
the peak resident memory (ru_maxrss) during one sampling call, after the
kernels are compiled and warmed, is what the sampler adds. Target (issue
"Teacher cache builder"): it scales with V/tp, not V; no rank ever
materializes [T, V].
"""

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from _common import record  # noqa: E402

from megatron_slkd.sampling import sample_sparse_targets  # noqa: E402
from megatron_slkd.testing import run_distributed  # noqa: E402


def _worker(rank, world, tokens, vocab, out):
    width = vocab // world
    g = torch.Generator().manual_seed(rank)
    pos = torch.arange(tokens)
    warm = torch.randn(8, width, generator=g)
    sample_sparse_targets(warm, method="rs", seed=0, positions=pos[:8], tp_group=dist.group.WORLD)
    shard = torch.empty(tokens, width).normal_(
        std=3.0, generator=g
    )  # one allocation, no temporaries
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sample_sparse_targets(shard, method="rs", seed=0, positions=pos, tp_group=dist.group.WORLD)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(out, f"{world}-{rank}.json").write_text(
        json.dumps({"extra_mb": (after - before) / 1024, "shard_mb": shard.numel() * 4 / 2**20})
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, default=1024, help="rows T")
    p.add_argument("--vocab", type=int, default=131072, help="vocabulary V")
    p.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for tp in (1, 2, 4):
            run_distributed(_worker, tp, args.tokens, args.vocab, tmp)
            rows = [json.loads(Path(tmp, f"{tp}-{r}.json").read_text()) for r in range(tp)]
            record(
                "sampling_memory",
                f"rs_extra_memory_tp{tp}",
                save=not args.no_save,
                tp=tp,
                tokens=args.tokens,
                vocab=args.vocab,
                shard_mb=round(rows[0]["shard_mb"], 1),
                full_logits_mb=round(args.tokens * args.vocab * 4 / 2**20, 1),
                extra_mb_max_rank=round(max(r["extra_mb"] for r in rows), 1),
                target="extra memory scales with V/tp",
            )


if __name__ == "__main__":
    main()
