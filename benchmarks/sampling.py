"""RS sampling cost against torch.softmax on the same logits.

    python benchmarks/sampling.py [--tokens 4096 --vocab 131072] [--no-save]

Target (issue "Foundation"): RS with N=50 on [4096, 131072] float32 logits on
CPU in at most 2x the time of torch.softmax on the same tensor.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import best_of, record  # noqa: E402

from megatron_slkd.sampling import sample_sparse_targets  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=4096, help="rows of the logits")
    p.add_argument("--vocab", type=int, default=131072, help="vocabulary size")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions (best is kept)")
    p.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results")
    args = p.parse_args()
    torch.manual_seed(0)
    logits = torch.randn(args.tokens, args.vocab) * 4
    pos = torch.arange(args.tokens)
    sample_sparse_targets(logits[:8], method="rs", seed=0, positions=pos[:8])  # compile kernels
    t_softmax = best_of(lambda: torch.softmax(logits, -1), args.repeats)
    for method, kw in (("rs", {"num_samples": 50}), ("topk", {"k": 50})):
        t = best_of(
            lambda kw=kw, method=method: sample_sparse_targets(
                logits, method=method, seed=1, positions=pos, **kw
            ),
            args.repeats,
        )
        record(
            "sampling",
            f"{method}_vs_softmax",
            save=not args.no_save,
            method=method,
            **kw,
            tokens=args.tokens,
            vocab=args.vocab,
            seconds=round(t, 4),
            softmax_seconds=round(t_softmax, 4),
            ratio=round(t / t_softmax, 3),
            threads=torch.get_num_threads(),
            target="rs ratio <= 2.0" if method == "rs" else "informational",
        )


if __name__ == "__main__":
    main()
