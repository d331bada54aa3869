"""Derive an RS cache with fewer draws (N2 < N) without rerunning the teacher.

Keeps N2 of each position's N draws, uniformly without replacement
(multivariate hypergeometric thinning): exactly the law of an N2-draw cache.

    slkd thin-cache cache/ --num-samples 12 --output cache-n12/
"""

from __future__ import annotations

import argparse

from megatron_slkd.cache.thin import thin_cache
from megatron_slkd.cli import seed
from megatron_slkd.ownership import add_lock_argument
from megatron_slkd.publish import URL_OUTPUT_HELP, add_publish_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("cache", help="the source RS cache directory")
    p.add_argument("--num-samples", type=int, required=True, help="draws to keep per position")
    p.add_argument("--output", required=True, help="the new cache directory" + URL_OUTPUT_HELP)
    p.add_argument("--seed", type=seed, default=0, help="thinning seed, in [0, 2**64) (default 0)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_lock_argument(p)
    add_publish_argument(p)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from megatron_slkd.cache.manifest import MANIFEST_NAME
    from megatron_slkd.cli import emit
    from megatron_slkd.ownership import claim

    with claim(
        Path(args.output) / MANIFEST_NAME, what="thinned cache", timeout_s=args.lock_timeout
    ):
        report = thin_cache(args.cache, args.output, args.num_samples, seed=args.seed)
    emit(
        report,
        args.json,
        lambda r: print(
            f"thinned {r['shards']} shards from N={r['from']} to N={r['num_samples']} "
            f"draws into {r['output']}"
        ),
    )
    return 0
