"""Re-key caches for a dataset that holds the same documents in another arrangement.

Megatron-LM's tools/merge_datasets.py output of several prefixes, a subset, a
re-ordered or deduplicated copy: each document of --data-prefix is matched by
content (length and the XXH3-128 of its tokens) to a document of the source caches'
datasets, and its entries are copied, not re-sampled; no teacher runs.

    slkd remap-cache cache-a/ cache-b/ --data-prefix data/merged_text_document \\
        --output cache-merged/
    mpirun -n 4 slkd remap-cache cache-a/ cache-b/ --data-prefix NEW --output OUT --num-shards 8

Each source cache is checked against its dataset (the prefix its manifest
records, or --source-prefix CACHE=PREFIX where it moved). Documents without a
match are listed and the command fails, unless --allow-missing (their rows are
then empty, and training uses cross-entropy there). Under mpirun the ranks
split the shards and rank 0 writes the manifest.
"""

from __future__ import annotations

import argparse

from megatron_slkd.ownership import add_lock_argument
from megatron_slkd.publish import URL_OUTPUT_HELP, add_publish_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("caches", nargs="+", help="source cache directories")
    p.add_argument("--data-prefix", required=True, help="the new dataset's prefix")
    p.add_argument("--output", required=True, help="the new cache directory" + URL_OUTPUT_HELP)
    p.add_argument("--source-prefix", nargs="+", default=[], metavar="CACHE=PREFIX",
                   help="a source cache's dataset, if not at its recorded prefix")  # fmt: skip
    p.add_argument("--allow-missing", action="store_true",
                   help="give documents without a match empty rows instead of failing")  # fmt: skip
    p.add_argument("--num-shards", type=int, default=None,
                   help="shards of the new cache (default: one per MPI rank)")  # fmt: skip
    p.add_argument("--no-mpi", action="store_true", help="ignore an MPI launcher")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_lock_argument(p)
    add_publish_argument(p)


def run(args: argparse.Namespace) -> int:
    from megatron_slkd.cli import emit
    from megatron_slkd.cli.verify_cache import _mpi_comm
    from megatron_slkd.data.remap import remap_cache
    from megatron_slkd.errors import ConfigError

    pairs = [s.split("=", 1) for s in args.source_prefix]
    if any(len(x) != 2 for x in pairs):
        raise ConfigError(f"--source-prefix takes CACHE=PREFIX entries, got {args.source_prefix}")
    comm = _mpi_comm(args.no_mpi)
    size = comm.Get_size() if comm is not None else 1
    report = remap_cache(
        args.caches, args.data_prefix, args.output, source_prefixes=dict(pairs),
        allow_missing=args.allow_missing, num_shards=args.num_shards or size, comm=comm,
        progress=not args.no_progress and (comm is None or comm.Get_rank() == 0),
        lock_timeout=args.lock_timeout,
    )  # fmt: skip
    if comm is not None and comm.Get_rank() != 0:
        return 0

    def human(r):
        rate = r["tokens_copied"] / max(r["seconds"], 1e-9) / 1e6
        print(
            f"remapped {r['documents']} documents, {r['tokens']} tokens from "
            f"{len(r['sources'])} caches -> {r['output']} ({r['seconds']} s, {rate:.1f}M tokens/s)"
        )
        if r["missing_documents"]:
            ids = r["missing_documents"]
            print(f"  {len(ids)} documents without a match have empty rows: {ids[:20]}")
        if not r["complete"]:
            print("  other shards are missing; when all are written, run merge-cache")

    emit(report, args.json, human)
    return 0
