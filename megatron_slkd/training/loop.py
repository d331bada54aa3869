"""The student pretraining loop on megatron-core (``slkd train``).

Per step: megatron-core's forward-backward schedule (no pipelining, 1F1B or
interleaved, picked from the parallel state) runs the micro-batches; the loss
is summed over tokens and megatron-core's ``finalize_model_grads`` divides the
gradients by the tokens of the whole global batch, so every layout computes
the same update; the (distributed) optimizer clips and steps; the scheduler
advances. The loss on the last pipeline stage is the sparse KD loss of
:mod:`megatron_slkd.loss` against the cached teacher targets (or megatron-core's
vocab-parallel cross-entropy in CE-only mode).

Everything that can be refused is refused before the first step: the
layout against the world size and the model, each data prefix against its
cache, the tokenizer, a checkpoint saved with another model shape or data
order (a dataset rewritten at the same path, or a step count that reorders the
samples consumed, included). A resume keeps this run's optimizer and schedule
settings and says which differ from the checkpoint's.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from megatron_slkd.errors import ConfigError, SlkdError
from megatron_slkd.launch import any_rank, host_all_reduce
from megatron_slkd.preempt import Preempted, PreemptionWatch
from megatron_slkd.training.config import TrainConfig, config_to_dict

__all__ = ["train"]

_METRICS = ("loss", "ce", "kl")


def _log0(*args) -> None:
    if dist.get_rank() == 0:
        print(*args, flush=True)


def _agree(error: BaseException | None) -> None:
    """Raise everywhere when any rank failed a setup check (so no rank waits in a collective)."""
    failed = any_rank(error is not None)
    if error is not None:
        raise error
    if failed:
        raise ConfigError("another rank refused the run during setup; see its error above")


def _all_gather(obj) -> list:
    """``obj`` of every rank, in rank order."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def _checked():
    """Run a setup step on every rank and make them agree on whether it worked."""
    box: list = [None]
    try:
        yield box
    except SlkdError as exc:
        box[0] = exc
    _agree(box[0])


class _Run:
    """What the schedule's callbacks need: the config, the device, the step's timers."""

    def __init__(self, cfg: TrainConfig, device: str, vocab_size: int, kd_train: bool) -> None:
        self.cfg, self.device, self.vocab_size, self.kd_train = cfg, device, vocab_size, kd_train
        self.eval_sums = None


def _loss(run: _Run, batch: dict, output: torch.Tensor):
    """Per-token-summed loss of one micro-batch on the last stage; (loss, tokens, report)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_slkd.loss import vocab_parallel_sparse_kd_loss

    tp_group = ps.get_tensor_model_parallel_group()
    mask = batch["loss_mask"].float()
    labels = batch["labels"]
    if run.kd_train:
        res = vocab_parallel_sparse_kd_loss(
            output, batch["kd_ids"], batch["kd_weights"], labels, alpha=run.cfg.kd.alpha,
            tp_group=tp_group, vocab_size=run.vocab_size, inplace=True,
        )  # fmt: skip
        per, ce = res.loss, res.ce
        kd_mask = mask * (batch["kd_weights"].sum(-1) > 0)
        kl_sum, kl_n = (res.kl * kd_mask).sum(), kd_mask.sum()
    else:
        per = vocab_parallel_cross_entropy(output.float(), labels)
        ce, kl_sum, kl_n = per, torch.zeros(()), torch.zeros(())
    total = (per * mask).sum()
    n = mask.sum()
    report = torch.stack([total.detach(), (ce.detach() * mask).sum(), kl_sum.detach(), n, kl_n])
    return total, n.to(torch.int), {"sums": report.double().cpu()}


def _eval_loss(run: _Run, batch: dict, output: torch.Tensor):
    from megatron.core import parallel_state as ps

    from megatron_slkd.loss import vocab_parallel_sparse_kd_loss
    from megatron_slkd.training.evaluate import calibration_terms

    tp_group = ps.get_tensor_model_parallel_group()
    mask = batch["loss_mask"].float()
    ce, conf, correct = calibration_terms(output, batch["labels"], tp_group=tp_group,
                                          vocab_size=run.vocab_size)  # fmt: skip
    kl = kl_mask = None
    if "kd_ids" in batch:
        res = vocab_parallel_sparse_kd_loss(
            output, batch["kd_ids"], batch["kd_weights"], batch["labels"], alpha=0.0,
            tp_group=tp_group, vocab_size=run.vocab_size, inplace=False,
        )  # fmt: skip
        kl, kl_mask = res.kl, mask * (batch["kd_weights"].sum(-1) > 0)
    if ps.get_tensor_model_parallel_rank() == 0:  # one copy per TP group
        run.eval_sums.add(ce, conf, correct, mask, kl, kl_mask)
    return torch.zeros(()), torch.ones((), dtype=torch.int), {}


def _forward_step(run: _Run, loss_fn, data_iterator, model):
    from megatron_slkd.data.batch import get_kd_batch

    batch = get_kd_batch(data_iterator, device=run.device) or {}
    output = model(batch.get("tokens"), batch.get("position_ids"), batch.get("attention_mask"))
    return output, functools.partial(loss_fn, run, batch)


def _device(cfg: TrainConfig) -> str:
    d = cfg.train.device
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use --train-device cpu")
    return d


class _Saved(NamedTuple):
    """The checkpointed run a resume continues: its latest checkpoint's step, and the
    ``train.steps`` it last ran with (its sample count, on which the order depends)."""

    step: int
    steps: int | None


def _check_saved_config(run_dir: Path, cfg: TrainConfig) -> _Saved | None:
    """Refuse, before anything is built, to resume a checkpoint of another model shape, or
    with other data settings (they would silently change the sample order), or past its
    end; returns what the resume continues (None: nothing to resume)."""
    import yaml

    from megatron_slkd.training.checkpoint import (
        CheckpointError,
        checkpoint_step,
        latest_checkpoint,
    )

    saved = run_dir / "config.yaml"
    latest = latest_checkpoint(run_dir)
    if not saved.is_file() or latest is None:
        return None
    try:
        old = yaml.safe_load(saved.read_text()) or {}
        if not isinstance(old, dict):
            raise ValueError(f"a {type(old).__name__}, not a mapping")
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise CheckpointError(
            f"{saved}: unreadable config of the checkpointed run ({' '.join(str(exc).split())}); "
            "restore it, or use another --checkpoint-dir"
        ) from exc
    new = config_to_dict(cfg)
    free = ("transformer_impl", "hidden_dropout", "attention_dropout")  # may change on resume
    model = {f"model.{k}": (old.get("model", {}).get(k), v)
             for k, v in new["model"].items() if k not in free}  # fmt: skip
    data = {f"{sec}.{k}": (old.get(sec, {}).get(k), new[sec][k])
            for sec, k in (("data", "path"), ("data", "train_path"), ("data", "valid_path"),
                           ("data", "split"), ("data", "seed"),
                           ("train", "global_batch_size"))}  # fmt: skip
    for what, fields in (("model shape", model), ("data order", data)):
        diff = {k: ab for k, ab in fields.items() if ab[0] != ab[1]}
        if diff:
            changes = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(
                f"{run_dir} holds checkpoints of another {what} ({changes}); use another "
                f"{_START_OVER}"
            )
    _check_data_layout(run_dir, cfg)
    step = checkpoint_step(latest)
    if step > cfg.train.steps:
        raise CheckpointError(
            f"{latest}: the run is at step {step}, past --train-steps {cfg.train.steps}; ask "
            f"for {step} steps or more, or use another {_START_OVER}"
        )
    steps = old.get("train", {}).get("steps")
    return _Saved(step, steps if isinstance(steps, int) else None)


_START_OVER = "--checkpoint-dir, or --no-checkpoint-resume to start over in this one"
_DATA_LAYOUT = "data_layout.json"
"""In the run directory: each local data prefix's index_key when the run started."""


def _check_data_layout(run_dir: Path, cfg: TrainConfig) -> None:
    """Refuse to resume on a dataset rewritten at the same path since the run started (a
    new preprocessing, documents added or removed). Same paths and settings pass the
    config check, but megatron-core cuts the new documents into samples of their own, so
    the order would change mid-run: samples seen twice, others never, with no error."""
    from megatron_slkd.data.indexed import index_keys
    from megatron_slkd.training.checkpoint import CheckpointError
    from megatron_slkd.training.data import data_prefixes

    path = run_dir / _DATA_LAYOUT
    try:
        recorded = json.loads(path.read_text())["index_keys"]
        if not isinstance(recorded, dict):
            raise TypeError(f"index_keys is a {type(recorded).__name__}, not a mapping")
    except FileNotFoundError:  # a run started before runs recorded it: nothing to compare
        return
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{path}: unreadable data layout of the checkpointed run ({exc}); restore it, "
            f"or use another {_START_OVER}"
        ) from exc
    now = index_keys(p for p in data_prefixes(cfg)[0] if p in recorded)
    for p, key in now.items():
        if key != recorded[p]:
            raise CheckpointError(
                f"{run_dir} holds checkpoints of a run on other data: {p} was rewritten "
                "since the run started (its documents are not those it was cut into "
                "samples from, so resuming would change the sample order mid-run); restore "
                f"that data, or use another {_START_OVER}"
            )


def _check_order_kept(run_dir: Path, cfg: TrainConfig, saved: _Saved, old_ds, new_ds) -> None:
    """Refuse to resume with another ``train.steps`` where that changes the order of the
    samples the run has consumed: megatron-core shuffles its indices over as many epochs
    as the sample count needs, so resuming would go on in another order (samples seen
    twice, others never), with no error. Within the same epochs the order is the same,
    and the resumed run is the one the new count would have run from the start."""
    from megatron_slkd.training.checkpoint import CheckpointError
    from megatron_slkd.training.data import first_reordered

    consumed = saved.step * cfg.train.global_batch_size
    moved = None if new_ds is None else first_reordered(old_ds, new_ds, consumed)
    if moved is not None:
        raise CheckpointError(
            f"{run_dir} holds checkpoints of a {saved.steps}-step run: megatron-core orders "
            f"the samples of a {cfg.train.steps}-step run otherwise (sample {moved} of the "
            f"{consumed} consumed is another), so resuming would change the order mid-run; "
            f"keep --train-steps {saved.steps}, or use another {_START_OVER}"
        )
    _log0(f"train.steps {saved.steps} -> {cfg.train.steps}: the {consumed} samples consumed "
          "keep their order")  # fmt: skip


class _Logger:
    """Rank 0's progress lines, JSONL records and TensorBoard scalars."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, resume_step: int) -> None:
        self.rank0 = dist.get_rank() == 0
        self.path = run_dir / "train_log.jsonl"
        self.tb = None
        if not self.rank0:
            return
        if self.path.exists():  # the log continues from the checkpoint it resumes
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]  # fmt: skip
            self.path.write_text("".join(k + "\n" for k in keep))
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:
                print("tensorboard is not installed: logging to JSONL only", flush=True)

    def record(self, kind: str, step: int, values: dict) -> None:
        if not self.rank0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _new_window() -> dict:
    """Totals of the steps since the last log line: time, data wait, loss sums, steps."""
    return {"time": 0.0, "wait": 0.0, "sums": torch.zeros(5, dtype=torch.float64), "steps": 0}


def _world_sums(sums: torch.Tensor, contribute: bool) -> torch.Tensor:
    return host_all_reduce(sums.clone() if contribute else torch.zeros_like(sums))


def evaluate(run: _Run, chunks, valid, forward_backward, dp: int) -> dict | None:
    """Held-out LM loss, ECE and KL over the same ``eval.batches`` global batches."""
    from megatron.core import parallel_state as ps

    from megatron_slkd.training.data import make_loader
    from megatron_slkd.training.evaluate import EvalSums, kl_floor

    cfg = run.cfg
    t = cfg.train
    micro = t.global_batch_size // (t.micro_batch_size * dp)
    run.eval_sums = EvalSums(cfg.eval.ece_bins)
    loader = make_loader(valid, consumed=0, micro=t.micro_batch_size,
                         dp_rank=ps.get_data_parallel_rank(), dp=dp, num_workers=0)  # fmt: skip
    iters = _chunk_iterators(loader, len(chunks))
    for c in chunks:
        c.eval()
    with torch.no_grad():
        for _ in range(cfg.eval.batches):
            forward_backward(
                forward_step_func=functools.partial(_forward_step, run, _eval_loss),
                data_iterator=iters, model=chunks if len(chunks) > 1 else chunks[0],
                num_microbatches=micro, seq_length=cfg.model.seq_length,
                micro_batch_size=t.micro_batch_size, forward_only=True,
            )  # fmt: skip
    for c in chunks:
        c.train()
    sums = run.eval_sums
    run.eval_sums = None
    sums.all_reduce()  # only last-stage TP-rank-0 processes added anything
    summary = sums.summary()
    if summary["kl"] is not None:
        summary.update(kl_floor(cfg.kd.caches.values(), summary["kl"]))
    return summary


def _stop_workers_on_error(source, kind, exc, tb) -> None:
    """Kill the loader's workers when the run stops on an error (a preemption keeps them
    to the end of its step, and leaves them to torch's shutdown)."""
    from megatron_slkd.training.data import stop_workers

    if exc is not None and not isinstance(exc, Preempted):
        stop_workers(source)


def _chunk_iterators(loader, n: int, deadline=None):
    """One iterator per model chunk over the same micro-batches (None where no data is read),
    each ``next`` under ``deadline`` where one is given."""
    if loader is None:
        return [None] * n if n > 1 else None
    from megatron_slkd.training.data import TimedIterator

    if n == 1:
        return TimedIterator(loader, deadline)
    return [TimedIterator(it, deadline) for it in itertools.tee(loader, n)]


def train(cfg: TrainConfig) -> dict:
    """Run ``cfg`` (see :func:`_train`); the run directory has one owner while it runs,
    SIGTERM / SIGUSR1 end it after the current step with a checkpoint (exit status 75), and
    a process of the run that dies or hangs stops the others (exit status 1)."""
    owner: list = []
    try:
        with PreemptionWatch() as watch, contextlib.ExitStack() as stack:
            return _train(cfg, owner, watch, stack)
    finally:
        for lock in owner:
            lock.release()


def _watched_peers(cfg: TrainConfig):
    """The run's processes watch each other (:mod:`megatron_slkd.liveness`): one that dies
    or hangs stops the others with one line, where they would wait in a collective (NCCL:
    10 minutes, then an abort) or print gloo's traceback. A process's own error is typed
    before the watch hears of it (a loader worker's death, gloo's report of a peer gone),
    so the others quote the root cause."""
    from megatron_slkd.liveness import PeerWatch, stop_line, watching
    from megatron_slkd.training.data import RESUME, worker_death

    watch = PeerWatch(
        range(dist.get_world_size()),
        dist.get_rank(),
        stop_line("train", RESUME),
        what="this run",
        timeout_s=cfg.parallel.peer_timeout,
    )
    return watching(watch, RESUME, worker_death)


def _train(cfg: TrainConfig, owner: list, watch, stack: contextlib.ExitStack) -> dict:
    """Run (or resume) the student pretraining of ``cfg``; returns the final metrics (all ranks)."""
    from megatron_slkd.training.data import check_inputs

    cfg.validate()
    check_inputs(cfg)  # before megatron-core's import, seconds on a loaded node
    saved = _check_saved_config(Path(cfg.checkpoint.dir), cfg) if cfg.checkpoint.resume else None

    import yaml
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_slkd.launch import init_distributed, process_rank
    from megatron_slkd.records import atomic_write_text
    from megatron_slkd.training.checkpoint import (
        latest_checkpoint,
        load_checkpoint,
        save_checkpoint,
    )
    from megatron_slkd.training.data import (
        build_datasets,
        check_cache_contents,
        handover_deadline,
        make_loader,
        read_tokenizer,
    )
    from megatron_slkd.training.model import build_model, build_optimizer, build_scheduler

    device = _device(cfg)
    _, world = process_rank()
    if not dist.is_initialized():
        cfg.check_world(world)  # before any process group exists, with the launcher's numbers
    init_distributed(cfg.parallel.tensor, device, cfg.parallel.pipeline,
                     virtual_pipeline=cfg.parallel.virtual_pipeline)  # fmt: skip
    dp = cfg.check_world(dist.get_world_size())
    peers = stack.enter_context(_watched_peers(cfg))
    t = cfg.train
    micro_per_step = t.global_batch_size // (t.micro_batch_size * dp)
    bf16 = device.startswith("cuda") if t.bf16 is None else t.bf16
    dtype = torch.bfloat16 if bf16 else torch.float32
    run_dir = Path(cfg.checkpoint.dir)
    kd_train = not cfg.kd.ce_only
    with _checked():
        if dist.get_rank() == 0:  # one run per directory: claimed before any model is built
            from megatron_slkd.ownership import claim

            run_dir.mkdir(parents=True, exist_ok=True)
            owner.append(claim(run_dir / "run", what="training run",
                               timeout_s=cfg.checkpoint.lock_timeout))  # fmt: skip
        tokenizer = read_tokenizer(cfg, check=dist.get_rank() == 0)  # _checked shares the verdict
        contents = check_cache_contents(cfg, rank=dist.get_rank(), size=dist.get_world_size(),
                                        all_gather=_all_gather)  # fmt: skip
        if contents:
            _log0(contents)
        if cfg.checkpoint.reshardable and cfg.parallel.distributed_optimizer:
            from megatron.core.optimizer import distrib_optimizer

            if not distrib_optimizer.HAVE_APEX_OR_TE:
                raise ConfigError(
                    "checkpoint.reshardable needs Transformer Engine or Apex (megatron-core's "
                    "fully reshardable optimizer format does not load torch Adam state); "
                    "drop --checkpoint-reshardable (resume then keeps the TP/PP layout)"
                )
    vocab_size = tokenizer.vocab_size
    valid_samples = cfg.eval.batches * t.global_batch_size
    with _checked():
        train_ds, valid_ds = build_datasets(
            cfg, tokenizer, t.steps * t.global_batch_size, valid_samples,
            with_cache=bool(cfg.kd.caches),
        )  # fmt: skip
        if saved is not None and saved.steps not in (None, t.steps):
            old_ds, _ = build_datasets(cfg, tokenizer, saved.steps * t.global_batch_size,
                                       valid_samples, with_cache=False)  # fmt: skip
            _check_order_kept(run_dir, cfg, saved, old_ds, train_ds)
    if dist.get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        # Whole or not at all: the next run (or a second job on this directory) reads it
        # before any claim on the directory.
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg),
                                                                  sort_keys=False))  # fmt: skip
        layout = {"index_keys": tokenizer.index_keys}  # what the next resume compares with
        atomic_write_text(run_dir / _DATA_LAYOUT, json.dumps(layout, indent=1) + "\n")
    chunks = build_model(cfg, vocab_size, device, dtype)
    optimizer = build_optimizer(chunks, cfg.optim, dtype, cfg.parallel.distributed_optimizer)
    scheduler = build_scheduler(optimizer, cfg.optim, t.steps)
    step, consumed = 0, 0
    ckpt = latest_checkpoint(run_dir) if cfg.checkpoint.resume else None
    if ckpt is not None:
        with _checked():
            step, consumed, changes = load_checkpoint(ckpt, chunks, optimizer, scheduler)
        _log0(f"resumed from {ckpt} at step {step} ({consumed} samples consumed)")
        if changes:
            _log0(
                "optimizer settings are this run's, not the checkpoint's: "
                + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items())
                + f"; lr at step {step} is {scheduler.get_lr(optimizer.param_groups[0]):.2e}"
            )
    run = _Run(cfg, device, vocab_size, kd_train)
    loader = make_loader(train_ds, consumed=consumed, micro=t.micro_batch_size,
                         dp_rank=ps.get_data_parallel_rank(), dp=dp,
                         num_workers=cfg.data.num_workers, keep_kd=kd_train,
                         readahead=cfg.kd.readahead_batches,
                         timeout=cfg.data.loader_timeout)  # fmt: skip
    source = None if loader is None else iter(loader)  # forks the workers, if any
    stack.push(functools.partial(_stop_workers_on_error, source))
    deadline = handover_deadline(cfg.data.loader_timeout, peers) if cfg.data.num_workers else None
    iters = _chunk_iterators(source, len(chunks), deadline)
    timed = [i for i in (iters if isinstance(iters, list) else [iters]) if i is not None]
    forward_backward = get_forward_backward_func()
    logger = _Logger(run_dir, cfg, step)
    params = sum(p.numel() for c in chunks for p in c.parameters())
    _log0(
        f"student: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, {params:,} "
        f"parameters on rank 0; TP={cfg.parallel.tensor} PP={cfg.parallel.pipeline} DP={dp}"
        f"{f' VP={cfg.parallel.virtual_pipeline}' if cfg.parallel.virtual_pipeline else ''}; "
        f"{f'sparse KD (alpha={cfg.kd.alpha:g})' if kd_train else 'cross-entropy only'}; "
        f"{device}, {dtype}; steps {step + 1}..{t.steps}"
    )
    evaluates = any_rank(valid_ds is not None)  # every rank agrees on whether it evaluates
    if not evaluates and cfg.eval.interval and cfg.eval.batches:
        # Megatron-LM evaluates nothing here either; say so rather than skip it unasked.
        _log0(f"evaluation off: no validation data ({_no_valid_why(cfg)})")
    last_stage_tp0 = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    final: dict = {}
    window = _new_window()
    while step < t.steps:
        start = time.perf_counter()
        waited = sum(i.wait for i in timed)
        for c in chunks:
            c.zero_grad_buffer()
        optimizer.zero_grad()
        reports = forward_backward(
            forward_step_func=functools.partial(_forward_step, run, _loss),
            data_iterator=iters, model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=micro_per_step, seq_length=cfg.model.seq_length,
            micro_batch_size=t.micro_batch_size, forward_only=False,
        )  # fmt: skip
        ok, grad_norm, _ = optimizer.step()
        if not ok:
            raise SlkdError(f"step {step + 1}: the optimizer skipped the update (non-finite grads)")
        scheduler.step(increment=1)
        step += 1
        consumed += t.global_batch_size
        sums = torch.zeros(5, dtype=torch.float64)
        for r in reports or []:
            sums += r["sums"]
        window["sums"] += _world_sums(sums, last_stage_tp0)
        window["time"] += time.perf_counter() - start
        wait = torch.tensor([sum(i.wait for i in timed) - waited], dtype=torch.float64)
        host_all_reduce(wait, dist.ReduceOp.MAX)
        window["wait"] += float(wait)
        window["steps"] += 1
        if step % cfg.log.interval == 0 or step == t.steps:
            s = window["sums"]
            values = {
                "loss": float(s[0] / s[3]),
                "ce": float(s[1] / s[3]),
                "kl": float(s[2] / s[4]) if s[4] else None,
                "lr": scheduler.get_lr(optimizer.param_groups[0]),
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "step_time": window["time"] / window["steps"],
                "data_wait": window["wait"] / window["time"],
                "tokens_per_s": float(s[3]) / window["time"],
                "consumed_samples": consumed,
            }
            logger.record("train", step, values)
            kl = f" kl {values['kl']:.4f}" if values["kl"] is not None else ""
            _log0(
                f"step {step}/{t.steps} | loss {values['loss']:.4f} (ce {values['ce']:.4f}{kl}) | "
                f"lr {values['lr']:.2e} | grad {values['grad_norm'] or math.nan:.3f} | "
                f"{values['tokens_per_s']:,.0f} tok/s | data wait {100 * values['data_wait']:.1f}%"
            )
            final["train"] = values
            window = _new_window()
        due = cfg.eval.interval and step % cfg.eval.interval == 0
        if evaluates and (due or step == t.steps):
            metrics = evaluate(run, chunks, valid_ds, forward_backward, dp)
            logger.record("eval", step, metrics)
            _log0(_eval_line(step, metrics))
            final["eval"] = metrics
        due = cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0
        stop = any_rank(watch.requested) and step < t.steps  # every rank agrees, each step
        if due or step == t.steps or stop:
            path = save_checkpoint(run_dir, step, chunks, optimizer, scheduler, consumed,
                                   keep=cfg.checkpoint.keep,
                                   reshardable=cfg.checkpoint.reshardable)  # fmt: skip
            _log0(f"saved {path}")
        if stop:
            logger.close()
            raise Preempted(
                f"preempted by {watch.signal or 'a signal'} after step {step}/{t.steps}: "
                f"checkpoint {path} saved; rerun the same command to resume"
            )
    logger.close()
    final["step"] = step
    return final


def _no_valid_why(cfg: TrainConfig) -> str:
    """Why a run asked to evaluate has no validation split, and the flag that gives one."""
    if cfg.data.train_path:
        return "per-split blends without --data-valid-path"
    return f"--data-split '{cfg.data.split}' gives the validation split no share"


def _eval_line(step: int, m: dict) -> str:
    kl = ""
    if m["kl"] is not None:
        kl = f" | KL to teacher samples {m['kl']:.4f}"
        if m.get("kl_floor") is not None:
            kl += f" (floor {m['kl_floor']:.4f}, above it {m['kl_minus_floor']:.4f})"
    return (
        f"eval @ {step} | LM loss {m['lm_loss']:.4f} | ECE {m['ece']:.4f} | "
        f"top-1 acc {m['accuracy']:.4f}{kl} | {m['tokens']} tokens"
    )
