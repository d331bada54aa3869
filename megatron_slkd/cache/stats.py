"""Describe a cache (``slkd inspect-cache``): storage, entries per position, one position.

The figures: bytes per token and per entry (whole shard files, headers and
indices included), the histogram of unique ids per position over positions
that have entries, and at a chosen (document, offset) the teacher's sparse
distribution of the next token, decoded with the tokenizer.
"""

from __future__ import annotations

import numpy as np

from megatron_slkd.cache.format import unpack_counts
from megatron_slkd.cache.reader import SparseKDCache

__all__ = ["cache_stats", "position_view", "plot_histogram"]


def cache_stats(cache: SparseKDCache) -> dict:
    """Storage and entries-per-position statistics of the whole cache."""
    hist = np.zeros(256, dtype=np.int64)
    for sh in cache.shards:
        n, bits = sh.header.num_tokens, sh.header.encoding.count_bits
        hist += np.bincount(unpack_counts(sh.counts_section(), n, bits), minlength=256)[:256]
    total_bytes = sum(s["size_bytes"] for s in cache.manifest.shards)
    entries = sum(s["num_entries"] for s in cache.manifest.shards)
    tokens = cache.num_tokens
    with_entries = int(hist[1:].sum())
    top = int(np.flatnonzero(hist)[-1]) if hist.any() else 0
    enc = cache.manifest.encoding
    return {
        "path": str(cache.path),
        "documents": cache.num_documents,
        "tokens": tokens,
        "entries": entries,
        "bytes": total_bytes,
        "bytes_per_token": total_bytes / max(tokens, 1),
        "bytes_per_entry": total_bytes / max(entries, 1),
        "entry_bytes": enc.entry_bytes,
        "overhead_bytes_per_token": (total_bytes - entries * enc.entry_bytes) / max(tokens, 1),
        "gb_per_billion_tokens": total_bytes / max(tokens, 1),
        "unique_ids_per_position_mean": entries / max(with_entries, 1),
        "positions_without_entries": int(hist[0]),
        "unique_ids_histogram": {str(i): int(hist[i]) for i in range(1, top + 1) if hist[i]},
        "sampling": cache.manifest.sampling,
        "teacher": cache.manifest.teacher,
        "encoding": enc.to_json(),
    }


def position_view(
    cache: SparseKDCache, doc: int, offset: int, *, tokenizer=None, ds=None, top: int = 10
) -> dict:
    """The sparse target stored at (``doc``, ``offset``): the next token's distribution."""
    rows = cache.read(doc, offset, 1)
    n = int(rows.num_entries[0])
    ids, weights = rows.ids[0, :n], rows.weights[0, :n]
    order = np.argsort(-weights, kind="stable")[:top]

    def piece(i: int) -> str | None:
        return tokenizer.decode([int(i)]) if tokenizer is not None else None

    view = {
        "document": doc,
        "offset": offset,
        "entries": n,
        "top": [
            {"id": int(ids[j]), "weight": float(weights[j]), "text": piece(ids[j])} for j in order
        ],
    }
    if ds is not None:
        tokens = ds.get(doc)
        view["context"] = (
            tokenizer.decode(tokens[max(0, offset - 24) : offset + 1]) if tokenizer else None
        )
        if offset + 1 < len(tokens):
            actual = int(tokens[offset + 1])
            view["actual_next"] = {"id": actual, "text": piece(actual)}
    return view


def plot_histogram(stats: dict, path) -> None:
    """Save the histogram of unique ids per position as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = stats["unique_ids_histogram"]
    xs = [int(k) for k in hist]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(xs, [hist[str(x)] for x in xs], width=0.9)
    ax.set_xlabel("unique ids per position")
    ax.set_ylabel("positions")
    ax.set_title(
        f"{stats['sampling'].get('method')} cache: mean {stats['unique_ids_per_position_mean']:.1f}"
        f" ids, {stats['bytes_per_token']:.1f} bytes/token"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
