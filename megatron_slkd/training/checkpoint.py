"""Checkpoints of the student run with megatron-core ``dist_checkpointing``.

A checkpoint ``<dir>/checkpoints/iter_0000100`` holds the model chunks, the
optimizer (sharded over data parallel with the distributed optimizer), the
learning-rate scheduler, the step, the consumed samples and every rank's RNG
state. It is written to ``iter_...tmp`` and renamed when all ranks are done;
``<dir>/checkpoints/latest`` (a checksummed JSON record) names the newest
complete one, so a run killed
while saving resumes from the previous checkpoint. Loading reshards model and
optimizer to the run's layout; RNG state is restored when the layout matches.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from megatron_slkd.errors import CheckpointError, quoted
from megatron_slkd.liveness import peer_gone
from megatron_slkd.records import dump_record, parse_record

__all__ = [
    "CheckpointError",
    "checkpoint_step",
    "latest_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
]

LATEST = "latest"


def _root(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir) -> Path | None:
    """The newest complete checkpoint of ``run_dir`` (None when there is none)."""
    marker = _root(run_dir) / LATEST
    if not marker.is_file():
        return None
    text = marker.read_text()
    if text.lstrip().startswith("{"):
        name = parse_record(text, marker, CheckpointError).get("checkpoint")
        if not isinstance(name, str):
            raise CheckpointError(f"{marker}: no checkpoint name in the record; remove {marker}")
    else:  # a marker written before records carried checksums: the bare name
        name = text.strip()
    path = _root(run_dir) / name
    if not path.is_dir():
        raise CheckpointError(f"{marker} names {path.name}, which is missing; remove {marker}")
    return path


def checkpoint_step(path: Path) -> int:
    """The step checkpoint directory ``path`` (``iter_NNNNNNN``) was saved at."""
    name = Path(path).name
    if not re.fullmatch(r"iter_\d+", name):
        raise CheckpointError(f"{path}: not a checkpoint directory (iter_NNNNNNN)")
    return int(name[len("iter_"):])


def _rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _layout() -> tuple[tuple[int, ...], tuple[int, ...]]:
    from megatron.core import parallel_state as ps

    shape = (
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_data_parallel_world_size(),
    )
    where = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_data_parallel_rank(),
    )
    return shape, where


def _unwrap(chunk):
    """The GPTModel inside megatron DDP (checkpoint keys carry no ``module.`` prefix)."""
    return getattr(chunk, "module", chunk)


def _sharded_state(chunks, optimizer, *, loading: bool, rng: dict | None,
                   reshardable: bool) -> dict:  # fmt: skip
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    sd: dict = {}
    for i, chunk in enumerate(chunks):
        sd["model" if len(chunks) == 1 else f"model{i}"] = _unwrap(chunk).sharded_state_dict()
    model_sd = sd["model"] if len(chunks) == 1 else {k: v for k, v in sd.items()}
    # fully_reshardable: any TP/PP/DP on resume; dp_reshardable: faster, same TP/PP only.
    kind = "fully_reshardable" if reshardable else "dp_reshardable"
    sd["optimizer"] = optimizer.sharded_state_dict(
        model_sd, is_loading=loading, metadata={"distrib_optim_sharding_type": kind}
    )
    shape, where = _layout()
    sd["rng"] = ShardedObject("rng_state", rng, shape, where, replica_id=0)
    return sd


def save_checkpoint(run_dir, step: int, chunks, optimizer, scheduler, consumed: int,
                    keep: int = 2, reshardable: bool = False) -> Path:  # fmt: skip
    """Save step ``step`` (all ranks call this); returns the checkpoint directory.

    Raises:
        CheckpointError: where a rank could not write (a full or read-only file system,
            a dead writer process); ``latest`` still names the previous checkpoint, and the
            partial directory is removed (by the next save where rank 0 wrote fine).
            megatron-core's save runs collectives of its own (planning, a barrier before
            the metadata), so a rank that fails inside it cannot agree with the others,
            which may be waiting in one: it stops alone, and the run's peer watch
            (:mod:`megatron_slkd.liveness`) stops them with its message. Errors that
            torch's checkpointing gathers (a write that fails on any rank) reach every
            rank at once.
    """
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    root = _root(run_dir)
    name = f"iter_{step:07d}"
    final, tmp = root / name, root / (name + ".tmp")
    rank = dist.get_rank()

    def prepare():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def publish():
        from megatron_slkd.records import atomic_write_text

        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        atomic_write_text(root / LATEST, dump_record({"checkpoint": name, "step": step}))
        done = sorted(p for p in root.glob("iter_*") if not p.name.endswith(".tmp"))
        for old in done[: max(len(done) - max(keep, 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)

    _together(prepare if rank == 0 else None, tmp, step)
    _writer_results_die_with_this_process()
    sd = _sharded_state(chunks, optimizer, loading=False, rng=_rng_state(), reshardable=reshardable)
    sd.update(step=step, consumed_samples=consumed, scheduler=scheduler.state_dict(),
              layout=list(_layout()[0]), reshardable=reshardable)  # fmt: skip
    try:
        dist_checkpointing.save(sd, str(tmp))
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - reported
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if peer_gone(exc):  # another rank failed and left: the run's watch quotes it
            raise
        raise _write_error(exc, tmp, step) from exc
    _together(publish if rank == 0 else None, tmp, step)
    return final


def _writer_results_die_with_this_process() -> None:
    """megatron-core's file writer gathers its results through a queue held by a
    multiprocessing Manager, a server process started with *spawn* at the first save.
    A run killed with SIGKILL left that server behind (seen here: reparented, running
    for ever) wherever no launcher kills the process group or cgroup. Started here first,
    from the main thread, it ends with this process (:func:`launch.die_with_parent`).
    Where megatron-core keeps no such queue (another version), nothing is done."""
    import multiprocessing
    import os
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_slkd.launch import die_with_parent

    if getattr(filesystem_async, "_results_queue", True) is not None:  # made, or none kept
        return
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
    filesystem_async._results_queue = manager.Queue()  # the proxy keeps its manager alive


def _together(fn, tmp: Path, step: int) -> None:
    """Run ``fn`` (None: nothing on this rank), then agree: if it failed anywhere, every
    rank raises (none is left waiting in a collective) and the partial save is removed."""
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_slkd.launch import any_rank

    error = None
    try:
        if fn is not None:
            fn()
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - reported, on every rank
        error = exc
    if not any_rank(error is not None):
        return
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if error is None:
        raise CheckpointError(f"{tmp}: another rank could not write the checkpoint of step "
                              f"{step} (see its message)")  # fmt: skip
    raise _write_error(error, tmp, step) from error


def _write_error(error: BaseException, tmp: Path, step: int) -> CheckpointError:
    """``error`` of writing ``tmp`` as one line, with the space left there."""
    lines = str(error).strip().splitlines()  # a CheckpointException holds tracebacks
    why = lines[-1] if lines else type(error).__name__
    if isinstance(error, (BrokenPipeError, ConnectionResetError, EOFError)):
        return CheckpointError(
            f"{tmp}: the checkpoint of step {step} could not be written: megatron-core's "
            f"writer process is gone ({why}; the out-of-memory killer, most likely: give "
            "the job more host memory); rerun the same command: it resumes from the last "
            "complete checkpoint"
        )
    try:
        free = f"{shutil.disk_usage(tmp.parent).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "its file system is unreadable"
    return CheckpointError(
        f"{tmp}: the checkpoint of step {step} could not be written ({why}; {free}); free "
        "space or fix the file system, then rerun the same command: it resumes from the "
        "last complete checkpoint"
    )


def _materialize_optimizer_state(optimizer) -> None:
    """Give every parameter its Adam state (a step with lr 0 on zero gradients).

    A fresh torch Adam has no per-parameter state, and megatron-core's
    distributed optimizer describes the state it will load from the one it has.
    The values are replaced by the checkpoint's.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        if any(inner.state.values()):  # (entries may exist but be empty)
            continue
        saved = [(g["lr"], g["weight_decay"]) for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"], g["weight_decay"] = 0.0, 0.0
            for p in g["params"]:
                p.grad = torch.zeros_like(p)
        inner.step()
        for g, (lr, wd) in zip(inner.param_groups, saved, strict=False):
            g["lr"], g["weight_decay"] = lr, wd
            for p in g["params"]:
                p.grad = None


def _set_adam_step(optimizer, step: int) -> None:
    """torch Adam keeps a step count per parameter; megatron-core 0.16 does not restore it
    into a state that already exists (see :func:`_materialize_optimizer_state`). Every
    training step updates every parameter (a skipped update stops the run), so the count
    is the training step."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for st in opt.optimizer.state.values():
            if "step" in st:
                st["step"] = torch.tensor(float(step), dtype=st["step"].dtype)


def _keep_adam_settings(optimizer) -> dict:
    """Give Adam the run's betas and eps again after a load (torch restores a checkpoint's
    param groups, so a resume with other ones kept the old, silently); returns each that
    the checkpoint had another value of: (checkpoint's, now)."""
    changes: dict = {}
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        c = opt.config
        for g in opt.optimizer.param_groups:
            (b1, b2), eps = g["betas"], g["eps"]
            for k, a, b in (("adam_beta1", b1, c.adam_beta1), ("adam_beta2", b2, c.adam_beta2),
                            ("adam_eps", eps, c.adam_eps)):  # fmt: skip
                if a != b:
                    changes[k] = (a, b)
            g["betas"], g["eps"] = (c.adam_beta1, c.adam_beta2), c.adam_eps
    return changes


class Restored(NamedTuple):
    """What :func:`load_checkpoint` restored."""

    step: int
    consumed: int
    changes: dict
    """Each optimizer or schedule setting the checkpoint has another value of than the
    run, which keeps its own: (checkpoint's, now)."""


_SCHEDULE = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style",
             "start_wd", "end_wd", "wd_incr_steps", "wd_incr_style")  # fmt: skip


def load_checkpoint(path: Path, chunks, optimizer, scheduler) -> Restored:
    """Restore a checkpoint into the run. Adam and the scheduler keep the run's own
    settings (the scheduler is built with megatron-core's override) and take the
    checkpoint's state and step count only."""
    from megatron.core import dist_checkpointing

    _materialize_optimizer_state(optimizer)
    common = dist_checkpointing.load_common_state_dict(str(path))
    sd = _sharded_state(chunks, optimizer, loading=True, rng=None,
                        reshardable=bool(common.get("reshardable", False)))  # fmt: skip
    same_layout = list(common.get("layout", ())) == list(_layout()[0])
    if not same_layout:
        del sd["rng"]
    try:
        state = dist_checkpointing.load(sd, str(path))
    except BaseException as exc:  # CheckpointException derives from BaseException
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        raise CheckpointError(
            f"{path}: cannot load into this model ({type(exc).__name__}: {quoted(exc)}); was it "
            "saved by a run with another model shape? Start a new run directory or restore the "
            "config"
        ) from None
    if len(chunks) == 1:
        _unwrap(chunks[0]).load_state_dict(state["model"])
    else:
        for i, chunk in enumerate(chunks):
            _unwrap(chunk).load_state_dict(state[f"model{i}"])
    with torch.no_grad():  # fp32 runs: the optimizer's main params are views of the model's
        optimizer.load_state_dict(state["optimizer"])
    changes = _keep_adam_settings(optimizer)
    _set_adam_step(optimizer, int(common["step"]))
    saved, now = common["scheduler"], scheduler.state_dict()
    changes.update((k, (saved[k], now[k])) for k in _SCHEDULE if k in saved and saved[k] != now[k])
    scheduler.load_state_dict(saved)
    if same_layout:
        _set_rng_state(state["rng"])
    return Restored(int(common["step"]), int(common["consumed_samples"]), changes)
