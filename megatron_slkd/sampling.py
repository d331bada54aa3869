"""Sparse teacher targets from logits: Random Sampling KD and Top-K.

``sample_sparse_targets`` turns teacher logits ``[T, V]`` (or this rank's
vocabulary shard ``[T, V/tp]``) into a few (id, weight) pairs per token:

- ``method="rs"`` draws ``num_samples`` ids with replacement from
  softmax(logits / temperature) and weights each unique id by count / N. At
  temperature 1 that is an unbiased estimate of the teacher distribution; at
  other temperatures the weights are importance-corrected (count * p / q,
  renormalized per token so they sum to 1): a consistent estimate of p whose
  bias, from the normalization, shrinks as 1/N.
- ``method="topk"`` keeps the ``k`` most probable ids with their probabilities
  (not renormalized) and reports the residual mass per row.

Determinism (decision D2): draw j of the token at absolute position ``pos``
uses a uniform number computed from (seed, pos, j) by a counter-based hash, so
a token's draws do not depend on the batch it is in, its order, or the tensor
parallel size.

Exactness across tensor parallel sizes: probabilities are quantized to
integers, ``floor(exp(z - max) * 2**32)``, and every cumulative sum is taken
over those integers in int64, where it is exact whatever the summation order
(the total stays below 2**53 for V <= 2**20, so it also converts to float64
exactly). On CPU a numba kernel computes exp with a fixed polynomial, so the
masses do not depend on vector lanes, threads or shard boundaries. A draw picks the id whose
integer interval holds ``floor(u * total)``. Sharded and unsharded runs thus
walk the same integer CDF. Ids whose probability is below 2**-32 of the
most likely one are never drawn (total mass so excluded: at most V * 2**-32).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from megatron_slkd import _sampling_cpu

__all__ = ["SparseTargets", "sample_sparse_targets", "counter_uniform"]

_MASK32 = 0xFFFFFFFF
_QUANT_SCALE = float(2**32)
_BLOCK = 128  # ids per block of the two-level CDF search
_MAX_VOCAB = 2**20  # keeps the integer total below 2**53
_ROW_BUDGET = 1 << 24  # elements of the per-chunk work buffer


class SparseTargets(NamedTuple):
    """Sparse teacher targets for ``T`` tokens.

    ids: ``[T, Kmax]`` int64 global vocabulary ids, padded with 0.
    weights: ``[T, Kmax]`` float32, 0 on padding. RS: count / N (or the
        importance weights at temperature != 1); Top-K: probabilities.
    num_valid: ``[T]`` int64 number of valid entries per row.
    residual: ``[T]`` float32 probability mass outside the kept ids (Top-K
        only, ``None`` for RS).
    counts: ``[T, Kmax]`` int64 draw counts (RS only, ``None`` for Top-K).
    """

    ids: torch.Tensor
    weights: torch.Tensor
    num_valid: torch.Tensor
    residual: torch.Tensor | None = None
    counts: torch.Tensor | None = None


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # A 32-bit integer finalizer (two multiply-xorshift rounds). Values are
    # kept in [0, 2**32) inside int64, so shifts are logical and the low 32
    # bits of each product are exact even when the int64 product wraps.
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _hash_stream(seed: int, positions: torch.Tensor, draws: torch.Tensor, stream: int):
    h = _mix32(torch.full_like(positions, ((seed >> 32) ^ (0x9E3779B9 * (stream + 1))) & _MASK32))
    h = _mix32(h ^ (seed & _MASK32))
    h = _mix32(h ^ ((positions >> 32) & _MASK32))
    h = _mix32(h ^ (positions & _MASK32))
    return _mix32(h.unsqueeze(-1) ^ draws)


def counter_uniform(seed: int, positions: torch.Tensor, num_draws: int) -> torch.Tensor:
    """Uniform numbers in [0, 1) keyed by (seed, position, draw index).

    Args:
        seed: any non-negative integer below 2**64.
        positions: ``[T]`` int64 absolute token positions (non-negative).
        num_draws: draws per position.

    Returns:
        ``[T, num_draws]`` float64 with 52 random bits each.
    """
    if seed < 0 or seed >= 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    positions = positions.to(torch.int64)
    draws = torch.arange(num_draws, dtype=torch.int64, device=positions.device)
    hi = _hash_stream(seed, positions, draws, 0)
    lo = _hash_stream(seed, positions, draws, 1)
    bits = (hi << 20) | (lo >> 12)
    return bits.to(torch.float64) * (2.0**-52)


def _tp_info(tp_group) -> tuple[int, int]:
    if tp_group is None:
        return 0, 1
    return dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)


def _masked_logits(
    logits: torch.Tensor, temperature: float, vocab_start: int, vocab_size: int | None
) -> torch.Tensor:
    """float32 logits / temperature without the ids >= vocab_size (TP padding).

    The padding columns are cut off by a view, so float32 logits at temperature
    1 are never copied: the sampler's extra memory stays O(T * (V/tp/128 + N)).
    """
    if vocab_size is not None:
        logits = logits[:, : min(max(vocab_size - vocab_start, 0), logits.shape[-1])]
    z = logits.detach().float()
    return z / temperature if temperature != 1.0 else z


def _global_max(z: torch.Tensor, tp_group) -> torch.Tensor:
    if z.shape[-1] == 0:  # a rank that holds only vocabulary padding
        m = torch.full(z.shape[:1], float("-inf"), dtype=z.dtype, device=z.device)
    else:
        m = z.max(dim=-1).values
    if tp_group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
    return m


def _torch_masses(z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Integer masses floor(exp(z - m) * 2**32) as int64 (the non-CPU path).

    The CPU kernels' exp polynomial (:mod:`megatron_slkd._sampling_cpu`) as float32
    tensor operations, each rounded once as there, so masses on a GPU equal the CPU
    ones bit for bit (a library exp differs in the last bits from device to device).
    """
    c = _sampling_cpu
    x = z - m.unsqueeze(-1)
    xc = x.clamp(min=float(c._FLOOR_X))
    n = torch.floor(xc * float(c._LOG2E) + float(c._HALF))
    r = xc - n * float(c._LN2_HI)
    r = r - n * float(c._LN2_LO)
    p = r * float(c._C7) + float(c._C6)
    for coef in (c._C5, c._C4, c._C3, c._C2, c._ONE, c._ONE):
        p = p * r + float(coef)
    pow2 = torch.as_tensor(c._POW2, device=z.device)
    q = torch.floor(p * pow2[n.to(torch.int64) + 34]).to(torch.int64)
    return torch.where(x > float(c._FLOOR_X), q, 0)


def _torch_block_masses(z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    rows, width = z.shape
    nb = -(-width // _BLOCK)
    out = torch.empty(rows, nb, dtype=torch.int64, device=z.device)
    chunk = max(1, _ROW_BUDGET // max(width, 1))
    for r0 in range(0, rows, chunk):
        q = _torch_masses(z[r0 : r0 + chunk], m[r0 : r0 + chunk])
        q = torch.nn.functional.pad(q, (0, nb * _BLOCK - width))
        out[r0 : r0 + chunk] = q.view(q.shape[0], nb, _BLOCK).sum(-1)
    return out


def _torch_resolve(z, m, blocks, targets):
    rows, width = z.shape
    nb = blocks.shape[1]
    cdf = blocks.cumsum(-1)
    t = targets.clamp(min=0)
    b = torch.searchsorted(cdf, t, right=True).clamp_(max=nb - 1)
    before = torch.where(b > 0, cdf.gather(1, (b - 1).clamp(min=0)), 0)
    cols = b.unsqueeze(-1) * _BLOCK + torch.arange(_BLOCK, device=z.device)  # [R, N, B]
    in_row = cols < width
    zb = z.gather(1, cols.clamp(max=width - 1).flatten(1)).view_as(cols)
    q = torch.where(in_row, _torch_masses(zb.flatten(1), m).view_as(cols), 0)
    j = (q.cumsum(-1) <= (t - before).unsqueeze(-1)).sum(-1).clamp_(max=_BLOCK - 1)
    ids = (b * _BLOCK + j).clamp_(max=width - 1)
    return torch.where(targets >= 0, ids, -1)


def _block_masses(z, m):
    if z.device.type == "cpu":
        nb = -(-z.shape[1] // _BLOCK)
        out = torch.empty(z.shape[0], nb, dtype=torch.int64)
        _sampling_cpu.block_masses(z.numpy(), m.numpy(), _BLOCK, out.numpy())
        return out
    return _torch_block_masses(z, m)


def _resolve(z, m, blocks, targets):
    if z.shape[1] == 0:  # only padding here: every draw belongs to another rank
        return torch.full_like(targets, -1)
    if z.device.type == "cpu":
        out = torch.empty_like(targets)
        _sampling_cpu.resolve_draws(
            z.numpy(), m.numpy(), blocks.numpy(), targets.numpy(), _BLOCK, out.numpy()
        )
        return out
    return _torch_resolve(z, m, blocks, targets)


def _unique_counts(draws: torch.Tensor):
    """Unique ids per row with their counts, ordered by count desc then id asc."""
    rows, n = draws.shape
    s, _ = draws.sort(dim=-1)
    is_new = torch.ones_like(s, dtype=torch.bool)
    is_new[:, 1:] = s[:, 1:] != s[:, :-1]
    slot = is_new.cumsum(-1) - 1
    num_valid = is_new.sum(-1)
    kmax = int(num_valid.max()) if rows else 0
    ids = torch.zeros(rows, kmax, dtype=torch.int64, device=draws.device)
    counts = torch.zeros(rows, kmax, dtype=torch.int64, device=draws.device)
    ids.scatter_(1, slot, s)
    counts.scatter_add_(1, slot, torch.ones_like(s))
    # Reorder: count desc, id asc (padding has count 0 and sorts last).
    key = counts * (1 << 40) - ids
    order = key.argsort(dim=-1, descending=True, stable=True)
    return ids.gather(1, order), counts.gather(1, order), num_valid


def _sample_rs(z, positions, seed, num_samples, tp_group, vocab_start):
    rank, tp = _tp_info(tp_group)
    m = _global_max(z, tp_group)
    blocks = _block_masses(z, m)
    local_total = blocks.sum(-1)
    if tp_group is None:
        offset, total = torch.zeros_like(local_total), local_total
    else:
        totals = [torch.empty_like(local_total) for _ in range(tp)]
        dist.all_gather(totals, local_total, group=tp_group)
        stacked = torch.stack(totals)  # [tp, T]
        total, offset = stacked.sum(0), stacked[:rank].sum(0)
    u = counter_uniform(seed, positions.to(z.device), num_samples)
    # total < 2**53, so float64 holds it exactly and floor(u * total) < total.
    targets = torch.floor(u * total.unsqueeze(-1).double()).to(torch.int64)
    targets = torch.minimum(targets, (total - 1).unsqueeze(-1)) - offset.unsqueeze(-1)
    targets = torch.where((targets >= 0) & (targets < local_total.unsqueeze(-1)), targets, -1)
    local = _resolve(z, m, blocks, targets)
    ids = torch.where(local >= 0, local + vocab_start, -1)
    if tp_group is not None:
        dist.all_reduce(ids, op=dist.ReduceOp.MAX, group=tp_group)
    return ids


def _sample_topk(z, k, tp_group, vocab_start):
    m = _global_max(z, tp_group)
    sum_exp = torch.exp(z - m.unsqueeze(-1)).sum(-1, dtype=torch.float64)
    vals, idx = z.topk(min(k, z.shape[-1]), dim=-1)
    # Pad to k so every rank contributes the same shape (a shard may be short).
    short = k - vals.shape[-1]
    vals = torch.nn.functional.pad(vals, (0, short), value=float("-inf"))
    idx = torch.nn.functional.pad(idx + vocab_start, (0, short))
    if tp_group is not None:
        dist.all_reduce(sum_exp, group=tp_group)
        _, tp = _tp_info(tp_group)
        all_vals = [torch.empty_like(vals) for _ in range(tp)]
        all_idx = [torch.empty_like(idx) for _ in range(tp)]
        dist.all_gather(all_vals, vals.contiguous(), group=tp_group)
        dist.all_gather(all_idx, idx.contiguous(), group=tp_group)
        vals, idx = torch.cat(all_vals, -1), torch.cat(all_idx, -1)
    # Deterministic tie-break: value desc, then id asc.
    by_id = idx.argsort(dim=-1, stable=True)
    vals, idx = vals.gather(1, by_id), idx.gather(1, by_id)
    order = vals.argsort(dim=-1, descending=True, stable=True)[:, :k]
    vals, idx = vals.gather(1, order), idx.gather(1, order)
    probs = torch.exp(vals.double() - m.double().unsqueeze(-1)) / sum_exp.unsqueeze(-1)
    valid = torch.isfinite(vals)
    probs = torch.where(valid, probs, 0.0)
    residual = (1.0 - probs.sum(-1)).clamp_(min=0.0)
    return idx.where(valid, 0), probs.float(), valid.sum(-1), residual.float()


def sample_sparse_targets(
    logits: torch.Tensor,
    *,
    method: str,
    seed: int,
    positions: torch.Tensor,
    num_samples: int = 50,
    k: int | None = None,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
) -> SparseTargets:
    """Sparse teacher targets for each row of ``logits``.

    Args:
        logits: ``[T, V]`` teacher logits, or this rank's contiguous vocabulary
            shard ``[T, V/tp]`` when ``tp_group`` is given (rank r holds ids
            ``[r * V/tp, (r + 1) * V/tp)``, as megatron-core partitions them).
            Any float dtype; math is float32 with float64 integer CDFs.
        method: ``"rs"`` (random sampling) or ``"topk"``.
        seed: RNG seed in [0, 2**64).
        positions: ``[T]`` int64 absolute token positions; the key of the draws.
        num_samples: RS draws per token, with replacement.
        k: Top-K size (required for ``"topk"``).
        temperature: proposal temperature for RS (weights are corrected back to
            temperature 1); the distribution's temperature for Top-K.
        tp_group: tensor-parallel group whose ranks hold the vocabulary shards.
            Communication per token: one MAX all-reduce of 1 float, an
            all-gather of ``tp`` float64 totals and a MAX all-reduce of
            ``num_samples`` ids (RS); an all-reduce of 1 float and all-gathers
            of ``tp * k`` candidates (Top-K). No rank holds a ``[T, V]`` tensor.
        vocab_size: true vocabulary size; ids at or above it (padding added for
            TP divisibility) are never returned.

    Returns:
        :class:`SparseTargets`, identical on every rank of ``tp_group``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, V], got shape {tuple(logits.shape)}")
    if positions.shape != logits.shape[:1]:
        raise ValueError(
            f"positions must be [T]={logits.shape[0]}, got shape {tuple(positions.shape)}"
        )
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    rank, tp = _tp_info(tp_group)
    width = logits.shape[-1]
    if width * tp > _MAX_VOCAB:
        raise ValueError(f"vocabulary of {width * tp} ids exceeds the supported {_MAX_VOCAB}")
    vocab_start = rank * width
    z = _masked_logits(logits, temperature, vocab_start, vocab_size)

    if method == "topk":
        if k is None or k < 1:
            raise ValueError(f"method='topk' needs k >= 1, got k={k}")
        ids, probs, num_valid, residual = _sample_topk(z, k, tp_group, vocab_start)
        return SparseTargets(ids, probs, num_valid, residual=residual)
    if method != "rs":
        raise ValueError(f"unknown method {method!r}; expected 'rs' or 'topk'")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")

    draws = _sample_rs(z, positions, seed, num_samples, tp_group, vocab_start)
    ids, counts, num_valid = _unique_counts(draws)
    weights = counts.double() / num_samples
    if temperature != 1.0:
        weights = _importance_weights(logits, ids, counts, temperature, tp_group, vocab_start)
    return SparseTargets(ids, weights.float(), num_valid, counts=counts)


def _importance_weights(logits, ids, counts, temperature, tp_group, vocab_start):
    # w_i ~ count_i * p_i / q_i with p = softmax(z), q = softmax(z / t):
    # log(p_i / q_i) = z_i * (1 - 1/t) + const; the const cancels on normalizing.
    width = logits.shape[-1]
    local = ids - vocab_start
    mine = (local >= 0) & (local < width) & (counts > 0)
    z = logits.float().gather(1, local.clamp(0, width - 1)).double()
    z = torch.where(mine, z, float("-inf"))
    if tp_group is not None:
        dist.all_reduce(z, op=dist.ReduceOp.MAX, group=tp_group)
    logw = torch.where(counts > 0, z * (1.0 - 1.0 / temperature) + counts.double().log(), -math.inf)
    logw = logw - logw.max(-1, keepdim=True).values.clamp(min=-1e300)
    w = torch.where(counts > 0, logw.exp(), 0.0)
    return w / w.sum(-1, keepdim=True).clamp(min=1e-300)
