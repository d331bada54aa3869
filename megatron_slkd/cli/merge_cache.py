"""Merge shard directories (or caches) into one cache directory with a manifest.

Every document of the dataset must be covered exactly once; gaps and overlaps
are reported by document range. Shard files are hard-linked (or copied).

    slkd merge-cache cache-parts/ --output cache/
"""

from __future__ import annotations

import argparse

from megatron_slkd.cache.merge import merge_cache
from megatron_slkd.ownership import add_lock_argument
from megatron_slkd.publish import URL_OUTPUT_HELP, add_publish_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="DIR",
        help="directories holding shards with their .json sidecars, or caches",
    )
    p.add_argument("--output", required=True, help="the merged cache directory" + URL_OUTPUT_HELP)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_lock_argument(p)
    add_publish_argument(p)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from megatron_slkd.cache.manifest import MANIFEST_NAME
    from megatron_slkd.cli import emit
    from megatron_slkd.ownership import claim

    with claim(Path(args.output) / MANIFEST_NAME, what="merged cache", timeout_s=args.lock_timeout):
        report = merge_cache(args.inputs, args.output)
    emit(
        report,
        args.json,
        lambda r: print(
            f"merged {r['shards']} shards ({r['documents']} documents, {r['tokens']} tokens, "
            f"{r['bytes']} bytes) into {r['output']}"
        ),
    )
    return 0
