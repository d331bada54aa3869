"""Document windows (decision D1): each document is conditioned on its own prefix only.

A document of L tokens that fits the teacher's context C is one window. A
longer one is covered by windows of C tokens starting every S tokens (the
last one aligned to the document's end); each position takes its logits from
the first window that reaches it, so every position sees at least C - S
tokens of context, or its whole prefix.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Window", "document_windows", "pad_windows"]


class Window(NamedTuple):
    """Tokens ``[start, end)`` of one document go through the teacher; rows
    ``[score_from, end)`` of its output are kept."""

    start: int
    end: int
    score_from: int


def document_windows(length: int, context: int, stride: int) -> list[Window]:
    """Windows covering positions ``0 .. length - 1`` of one document.

    Args:
        length: tokens in the document.
        context: teacher window C.
        stride: step S between window starts, ``0 < S <= C``.
    """
    if not 0 < stride <= context:
        raise ValueError(f"stride must be in (0, context={context}], got {stride}")
    windows, scored, s = [], 0, 0
    while scored < length:
        start = min(s, max(length - context, 0))
        end = min(start + context, length)
        windows.append(Window(start, end, scored))
        scored, s = end, s + stride
    return windows


def pad_windows(windows: list[torch.Tensor]) -> torch.Tensor:
    """Right-pad 1-D int64 token windows into one ``[b, longest]`` batch.

    With causal attention the padding after a window never influences its real
    positions, so a teacher may score windows of different lengths together.
    """
    batch = torch.zeros(len(windows), max(len(w) for w in windows), dtype=torch.int64)
    for i, w in enumerate(windows):
        batch[i, : len(w)] = w
    return batch
