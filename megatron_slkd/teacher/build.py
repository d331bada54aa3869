"""Build a sparse-logit cache from an IndexedDataset and a teacher.

Shards are contiguous document ranges balanced by token count, so their
concatenation follows the dataset's own document order. Each shard is written
by a :class:`~megatron_slkd.cache.writer.ShardWriter` that commits every
``commit_tokens`` tokens; re-running the same command skips finished shards
and resumes an unfinished one from its last committed document, and because
every draw is keyed by (seed, absolute position, draw index) the result is
byte-identical to an uninterrupted run (decision D2). When this process wrote
every shard, the cache manifest is written too.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_slkd.cache.format import TOKEN_HASH_NAME, encoding_for
from megatron_slkd.cache.manifest import MANIFEST_NAME, Manifest
from megatron_slkd.cache.merge import merge_cache
from megatron_slkd.cache.shards import plan_shards, shard_file_name
from megatron_slkd.cache.writer import (
    ShardWriter,
    check_finished_shard,
    differences,
)
from megatron_slkd.data.indexed import dataset_fingerprint, open_dataset
from megatron_slkd.data.verify import token_identities
from megatron_slkd.errors import (
    CacheMismatchError,
    ConfigError,
    PeerFailedError,
    SlkdError,
    as_reported,
    first_line,
)
from megatron_slkd.liveness import PeerWatch, stop_line, watching
from megatron_slkd.sampling import sample_sparse_targets
from megatron_slkd.teacher.windows import document_windows

_log = logging.getLogger(__name__)

__all__ = [
    "BuildConfig",
    "plan_shards",
    "build_cache",
    "shard_file_name",
    "check_existing_shards",
    "finished_report",
    "check_teacher_tokenizer",
    "claim_shards",
    "check_settings",
]


@dataclasses.dataclass
class BuildConfig:
    """Parameters of ``slkd build-cache``."""

    data_prefix: str
    """IndexedDataset prefix (PREFIX.bin / PREFIX.idx)."""
    output: str
    """Cache directory (shards, sidecars and, once complete, manifest.json)."""
    method: str = "rs"
    """``rs`` (random sampling) or ``topk``."""
    num_samples: int = 50
    """RS draws per position (N)."""
    k: int | None = None
    """Top-K size."""
    temperature: float = 1.0
    """RS proposal temperature (weights are importance-corrected to temperature 1)."""
    seed: int = 1234
    """Sampling seed."""
    num_shards: int = 1
    """Shards the dataset is split into."""
    shard_indices: list[int] | None = None
    """Shards this process builds (None: all)."""
    context_length: int = 2048
    """Teacher window C."""
    stride: int = 1024
    """Window step S; every position sees at least C - S tokens of context."""
    tokens_per_batch: int = 8192
    """Teacher batch budget in tokens (padded windows)."""
    commit_tokens: int = 65536
    """Commit the shard (a resume point) after about this many tokens."""
    progress: bool = True
    """Show a progress bar."""
    data_meta: dict | None = None
    """The dataset's tokenizer record (None: read PREFIX.meta.json)."""
    peer_timeout_s: float = 60.0
    """With a model-parallel teacher: seconds a process of the group may go without a
    heartbeat before the others stop (:mod:`megatron_slkd.liveness`)."""


_LOOKAHEAD = 8  # batch budgets of windows gathered before sorting them by length


def _batches(windows, budget: int):
    """Padded batches of at most ``budget`` tokens, grouping windows of similar length.

    Windows are taken ``_LOOKAHEAD`` budgets at a time and sorted by length, so
    short documents share a batch with short ones. The sampler's draws do not
    depend on the batch (decision D2), but the teacher's logits may, in their last
    bits (other matrix shapes, other kernels): so a shard is always planned from
    its first window, and a resumed build runs the very batches of an
    uninterrupted one.
    """
    buffer, held = [], 0

    def flush():
        batch, longest = [], 0
        for w in sorted(buffer, key=lambda w: w[1].start - w[1].end):  # longest first, stable
            n = w[1].end - w[1].start
            if batch and max(longest, n) * (len(batch) + 1) > budget:
                yield batch
                batch, longest = [], 0
            batch.append(w)
            longest = max(longest, n)
        if batch:
            yield batch

    for w in windows:
        buffer.append(w)
        held += w[1].end - w[1].start
        if held >= _LOOKAHEAD * budget:
            yield from flush()
            buffer, held = [], 0
    yield from flush()


class _DocumentRows:
    """Sparse targets of one document, gathered from its windows in any order."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens  # kept for the writer's checksum: the document is read once
        self.length = len(tokens)
        self.parts: list = []  # (score_from, ids, weights, num_valid, counts)
        self.rows = 0
        self.stats = dict.fromkeys(_STAT_NAMES, 0.0)  # sums of the teacher's figures

    def add(self, score_from, ids, weights, num_valid, counts, figures):
        self.parts.append((score_from, ids, weights, num_valid, counts))
        self.rows += len(num_valid)
        for k, v in zip(_STAT_NAMES, figures, strict=True):
            self.stats[k] += v

    def arrays(self):
        """ids, weights, num_valid, counts for rows 0..length-1, padded to one K."""
        parts = sorted(self.parts, key=lambda p: p[0])
        if not parts:  # an empty document (preprocess_data.py writes them): no window, no row
            empty = np.zeros((0, 1), np.int64)
            return empty, empty.astype(np.float32), np.zeros(0, np.int64), empty
        k = max(p[1].shape[1] for p in parts)

        def cat(i, dtype):
            if parts[0][i] is None:
                return None
            return np.concatenate(
                [np.pad(p[i], ((0, 0), (0, k - p[i].shape[1]))).astype(dtype) for p in parts]
            )

        return (
            cat(1, np.int64),
            cat(2, np.float32),
            np.concatenate([p[3] for p in parts]),
            cat(4, np.int64),
        )


_NLL_EVERY = 8  # the teacher's figures (NLL, entropy, floor) at every 8th position
# A teacher whose NLL on the data stays above this share of log(vocabulary) (a uniform
# guess) after this many measured positions is warned about: trained models on text in
# their own tokenizer stay far below it (SmolLM2-135M on the built-in corpus: 1.88
# nats/token, 17% of log 49152).
_IMPLAUSIBLE_NLL, _IMPLAUSIBLE_AFTER = 0.75, 128


class _Stats:
    """Where the time goes, and what the cache holds, for the build summary."""

    def __init__(self):
        self.teacher_s = self.sample_s = self.write_s = 0.0
        self.figures = dict.fromkeys(_STAT_NAMES, 0.0)
        self.tokens = self.entries = 0
        self.last_positions = 0  # one per document with a token: it has no next token
        self.seen = [0.0, 0.0]  # measured positions and their NLL, batch by batch
        self.warned = False

    def add(self, figures: dict) -> None:
        for k, v in figures.items():
            self.figures[k] += v

    def warn_if_implausible(self, figures: torch.Tensor, vocab_size: int, where: str) -> None:
        """Warn once when the teacher predicts the data hardly better than a uniform guess:
        the data misread (made with another tokenizer) or a teacher not trained or
        converted wrongly. Counted over batches (``figures``: a batch's
        :func:`_teacher_stats`), so a long document is not waited for. The build goes
        on; its summary gives the NLL too."""
        self.seen[0] += float(figures[0].sum())
        self.seen[1] += float(figures[1].sum())
        n = self.seen[0]
        if self.warned or n < _IMPLAUSIBLE_AFTER:
            return
        nll, uniform = self.seen[1] / n, math.log(vocab_size)
        if nll >= _IMPLAUSIBLE_NLL * uniform:
            self.warned = True
            _log.warning(
                "%s: the teacher's NLL on the data is %.2f nats/token over %d positions, "
                "%.0f%% of a uniform guess over %d ids (%.2f): check that the data was made "
                "with the teacher's tokenizer (describe-data's text check) and that the "
                "teacher is the trained model you meant", where, nll, int(n),
                100 * nll / uniform, vocab_size, uniform,
            )  # fmt: skip

    def report(self) -> dict:
        overhead = self.sample_s + self.write_s
        n = self.figures["positions"]

        def mean(k):
            return round(self.figures[k] / n, 4) if n else None

        return {
            "teacher_seconds": round(self.teacher_s, 3),
            "sample_seconds": round(self.sample_s, 3),
            "write_seconds": round(self.write_s, 3),
            "overhead_vs_teacher": round(overhead / self.teacher_s, 4) if self.teacher_s else None,
            "teacher_nll": mean("nll"),
            "teacher_entropy": mean("entropy"),
            "sample_kl_floor": mean("sample_kl"),
            "unique_ids_per_position": round(
                self.entries / max(self.tokens - self.last_positions, 1), 3
            ),
        }


def _teacher_stats(rows, targets, positions, t, par, vocab_size: int) -> torch.Tensor:
    """Per-row teacher figures ``[4, T]`` float64: kept, NLL of the next token, entropy,
    and the sample-KL floor; 0 on rows not kept.

    Kept are the rows with a next token whose absolute position is a multiple of
    ``_NLL_EVERY`` (so the figures do not depend on batching, and a resumed shard
    reports what an uninterrupted one does). p is the teacher's distribution over
    the ``vocab_size`` ids the cache samples from. The floor is
    ``KL(w || p) = sum w log w - sum w log p`` of the row's own sparse targets ``w``
    (normalized as training normalizes them): what the evaluation's KL to the
    cache gives for a student equal to the teacher.

    With tensor parallelism ``rows`` are vocabulary shards: one MAX and one SUM
    all-reduce over the TP group.
    """
    out = torch.zeros(4, len(targets), dtype=torch.float64)
    keep = torch.nonzero((targets >= 0) & (positions % _NLL_EVERY == 0)).squeeze(-1)
    if keep.numel() == 0:
        return out
    start = par.vocab_start(rows.shape[-1])
    cols = torch.arange(rows.shape[-1], device=rows.device) + start
    # Columns past the tokenizer's ids (padded embeddings) are not part of p.
    z = rows[keep].double().masked_fill(cols >= vocab_size, float("-inf"))
    m = z.max(-1).values
    par.all_reduce(m, dist.ReduceOp.MAX)
    zm = z - m.unsqueeze(-1)
    e = zm.exp()
    w = t.weights[keep].double().to(z.device)
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-30)

    def local_gather(ids):
        local = ids.to(z.device) - start
        mine = (local >= 0) & (local < z.shape[-1])
        return torch.where(mine, zm.gather(-1, local.clamp(0, z.shape[-1] - 1)), 0.0)

    label = local_gather(targets[keep].unsqueeze(-1))[:, 0]
    parts = torch.stack(
        [
            e.sum(-1),
            torch.where(e > 0, e * zm, 0.0).sum(-1),
            label,
            torch.where(w > 0, w * local_gather(t.ids[keep]), 0.0).sum(-1),
        ]
    )
    par.all_reduce(parts, dist.ReduceOp.SUM)
    sum_e, e_zm, label_zm, w_zm = parts
    log_z = sum_e.log()  # relative to m
    wlogw = torch.where(w > 0, w * w.clamp(min=1e-300).log(), 0.0).sum(-1)
    out[:, keep] = torch.stack(
        [torch.ones_like(log_z), log_z - label_zm, log_z - e_zm / sum_e, wlogw - w_zm + log_z]
    ).cpu()
    return out


_STAT_NAMES = ("positions", "nll", "entropy", "sample_kl")


_RESUME = "committed documents are kept: run the same command again to resume"


class _Parallel:
    """The teacher's model-parallel layout as the builder sees it (a no-op when alone).

    Every rank of the model-parallel group (TP x PP) walks the same batches; the
    last pipeline stage samples over its TP group, and its TP rank 0 writes.

    Only the writer touches the shard, so only it can fail there (out of space, a
    claim taken over): :meth:`on_writer` holds such an error until the group's next
    :meth:`agree`, where every rank stops with it. The others would otherwise wait
    in the group's next collective: NCCL gives up only at its timeout (10 minutes).
    """

    def __init__(self, teacher, output: str | None = None, peer_timeout_s: float = 60.0):
        tp = getattr(teacher, "tp_group", None)
        self.tp_group = tp if tp is not None and dist.get_world_size(tp) > 1 else None
        self.tp_rank = dist.get_rank(tp) if self.tp_group is not None else 0
        self.samples = getattr(teacher, "has_logits", True)
        self.writes = self.samples and self.tp_rank == 0
        self.output = output
        self.failure: Exception | None = None
        mp = getattr(teacher, "model_parallel_group", None)
        self.mp_group = mp if mp is not None and dist.get_world_size(mp) > 1 else None
        if self.mp_group is not None:
            flags = [None] * dist.get_world_size(self.mp_group)
            dist.all_gather_object(flags, self.writes, group=self.mp_group)
            self.src = dist.get_global_rank(self.mp_group, flags.index(True))
        # Heartbeats within the group, so that a process that dies or hangs stops the
        # others with one line (megatron_slkd.liveness); a peer's loss is raised typed.
        self._watched = None
        if self.mp_group is not None:
            self._watched = watching(PeerWatch(
                dist.get_process_group_ranks(self.mp_group),
                dist.get_rank(),
                stop_line("build-cache", _RESUME),
                timeout_s=peer_timeout_s,
            ), _RESUME)  # fmt: skip

    def __enter__(self) -> _Parallel:
        if self._watched is not None:
            self._watched.__enter__()
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if self._watched is not None:
            self._watched.__exit__(kind, exc, tb)

    def vocab_start(self, width: int) -> int:
        return self.tp_rank * width

    def all_reduce(self, t: torch.Tensor, op) -> None:
        if self.tp_group is not None:
            dist.all_reduce(t, op=op, group=self.tp_group)

    def on_writer(self, work, *args):
        """``work(*args)`` on the writing rank (None elsewhere, and once it failed).

        Alone, its error is raised at once; in a group it is held for :meth:`agree`."""
        if not self.writes or self.failure is not None:
            return None
        try:
            return work(*args)
        except Exception as exc:
            if self.mp_group is None:
                raise
            self.failure = exc
            return None

    def agree(self, value):
        """``value`` as the writing rank has it, on every rank of the model-parallel group.

        Raises the writer's held error instead: the error itself on the writer,
        :class:`~megatron_slkd.errors.PeerFailedError` quoting it on the others.
        """
        if self.mp_group is None:
            return value
        box = [(value, None if self.failure is None else self._describe(self.failure))]
        dist.broadcast_object_list(box, src=self.src, group=self.mp_group)
        value, failed = box[0]
        if self.failure is not None:
            failure, self.failure = self.failure, None  # its frames hold self: no cycle
            raise failure
        if failed is not None:
            status, text = failed
            raise PeerFailedError(
                f"the writing process of this model-parallel group (rank {self.src}) failed, "
                f"so this one stops too: {text}",
                status,
            )
        return value

    def _describe(self, exc: Exception) -> tuple[int, str]:
        """(exit status, one line) of ``exc`` as the CLI reports it."""
        if not isinstance(exc, (SlkdError, OSError)):  # untyped: a traceback on the writer
            return 1, f"{type(exc).__name__}: {first_line(exc)}"
        status, typed = as_reported(exc, self.output)
        return status, first_line(typed)


def _build_shard(cfg, teacher, par, ds, doc_tokens0, path, doc_range, base, bar, stats, locks,
                 watch=None):  # fmt: skip
    """Build one shard: all model-parallel ranks run the teacher; the writer returns its record."""
    vocab = base.tokenizer["vocab_size"]
    writer = par.on_writer(
        lambda: ShardWriter.open(
            path,
            encoding=base.encoding,
            vocab_size=vocab,
            doc_start=doc_range[0],
            doc_end=doc_range[1],
            key=base.compatibility_key(),
            content=shard_content(ds, doc_range),
        )
    )
    first = par.agree(writer.next_document if writer else None)
    bar.update(int(ds.sequence_lengths[doc_range[0] : first].sum()))
    pending: dict[int, _DocumentRows] = {}
    since_commit = 0

    def windows():
        # From the shard's first document, whatever was committed: the batches, and so the
        # teacher's arithmetic to the last bit, are those of an uninterrupted build. A
        # resume skips the batches of committed documents and drops their rows elsewhere.
        for d in range(doc_range[0], doc_range[1]):
            doc = ds.get(d).astype(np.int64)  # a copy: outlives the dataset's memory map
            if d >= first and par.samples:  # earlier pipeline stages never get rows
                pending[d] = _DocumentRows(doc)
            tokens = torch.from_numpy(doc)
            for w in document_windows(len(tokens), cfg.context_length, cfg.stride):
                yield d, w, tokens

    next_doc = first

    def write(doc: _DocumentRows, commit: bool) -> None:
        writer.add_document(doc.tokens, *doc.arrays(), stats=doc.stats)
        if commit:
            for lock in locks:
                lock.check()
            writer.commit()

    def write_ready():
        """Write the documents whose rows are all in, in order, committing as due."""
        nonlocal next_doc, since_commit
        while next_doc in pending and pending[next_doc].rows == pending[next_doc].length:
            doc = pending.pop(next_doc)
            since_commit += doc.length
            commit = since_commit >= cfg.commit_tokens
            par.on_writer(write, doc, commit)
            stats.add(doc.stats)
            bar.update(doc.length)
            next_doc += 1
            if commit:
                since_commit = 0

    for batch in _batches(windows(), cfg.tokens_per_batch):
        # Every rank of the model-parallel group asks here (earlier pipeline stages skip the
        # rest of the loop body); the writer's decision holds for all.
        if par.agree(watch is not None and watch.requested):
            _stop(par, writer, path, next_doc, doc_range, watch)
        if all(d < first for d, _, _ in batch):
            continue
        t0 = time.perf_counter()
        outs = teacher.logits([tok[w.start : w.end] for _, w, tok in batch])
        t1 = time.perf_counter()
        stats.teacher_s += t1 - t0
        if not par.samples:  # an earlier pipeline stage: its part is done
            continue
        rows = torch.cat(
            [o[w.score_from - w.start :] for o, (_, w, _) in zip(outs, batch, strict=True)]
        )
        positions = torch.cat(
            [torch.arange(w.score_from, w.end) + int(doc_tokens0[d]) for d, w, _ in batch]
        )
        t = sample_sparse_targets(
            rows,
            method=cfg.method,
            seed=cfg.seed,
            positions=positions,
            num_samples=cfg.num_samples,
            k=cfg.k,
            temperature=cfg.temperature,
            tp_group=par.tp_group,
            vocab_size=vocab,  # the tokenizer's ids: a padded output layer's extra rows are cut
        )
        # The next token of each scored row (-1 after a document's last token).
        targets = torch.cat(
            [
                torch.cat(
                    [tok[w.score_from + 1 : w.end + 1], torch.full((int(w.end == len(tok)),), -1)]
                )
                for _, w, tok in batch
            ]
        )
        figures = _teacher_stats(rows, targets, positions, t, par, vocab)
        if par.writes:  # once per group
            stats.warn_if_implausible(figures, vocab, cfg.data_prefix)
        t2 = time.perf_counter()
        stats.sample_s += t2 - t1
        i = 0
        for d, w, _ in batch:
            n = w.end - w.score_from
            sl = slice(i, i + n)
            i += n
            if d < first:
                continue
            pending[d].add(
                w.score_from,
                t.ids[sl].numpy(),
                t.weights[sl].numpy(),
                t.num_valid[sl].numpy(),
                None if t.counts is None else t.counts[sl].numpy(),
                figures[:, sl].sum(-1).tolist(),
            )
        write_ready()
        stats.write_s += time.perf_counter() - t2
    # Empty documents have no window: those after the last batch (or a shard of nothing
    # else) are written here.
    write_ready()
    t3 = time.perf_counter()
    record = par.on_writer(lambda: writer.finalize(sidecar=base))
    par.agree(None)  # the others go on to the next shard once this one is whole
    if record is None:
        return None
    stats.write_s += time.perf_counter() - t3
    stats.tokens += record["num_tokens"]
    stats.entries += record["num_entries"]
    # Not the document count: an empty document (possible in a dataset written with
    # IndexedDatasetBuilder) has no last position, and counting it gave 110 ids per position
    # where the cache holds 27.5.
    lengths = ds.sequence_lengths[record["doc_start"] : record["doc_end"]]
    stats.last_positions += int(np.count_nonzero(lengths))
    return record


def _stop(par: _Parallel, writer, path, next_doc: int, doc_range, watch) -> None:
    """End the build on a preemption signal with the shard's progress durable (on every
    rank of the group: none exits before the writer has committed)."""
    from megatron_slkd.preempt import Preempted

    def commit():
        writer.commit()
        writer.close()

    par.on_writer(commit)
    next_doc = par.agree(next_doc)  # the writer's: an earlier pipeline stage keeps no rows
    done = "before its first document"
    if next_doc > doc_range[0]:
        done = f"through document {next_doc - 1}"
    raise Preempted(
        f"preempted by {(watch and watch.signal) or 'a signal'}: {path.name} committed {done} "
        f"(documents {doc_range[0]}..{doc_range[1] - 1}); rerun the same command to resume"
    )


def _sampling_record(cfg: BuildConfig) -> dict:
    """The manifest's ``sampling`` section for ``cfg`` (what a resumed shard must match)."""
    return dict(
        method=cfg.method,
        num_samples=cfg.num_samples if cfg.method == "rs" else None,
        k=cfg.k,
        temperature=cfg.temperature,
        seed=cfg.seed,
        context_length=cfg.context_length,
        stride=cfg.stride,
    )


def _my_shards(cfg: BuildConfig):
    """The shard indices this process builds."""
    return range(cfg.num_shards) if cfg.shard_indices is None else cfg.shard_indices


def _all_finished(out: Path, num_shards: int) -> bool:
    """Whether every shard of the cache has its sidecar (written when a shard is done)."""
    return all(
        (out / (shard_file_name(i, num_shards) + ".json")).exists() for i in range(num_shards)
    )


def check_settings(cfg: BuildConfig, max_context: int | None) -> None:
    """Refuse windows and methods that cannot run, for a teacher of ``max_context``
    positions (None: not known yet; checked again once the teacher is loaded)."""
    if not (math.isfinite(cfg.temperature) and cfg.temperature > 0):
        # Refused before a shard is opened: one started under it would pin the setting.
        raise ConfigError(f"--temperature {cfg.temperature} must be positive and finite")
    if not 0 <= cfg.seed < 2**64:
        raise ConfigError(f"--seed {cfg.seed} must be in [0, 2**64)")
    if cfg.num_shards < 1:
        raise ConfigError(f"--num-shards {cfg.num_shards} must be at least 1")
    outside = [i for i in cfg.shard_indices or () if not 0 <= i < cfg.num_shards]
    if outside:
        raise ConfigError(
            f"--shard-index {' '.join(map(str, outside))}: the shards of --num-shards "
            f"{cfg.num_shards} are 0..{cfg.num_shards - 1}"
        )
    if not 0 < cfg.stride <= cfg.context_length:
        raise ConfigError(
            f"--stride {cfg.stride} must be in (0, --context-length {cfg.context_length}]"
        )
    if max_context is not None and cfg.context_length > max_context:
        raise ConfigError(
            f"--context-length {cfg.context_length} exceeds the teacher's {max_context} "
            f"positions; give --context-length {max_context} or less"
        )
    if cfg.tokens_per_batch < cfg.context_length:
        # Every batch holds at least one window, so a smaller budget only runs the teacher
        # one window at a time, slowly, without saying so.
        raise ConfigError(
            f"--tokens-per-batch {cfg.tokens_per_batch} holds no whole window of "
            f"--context-length {cfg.context_length}; give {cfg.context_length} or more"
        )
    if cfg.method == "topk" and not cfg.k:
        raise ConfigError("--method topk needs --k")
    if not cfg.peer_timeout_s > 0:
        raise ConfigError(f"--peer-timeout {cfg.peer_timeout_s} must be positive (seconds)")


def build_cache(cfg: BuildConfig, teacher, *, locks=(), watch=None,
                teacher_tokenizer=None) -> dict:  # fmt: skip
    """Build the shards of ``cfg`` with ``teacher``; returns a summary.

    ``locks`` (from :func:`claim_shards`) are checked at every commit: a process
    whose shard was taken over stops instead of writing more. With ``watch`` (a
    :class:`~megatron_slkd.preempt.PreemptionWatch`), a preemption signal ends the
    build after the current teacher batch: the shard is committed and
    :class:`~megatron_slkd.preempt.Preempted` raised; rerunning resumes.
    ``teacher_tokenizer``: the teacher's tokenizer when the caller already loaded it
    (``teacher.tokenizer()`` otherwise; from a GGUF file that takes seconds).
    """
    from tqdm import tqdm

    check_settings(cfg, teacher.max_context)
    ds = open_dataset(cfg.data_prefix)
    lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
    doc_tokens0 = np.concatenate([[0], np.cumsum(lengths)])
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_shards(lengths, cfg.num_shards)
    tokenizer = _tokenizer_record(cfg, teacher, teacher_tokenizer)
    # The cache's vocabulary is the tokenizer's: a teacher whose output layer is
    # wider (embeddings padded to a multiple) has its extra rows masked out.
    enc = encoding_for(
        cfg.method,
        tokenizer["vocab_size"],
        num_samples=cfg.num_samples,
        k=cfg.k,
        temperature=cfg.temperature,
    )
    base = Manifest(
        dataset=dataset_fingerprint(cfg.data_prefix, ds),
        tokenizer=tokenizer,
        teacher=teacher.describe(),
        sampling=_sampling_record(cfg),
        encoding=enc,
        shards=[],
    )
    mine = _my_shards(cfg)
    todo_tokens = sum(int(lengths[a:b].sum()) for a, b in (plan[i] for i in mine))
    with _Parallel(teacher, cfg.output, cfg.peer_timeout_s) as par:
        start = time.time()
        bar = tqdm(
            total=todo_tokens,
            unit="tok",
            unit_scale=True,
            desc="teacher",
            disable=not (cfg.progress and par.writes),
        )
        built, stats = 0, _Stats()
        for i in mine:
            path = out / shard_file_name(i, cfg.num_shards)
            sidecar = Path(str(path) + ".json")
            if par.agree(path.exists() and sidecar.exists()):
                check_finished_shard(path, base)
                bar.update(int(lengths[plan[i][0] : plan[i][1]].sum()))
                continue
            _build_shard(cfg, teacher, par, ds, doc_tokens0, path, plan[i], base, bar, stats, locks,
                         watch)  # fmt: skip
            for lock in locks:  # finished: nobody need wait for this shard any more
                if lock.target == path:
                    lock.release()
            built += 1
        bar.close()
        # The group's last collective, so the heartbeats end here: past it, the other
        # ranks may exit while the writer merges.
        complete = par.agree(_all_finished(out, cfg.num_shards))
    if complete and par.writes and not (out / MANIFEST_NAME).exists():
        merge_cache([out], out)
    report = {
        "output": str(out),
        "shards_built": built,
        "shards": cfg.num_shards,
        "shard_indices": list(mine),
        "complete": complete,
        "tokens": todo_tokens,
        "seconds": round(time.time() - start, 2),
        **stats.report(),
    }
    if complete and par.writes:
        report.update(_cache_summary(out))
    return report


def shard_content(ds, doc_range: tuple[int, int]) -> dict:
    """The identity of the tokens of documents ``doc_range`` of ``ds``, as a shard being
    written keeps it (its resume key) and records it when finished."""
    h = token_identities(ds, [doc_range])[0]
    return {"token_crc32": h.crc32, TOKEN_HASH_NAME: h.xxh128()}


def check_existing_shards(cfg: BuildConfig, teacher_hash: str | None) -> None:
    """Refuse, before a teacher loads, to continue shards started with other settings.

    For each shard ``cfg`` asks for that is finished (a sidecar) or unfinished
    (``<shard>.partial/progress.json``): the sampling settings, the dataset's
    document and token counts, and the teacher checkpoint's hash (when both are
    known) must be those of ``cfg``. Once the teacher is loaded, the whole
    compatibility key is compared again (:func:`build_cache`, the shard writer).

    Raises:
        CacheMismatchError: naming the shard and each setting that differs.
    """
    out = Path(cfg.output)
    ds = open_dataset(cfg.data_prefix)
    want = {
        "sampling": _sampling_record(cfg),
        "dataset": dataset_fingerprint(cfg.data_prefix, ds),
    }
    want["dataset"] = {k: v for k, v in want["dataset"].items() if k != "prefix"}
    for i in _my_shards(cfg):
        path = out / shard_file_name(i, cfg.num_shards)
        sidecar, progress = Path(str(path) + ".json"), Path(str(path) + ".partial/progress.json")
        if sidecar.exists():
            key, what = Manifest.load(sidecar).compatibility_key(), f"finished shard {sidecar}"
        elif progress.exists():
            params = ShardWriter.started_params(progress)
            key, what = params.get("key"), f"unfinished shard {progress.parent}"
            if key is None:  # started by a version that kept no key: the writer decides
                continue
            # The documents' tokens: read for the shards that resume, and only those.
            _check_same_tokens(what, params, lambda a, b: shard_content(ds, (a, b)))
        else:
            continue
        have = {k: key.get(k) for k in want}
        if teacher_hash is not None and key.get("teacher", {}).get("checkpoint_hash"):
            have["teacher"] = {"checkpoint_hash": key["teacher"]["checkpoint_hash"]}
            want_i = {**want, "teacher": {"checkpoint_hash": teacher_hash}}
        else:
            want_i = want
        diff = differences(have, want_i)
        if diff:
            iteration = (key.get("teacher", {}).get("source") or {}).get("megatron_lm_iteration")
            other_teacher = have.get("teacher") != want_i.get("teacher")
            hint = "" if iteration is None or not other_teacher else (
                f" (its teacher was Megatron-LM checkpoint iteration {iteration}: a --save "
                "directory whose latest iteration moved on? give that iteration's directory "
                "as --teacher)")  # fmt: skip
            raise CacheMismatchError(
                f"{what} was built with other settings ({'; '.join(diff[:6])}){hint}; rerun "
                "with those settings, or remove it (or use another --output) to start over"
            )


def _check_same_tokens(what: str, params: dict, content) -> None:
    """Refuse to resume an unfinished shard onto other tokens than it started on
    (``content(a, b)``: the dataset's identity of documents a..b-1)."""
    a, b = params["doc_start"], params["doc_end"]
    if "content" not in params:
        raise CacheMismatchError(
            f"{what} was started by a megatron-slkd that kept no identity of its tokens, so "
            "this dataset cannot be shown to be the one it began on; remove it (or use "
            "another --output) to start over"
        )
    if params["content"].get(TOKEN_HASH_NAME) != content(a, b)[TOKEN_HASH_NAME]:
        raise CacheMismatchError(
            f"{what} was started on other tokens: documents {a}..{b - 1} of the dataset have "
            "the same lengths but not the same content (another tokenization or corpus at "
            "this prefix?); rerun on the dataset it was started on, or remove it (or use "
            "another --output) to start over"
        )


def claim_shards(cfg: BuildConfig, timeout_s: float) -> list:
    """Claim every unfinished shard ``cfg`` asks for (one writer per shard), before a teacher
    loads; returns the locks (release them when done).

    Raises:
        OwnershipError: a live process writes one of them (named with its host, pid,
            Slurm job and array task).
    """
    from megatron_slkd.ownership import claim, clear_dead_owner

    locks = []
    try:
        for i in _my_shards(cfg):
            path = Path(cfg.output) / shard_file_name(i, cfg.num_shards)
            if path.exists() and Path(str(path) + ".json").exists():
                clear_dead_owner(path, what="cache shard", timeout_s=timeout_s)
            else:
                locks.append(claim(path, what="cache shard", timeout_s=timeout_s))
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    return locks


def finished_report(cfg: BuildConfig, teacher_hash: str | None) -> dict | None:
    """The report of a build with nothing left to do, found without loading the teacher.

    Every shard ``cfg`` asks for must be finished (file and sidecar) with the same
    sampling settings and a teacher checkpoint of hash ``teacher_hash``, and the
    cache's manifest must exist when all shards are asked for; otherwise None, and
    :func:`build_cache` (with the teacher loaded) builds, resumes or refuses.
    """
    if teacher_hash is None:
        return None
    out = Path(cfg.output)
    mine = _my_shards(cfg)
    want = _sampling_record(cfg)
    tokens = 0
    for i in mine:
        path = out / shard_file_name(i, cfg.num_shards)
        sidecar = Path(str(path) + ".json")
        if not (path.exists() and sidecar.exists()):
            return None
        done = Manifest.load(sidecar)
        if done.sampling != want or done.teacher.get("checkpoint_hash") != teacher_hash:
            return None
        tokens += sum(int(r["num_tokens"]) for r in done.shards)
    complete = _all_finished(out, cfg.num_shards)
    if complete and not (out / MANIFEST_NAME).exists():
        return None  # the merge is still to do
    report = {
        "output": str(out),
        "shards_built": 0,
        "shards": cfg.num_shards,
        "shard_indices": list(mine),
        "complete": complete,
        "tokens": tokens,
        "seconds": 0.0,
        **_Stats().report(),
    }
    if complete:
        report.update(_cache_summary(out))
    return report


def _cache_summary(out: Path) -> dict:
    from megatron_slkd.cache.reader import open_cache
    from megatron_slkd.cache.stats import cache_stats

    s = cache_stats(open_cache(out))
    return {
        "cache_bytes_per_token": round(s["bytes_per_token"], 3),
        "cache_unique_ids_per_position": round(s["unique_ids_per_position_mean"], 3),
    }


def check_teacher_tokenizer(prefix: str, record: dict, teacher_tok) -> None:
    """Refuse a teacher whose tokenizer is not the dataset's (``record``: its tokenizer record).

    Raises:
        CacheMismatchError: naming how many ids differ and the first few.
    """
    meta = record["tokenizer"]
    if teacher_tok.fingerprint() == meta["fingerprint"]:
        return
    from megatron_slkd.data.tokenizers import load_tokenizer

    mine, data_pieces = teacher_tok.pieces(), load_tokenizer(meta).pieces()
    diff = [i for i in range(min(len(mine), len(data_pieces))) if mine[i] != data_pieces[i]]
    raise CacheMismatchError(
        f"{prefix}: the dataset was tokenized with another vocabulary than the teacher's "
        f"({len(diff)} ids differ, first {diff[:5]}; sizes {len(data_pieces)} vs {len(mine)}); "
        "use the teacher's tokenizer for the data, or name the data's tokenizer correctly "
        "(--tokenizer-type/--tokenizer-model)"
    )


def _tokenizer_record(cfg: BuildConfig, teacher, teacher_tok=None) -> dict:
    """The dataset's tokenizer record, after checking that the teacher shares it."""
    from megatron_slkd.data.describe import resolve_meta

    record = cfg.data_meta or resolve_meta(cfg.data_prefix)
    meta = record["tokenizer"]
    if meta["vocab_size"] > teacher.vocab_size:
        raise CacheMismatchError(
            f"{cfg.data_prefix}: the dataset's tokenizer has {meta['vocab_size']} ids, the "
            f"teacher {teacher.vocab_size}; the teacher cannot score ids it does not have"
        )
    check_teacher_tokenizer(cfg.data_prefix, record, teacher_tok or teacher.tokenizer())
    return meta
