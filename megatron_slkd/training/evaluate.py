"""Held-out metrics on vocab-parallel logits: LM loss, calibration (ECE), KL to the teacher.

The KL is measured against the cache's sparse targets, ``KL(w || p_student)``
with ``w`` the teacher's N-draw sample (count / N): its cross-entropy part is
an unbiased estimate of the teacher-student cross-entropy, but ``sum w log w``
is not the teacher's negative entropy, so even a student equal to the teacher
scores about ``(unique ids - 1) / 2N`` nats or more (about 0.7 nats at 2.7
nats of teacher entropy with N = 50). The builder records that *floor*, the
teacher's own KL to its sample on every 8th position
(:meth:`~megatron_slkd.cache.reader.SparseKDCache.teacher_figures`), and the
evaluation reports it beside the KL: ``kl - kl_floor`` estimates the true
KL(teacher || student) (in expectation exactly, for RS at temperature 1, up to
the difference between the evaluated positions and the build's sample).

Calibration follows the usual top-1 definition: a position's confidence is
the student's largest probability, it is correct when that token is the
label, and the expected calibration error over equal-width confidence bins is

    ECE = sum_b (n_b / n) * |accuracy_b - mean confidence_b|.

Everything here works on this rank's vocabulary shard ``[..., V/tp]`` and
communicates over ``tp_group`` (collectives in :func:`calibration_terms`).
Per-bin sums are kept so that evaluation batches, data-parallel ranks and
pipeline stages combine exactly by addition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["calibration_terms", "EvalSums", "expected_calibration_error", "kl_floor"]


def calibration_terms(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    tp_group=None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(label cross-entropy, top-1 confidence, top-1 correct) per position, float32.

    ``logits`` are this rank's shard of the vocabulary; columns at or beyond
    ``vocab_size`` (embedding padding) are ignored. Ties for the top-1 token go
    to the smallest id. Collectives over ``tp_group``: all-reduce MAX of the
    row maxima, all-reduce SUM of [sum of exp, label logit], all-reduce MIN of
    the candidate argmax ids. The logits are not modified.
    """
    rank = dist.get_rank(tp_group) if tp_group is not None else 0
    width = logits.shape[-1]
    start = rank * width
    z = logits.float()
    if vocab_size is not None and start + width > vocab_size:
        z = z.clone()
        z[..., max(vocab_size - start, 0) :] = float("-inf")
    local_max, local_arg = z.max(dim=-1)
    m = local_max.clone()
    if tp_group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
    local = labels - start
    mine = (local >= 0) & (local < width)
    label_logit = torch.gather(z, -1, local.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1)
    sums = torch.stack(
        [torch.exp(z - m.unsqueeze(-1)).sum(-1), torch.where(mine, label_logit, 0.0)]
    )
    candidate = torch.where(local_max == m, local_arg + start, torch.iinfo(torch.int64).max)
    if tp_group is not None:
        dist.all_reduce(sums, group=tp_group)
        dist.all_reduce(candidate, op=dist.ReduceOp.MIN, group=tp_group)
    sum_exp, label_logit = sums
    ce = torch.log(sum_exp) + m - label_logit
    confidence = 1.0 / sum_exp  # exp(max - max) / sum
    correct = (candidate == labels).float()
    return ce, confidence, correct


@dataclass
class EvalSums:
    """Additive evaluation totals (float64 on CPU), combined across batches and ranks."""

    bins: int
    """Equal-width confidence bins."""

    def __post_init__(self) -> None:
        # [ce sum, tokens, kl sum, kl tokens] then per bin: count, confidence sum, correct sum
        self.values = torch.zeros(4 + 3 * self.bins, dtype=torch.float64)

    def add(self, ce, confidence, correct, mask, kl=None, kl_mask=None) -> None:
        """Add positions where ``mask`` is 1 (and KL where ``kl_mask`` is 1)."""
        mask = mask.double().flatten()
        v = self.values
        v[0] += (ce.double().flatten() * mask).sum()
        v[1] += mask.sum()
        if kl is not None:
            km = kl_mask.double().flatten()
            v[2] += (kl.double().flatten() * km).sum()
            v[3] += km.sum()
        conf = confidence.double().flatten()
        b = (conf * self.bins).long().clamp(0, self.bins - 1)
        for j, x in enumerate((mask, conf * mask, correct.double().flatten() * mask)):
            v[4 + j * self.bins : 4 + (j + 1) * self.bins] += torch.bincount(
                b, weights=x, minlength=self.bins
            )

    def all_reduce(self, group=None) -> None:
        """Sum over the processes of ``group`` (None: the world)."""
        if dist.is_initialized():
            from megatron_slkd.launch import host_all_reduce

            host_all_reduce(self.values, group=group)

    def summary(self) -> dict:
        """LM loss, ECE, KL to the cached targets (None without them), accuracy and the
        reliability bins."""
        v, n = self.values, self.bins
        count, conf, corr = v[4 : 4 + n], v[4 + n : 4 + 2 * n], v[4 + 2 * n :]
        tokens = float(v[1])
        return {
            "lm_loss": float(v[0] / v[1]) if tokens else None,
            "ece": expected_calibration_error(count, conf, corr),
            "kl": float(v[2] / v[3]) if float(v[3]) else None,
            "accuracy": float(corr.sum() / tokens) if tokens else None,
            "tokens": int(tokens),
            "kl_tokens": int(v[3]),
            "bin_count": [int(c) for c in count],
            "bin_confidence": [float(c / k) if k else None for c, k in zip(conf, count)],  # noqa: B905
            "bin_accuracy": [float(c / k) if k else None for c, k in zip(corr, count)],  # noqa: B905
        }


def expected_calibration_error(count, confidence_sum, correct_sum) -> float | None:
    """ECE from per-bin totals (see the module docstring); None for no positions."""
    total = float(count.sum())
    if not total:
        return None
    return float((confidence_sum - correct_sum).abs().sum() / total)


def kl_floor(cache_dirs, kl: float | None) -> dict:
    """``kl_floor`` (the teacher's own KL to the caches' samples, positions-weighted over
    ``cache_dirs``) and ``kl_minus_floor``; None where a cache did not record it. Only the
    manifests are read (each evaluation calls this)."""
    from megatron_slkd.cache.manifest import Manifest

    total = weight = 0.0
    for d in cache_dirs:
        fig = Manifest.read(d).teacher_figures()
        if fig is None or "sample_kl" not in fig:
            return {"kl_floor": None, "kl_minus_floor": None}
        total += fig["sample_kl"] * fig["positions"]
        weight += fig["positions"]
    floor = total / weight if weight else None
    return {
        "kl_floor": floor,
        "kl_minus_floor": kl - floor if kl is not None and floor is not None else None,
    }
