"""CPU kernels of the RS sampler (numba).

The integer mass of a logit ``z`` with row maximum ``m`` is
``floor(exp(z - m) * 2**32)``. Here exp is a fixed float32 polynomial (Cody-Waite
range reduction, degree-7 Taylor on [-ln2/2, ln2/2], exact power-of-two
scaling) with no library call, so every element gets the same value whether it
falls in a vector lane or a scalar tail, on any thread count and any shard
split; relative error against the true exp is below 3e-7. Masses are summed in
int64, which is exact in any order.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["block_masses", "resolve_draws"]

_F = np.float32
_LOG2E = _F(1.4426950408889634)
_HALF = _F(0.5)
_LN2_HI = _F(0.693145751953125)
_LN2_LO = _F(1.4286067653301870e-06)
_C2, _C3, _C4 = _F(1 / 2), _F(1 / 6), _F(1 / 24)
_C5, _C6, _C7 = _F(1 / 120), _F(1 / 720), _F(1 / 5040)
_ONE = _F(1.0)
_FLOOR_X = _F(-23.0)  # exp(-23) * 2**32 < 1: the mass is 0 below this
_POW2 = np.array([2.0 ** (k + 32) for k in range(-34, 1)], dtype=np.float32)


@numba.njit(inline="always")
def _mass(x):
    """floor(exp(x) * 2**32) for float32 x <= 0, as int64."""
    xc = max(x, _FLOOR_X)
    n = np.floor(xc * _LOG2E + _HALF)
    r = xc - n * _LN2_HI
    r = r - n * _LN2_LO
    p = _C7
    p = p * r + _C6
    p = p * r + _C5
    p = p * r + _C4
    p = p * r + _C3
    p = p * r + _C2
    p = p * r + _ONE
    p = p * r + _ONE
    q = np.floor(p * _POW2[np.int64(n) + 34])
    return np.int64(q) if x > _FLOOR_X else np.int64(0)


@numba.njit(parallel=True, cache=True, nogil=True)
def block_masses(z, m, block, out):
    """Integer masses summed per block of ``block`` ids.

    Args:
        z: ``[R, W]`` float32 logits.
        m: ``[R]`` float32 row maxima (global across TP shards).
        block: ids per block.
        out: ``[R, ceil(W / block)]`` int64, written.
    """
    rows, width = z.shape
    nb = out.shape[1]
    for r in numba.prange(rows):
        mr = m[r]
        for b in range(nb):
            s = np.int64(0)
            end = min(width, (b + 1) * block)
            for i in range(b * block, end):
                s += _mass(z[r, i] - mr)
            out[r, b] = s


@numba.njit(parallel=True, cache=True, nogil=True)
def resolve_draws(z, m, blocks, targets, block, out):
    """Local id whose integer-mass interval holds each target.

    Args:
        z, m, block: as for :func:`block_masses`.
        blocks: ``[R, nb]`` int64 block masses from :func:`block_masses`.
        targets: ``[R, N]`` int64 targets in [0, row total), or -1 for draws
            that another shard owns.
        out: ``[R, N]`` int64, written with local ids (-1 where target is -1).
    """
    rows, width = z.shape
    nb = blocks.shape[1]
    ndraw = targets.shape[1]
    for r in numba.prange(rows):
        cdf = np.cumsum(blocks[r])
        mr = m[r]
        for j in range(ndraw):
            t = targets[r, j]
            if t < 0:
                out[r, j] = -1
                continue
            b = min(np.searchsorted(cdf, t, side="right"), nb - 1)
            acc = cdf[b - 1] if b > 0 else np.int64(0)
            i = b * block
            last = min(width, (b + 1) * block) - 1
            while i < last:
                acc += _mass(z[r, i] - mr)
                if acc > t:
                    break
                i += 1
            out[r, j] = i
