"""How a cache splits into shard files: their names, and the documents each one holds.

Shard ``i`` of ``n`` is ``shard-{i:05d}-of-{n:05d}.slkd`` and holds a contiguous
range of documents; :func:`plan_shards` cuts the dataset into ranges of about
equal token counts, the same on every rank and in every task of a job array.
"""

from __future__ import annotations

import numpy as np

from megatron_slkd.errors import ConfigError

__all__ = ["shard_file_name", "plan_shards"]


def shard_file_name(index: int, count: int) -> str:
    """The file name of shard ``index`` of ``count``."""
    return f"shard-{index:05d}-of-{count:05d}.slkd"


def plan_shards(lengths: np.ndarray, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous document ranges with about equal token counts."""
    n = len(lengths)
    if not 1 <= num_shards <= max(n, 1):
        raise ConfigError(
            f"--num-shards {num_shards}: a dataset of {n} documents splits into 1 to {n} shards"
        )
    cum = np.cumsum(np.asarray(lengths, dtype=np.int64))
    total = int(cum[-1]) if n else 0
    cuts = [0]
    for i in range(1, num_shards):
        c = int(np.searchsorted(cum, total * i / num_shards, side="left")) + 1
        cuts.append(min(max(c, cuts[-1] + 1), n - (num_shards - i)))
    cuts.append(n)
    return list(zip(cuts[:-1], cuts[1:], strict=True))
