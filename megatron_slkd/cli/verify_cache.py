"""Verify a cache: every CRC, a full decode, and alignment with its dataset.

With --data-prefix it also checks the document count, every document length,
each shard's 128-bit token identity and the tokenizer fingerprint (of PREFIX.meta.json,
or of the tokenizer named by --tokenizer-type/--tokenizer-model or --data-meta). Under mpirun the
shards are split across the ranks:

    mpirun -n 4 slkd verify-cache cache/ --data-prefix data/corpus

Exit status: 0 when everything checks, 1 when problems were found.
"""

from __future__ import annotations

import argparse
import os

from megatron_slkd.data.describe import add_tokenizer_arguments
from megatron_slkd.data.verify import verify_cache


def _mpi_comm(disabled: bool):
    size = int(os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("PMI_SIZE") or 1)
    if disabled or size <= 1:
        return None
    from mpi4py import MPI

    return MPI.COMM_WORLD


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("cache", help="the cache directory")
    p.add_argument("--data-prefix", help="IndexedDataset prefix to check alignment against")
    p.add_argument(
        "--skip-token-checksum",
        action="store_true",
        help="compare document lengths only, not the tokens' identities (faster)",
    )
    p.add_argument("--no-mpi", action="store_true", help="ignore an MPI launcher")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_tokenizer_arguments(p)


def run(args: argparse.Namespace) -> int:
    from megatron_slkd.cli import emit

    comm = _mpi_comm(args.no_mpi)
    record = None
    if args.data_prefix and (args.tokenizer_type or args.data_meta):
        from megatron_slkd.data.describe import check_dataset, resolve_meta

        record = resolve_meta(args.data_prefix, args)
        check_dataset(args.data_prefix, record, progress=False)
    report = verify_cache(
        args.cache, args.data_prefix, comm=comm, tokens=not args.skip_token_checksum,
        data_meta=record,
    )  # fmt: skip
    if comm is not None and comm.Get_rank() != 0:
        return 0 if report["ok"] else 1

    def human(r):
        for p in r["problems"]:
            print(f"PROBLEM: {p}")
        if r["ok"]:
            aligned = f", aligned with {r['aligned_with']}" if r["aligned_with"] else ""
            print(
                f"OK: {r['path']}: {r['shards']} shards, {r['documents']} documents, "
                f"{r['tokens']} tokens{aligned} ({r['ranks']} ranks, {r['seconds']} s)"
            )

    emit(report, args.json, human)
    return 0 if report["ok"] else 1
