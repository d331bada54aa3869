"""Vocab-parallel sparse knowledge-distillation loss (decision D3).

The student's logits are sharded over the vocabulary (``[s, b, V/tp]`` per
rank, as megatron-core's output layer leaves them); the teacher's targets are
a few global ids with weights per token. The hard label is folded in as one
more sparse target, so the whole loss is a weighted cross-entropy against
K + 1 ids:

    loss = alpha * CE(label) + (1 - alpha) * (-sum_k w_k log softmax(z)_{id_k})
         = (sum_j W_j) log Z - sum_j W_j z_{id_j},   W = [(1 - alpha) w_1..w_K, alpha]

The contract holds for any non-negative weights: value and gradient are those
of ``-sum_k w_k log p_k``, whether or not the weights sum to 1 (the cache's
weights do; a caller's need not). An entry whose weight is 0 contributes
exactly 0, whatever its id (padding columns and out-of-range ids included).
A position with no teacher entries falls back to CE on its label.

The structure follows megatron-core's ``vocab_parallel_cross_entropy``: a
private autograd Function, an explicit ``tp_group``, one shard-sized buffer
that becomes the softmax in place and is saved for backward.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.distributed as dist

__all__ = ["vocab_parallel_sparse_kd_loss", "SparseKDLoss"]

_DEBUG = os.environ.get("SLKD_DEBUG_CHECKS", "0") not in ("", "0")


class SparseKDLoss(NamedTuple):
    """Per-token results, each ``[s, b]`` float32.

    loss: alpha * CE + (1 - alpha) * sparse KD cross-entropy (differentiable).
    kl: sum_k w_k log w_k - sum_k w_k log p_k: KL(teacher targets || student)
        when the weights sum to 1 (for logging; 0 where a position has no targets).
    ce: cross-entropy of the label (for logging; 0 without labels).
    """

    loss: torch.Tensor
    kl: torch.Tensor
    ce: torch.Tensor


def _tp(group) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _VocabParallelSparseKD(torch.autograd.Function):
    """Forward and backward of the loss on this rank's vocabulary shard.

    Collectives (over ``tp_group``), forward only:
      1. all-reduce MAX of the row maxima ``[s, b]``;
      2. all-reduce SUM of ``[3, s, b]``: the sum of exp, the weighted sum of
         the teacher ids' logits, and the label's logit (each rank adds what
         it holds; ids outside its shard, and entries of weight 0, contribute 0).
    Backward needs no communication.

    Saved for backward: the softmax ``[s, b, V/tp]`` (the one shard-sized
    buffer: the caller's logits when ``inplace``, else their float32 copy),
    the local ids ``[s, b, K + 1]`` with their in-shard mask, and the weights
    ``[s, b, K + 1]``.
    """

    @staticmethod
    def forward(ctx, logits, ids, weights, tp_group, vocab_size, inplace):
        rank, _ = _tp(tp_group)
        width = logits.shape[-1]
        start = rank * width
        # The shard-sized buffer: the logits themselves only if the caller allows it.
        buf = logits if (inplace and logits.dtype == torch.float32) else logits.float()
        if buf is logits and not inplace:
            buf = logits.clone()
        if vocab_size is not None and start + width > vocab_size:
            buf[..., max(vocab_size - start, 0) :] = float("-inf")

        m = buf.max(dim=-1).values
        if tp_group is not None:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)

        local = ids - start
        mine = (local >= 0) & (local < width)
        local = torch.where(mine, local, 0)
        picked = torch.where(mine, buf.gather(-1, local), 0.0)  # [s, b, K + 1]
        # A zero-weight entry may point at a padding column (-inf): 0, not 0 * -inf.
        teacher_dot = torch.where(weights[..., :-1] > 0, picked[..., :-1] * weights[..., :-1], 0.0)

        buf.sub_(m.unsqueeze(-1)).exp_()
        sums = torch.stack(
            [
                buf.sum(-1),
                teacher_dot.sum(-1),
                picked[..., -1],
            ]
        )
        if tp_group is not None:
            dist.all_reduce(sums, group=tp_group)
        sum_exp, teacher_dot, label_logit = sums
        log_z = sum_exp.log() + m
        buf.div_(sum_exp.unsqueeze(-1))  # now the softmax

        ctx.save_for_backward(buf, local, mine, weights)
        ctx.input_dtype = logits.dtype
        # -sum_k w_k log p_k = sum(w) log Z - sum_k w_k z_k, for any non-negative weights.
        ce_teacher = weights[..., :-1].sum(-1) * log_z - teacher_dot
        ce_label = log_z - label_logit
        return ce_teacher, ce_label

    @staticmethod
    def backward(ctx, grad_teacher, grad_label):
        softmax, local, mine, weights = ctx.saved_tensors
        # d/dz of g_t * (logZ - w.z_ids) + g_l * (logZ - z_label)
        #   = (g_t * sum(w) + g_l) * softmax - scatter(g_t * w, g_l at the label).
        scale = torch.cat([weights[..., :-1] * grad_teacher.unsqueeze(-1),
                           grad_label.unsqueeze(-1)], dim=-1)  # fmt: skip
        total = weights[..., :-1].sum(-1) * grad_teacher + grad_label
        grad = softmax.mul_(total.unsqueeze(-1))
        grad.scatter_add_(-1, local, torch.where(mine, -scale, 0.0))  # repeated ids accumulate
        return grad.to(ctx.input_dtype), None, None, None, None, None


def _check(logits, target_ids, target_weights, labels, vocab):
    if logits.dim() != 3:
        raise ValueError(f"logits must be [s, b, V/tp], got shape {tuple(logits.shape)}")
    if target_ids.shape != target_weights.shape or target_ids.shape[:2] != logits.shape[:2]:
        raise ValueError(
            f"target_ids {tuple(target_ids.shape)} and target_weights "
            f"{tuple(target_weights.shape)} must both be [s, b, K] with [s, b] = "
            f"{tuple(logits.shape[:2])}"
        )
    if labels is not None and labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels must be [s, b] = {tuple(logits.shape[:2])}, got {tuple(labels.shape)}"
        )
    if target_ids.dtype not in (torch.int32, torch.int64) or (
        labels is not None and labels.dtype not in (torch.int32, torch.int64)
    ):
        raise TypeError("target_ids and labels must be integer tensors")
    if not target_weights.is_floating_point() or not logits.is_floating_point():
        raise TypeError("logits and target_weights must be floating point")
    if _DEBUG:
        # Value checks synchronize with the device: behind SLKD_DEBUG_CHECKS=1.
        used = target_ids[target_weights > 0]  # ids of weight 0 may be anything
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= vocab):
            raise ValueError(f"target ids of non-zero weight outside the vocabulary [0, {vocab})")
        if target_weights.numel() and float(target_weights.min()) < 0:
            raise ValueError("target weights must be non-negative")


def vocab_parallel_sparse_kd_loss(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_weights: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    alpha: float = 0.0,
    tp_group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
    inplace: bool = False,
) -> SparseKDLoss:
    """Per-token sparse KD loss on vocabulary-parallel logits.

    Args:
        logits: this rank's shard ``[s, b, V/tp]`` (float32 or bf16; math in
            float32). Rank r of ``tp_group`` holds ids ``[r V/tp, (r+1) V/tp)``.
        target_ids: ``[s, b, K]`` global teacher ids (any value where the
            weight is 0); K may be 0.
        target_weights: ``[s, b, K]`` non-negative weights, 0 on padding (the
            loss is ``-sum_k w_k log p_k`` whatever they sum to; a cache's rows
            sum to 1); a position whose weights are all 0 has no teacher target.
        labels: ``[s, b]`` next-token labels (required when alpha > 0 or when
            a position may lack teacher targets).
        alpha: weight of the hard-label cross-entropy.
        tp_group: the tensor-parallel group of the vocabulary shards (None:
            ``logits`` is the whole vocabulary).
        vocab_size: true vocabulary size; logit columns at or above it (padding
            for TP divisibility) are left out of the softmax. None keeps every
            column, as megatron-core's cross-entropy does.
        inplace: let the loss overwrite float32 ``logits`` with its softmax
            buffer (saves one shard-sized copy; the caller must not reuse them).

    Returns:
        :class:`SparseKDLoss` of ``[s, b]`` tensors. Apply the loss mask and
        reduce as usual: ``(out.loss * loss_mask).sum() / loss_mask.sum()``.
    """
    _, tp = _tp(tp_group)
    vocab = vocab_size if vocab_size is not None else logits.shape[-1] * tp
    _check(logits, target_ids, target_weights, labels, vocab)
    s, b, _ = logits.shape
    w = target_weights.float()
    has_targets = w.sum(-1) > 0
    if labels is None:
        if alpha > 0 or not bool(has_targets.all()):
            raise ValueError("labels are required when alpha > 0 or a position has no targets")
        labels = torch.zeros(s, b, dtype=torch.int64, device=logits.device)
    # The label is the (K+1)-th sparse target; its weight enters through the
    # label term, so its slot in the weights carries only the fallback flag.
    ids = torch.cat([target_ids.long(), labels.long().unsqueeze(-1)], dim=-1)
    weights = torch.cat([w, torch.zeros_like(w[..., :1])], dim=-1)
    ce_teacher, ce_label = _VocabParallelSparseKD.apply(
        logits, ids, weights, tp_group, vocab_size, inplace
    )
    teacher_share = torch.where(has_targets, 1.0 - alpha, 0.0)
    loss = teacher_share * ce_teacher + (1.0 - teacher_share) * ce_label
    with torch.no_grad():
        wlogw = torch.where(w > 0, w * w.clamp(min=1e-30).log(), 0.0).sum(-1)
        kl = torch.where(has_targets, wlogw + ce_teacher, 0.0)
    return SparseKDLoss(loss, kl, ce_label.detach())
