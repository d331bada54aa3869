"""Derive an N2-draw RS cache from an N-draw one (``slkd thin-cache``).

The N draws stored at a position are N i.i.d. samples from the teacher; any
N2 of them chosen uniformly without replacement are N2 i.i.d. samples too. So
choosing N2 of the N draws (multivariate hypergeometric thinning of the
counts) yields exactly the cache a teacher run with N2 draws would have
produced in law, without rerunning the teacher. The choice is keyed by
(seed, absolute token position, draw index) like the sampler's, so thinning
is deterministic and resumable.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from megatron_slkd.cache.format import TOKEN_HASH_NAME, ValueKind, encoding_for
from megatron_slkd.cache.manifest import MANIFEST_NAME
from megatron_slkd.cache.reader import open_cache
from megatron_slkd.cache.writer import (
    ShardWriter,
    atomic_write_text,
    check_finished_shard,
)
from megatron_slkd.errors import CacheMismatchError
from megatron_slkd.sampling import counter_uniform

__all__ = ["thin_counts", "thin_cache"]


def thin_counts(counts: np.ndarray, num_samples: int, seed: int, positions) -> np.ndarray:
    """Keep ``num_samples`` of each row's draws, uniformly without replacement.

    Args:
        counts: ``[L, K]`` int draw counts; each row sums to N or to 0.
        num_samples: draws to keep (N2 <= N).
        seed: thinning seed.
        positions: ``[L]`` absolute token positions (keys of the choice).

    Returns:
        ``[L, K]`` int64 thinned counts (zeros where an id lost all its draws).
    """
    rows, k = counts.shape
    out = np.zeros((rows, k), dtype=np.int64)
    totals = counts.sum(-1)
    live = np.flatnonzero(totals)
    if live.size == 0:
        return out
    n = int(totals[live[0]])
    if np.any(totals[live] != n) or num_samples > n:
        raise ValueError(f"rows must all hold N={n} >= {num_samples} draws")
    # One item per draw, naming its entry: row r's items are entries repeated by count.
    entry = np.repeat(np.tile(np.arange(k), live.size), counts[live].ravel()).reshape(-1, n)
    keys = counter_uniform(seed, torch.as_tensor(np.asarray(positions)[live]), n).numpy()
    keep = np.argsort(keys, axis=1, kind="stable")[:, :num_samples]
    chosen = np.take_along_axis(entry, keep, axis=1)
    np.add.at(out, (np.repeat(live, num_samples), chosen.ravel()), 1)
    return out


def thin_cache(source, output, num_samples: int, *, seed: int = 0) -> dict:
    """Write an ``num_samples``-draw cache at ``output`` from the RS cache ``source``.

    Raises:
        CacheMismatchError: ``source`` is not an RS count cache, or
            ``num_samples`` is not below its N.
    """
    src = open_cache(source)
    m = src.manifest
    n = m.encoding.num_samples
    if m.encoding.value_kind != ValueKind.COUNT:
        raise CacheMismatchError(f"{source}: thinning needs an RS count cache, not {m.encoding}")
    if not 1 <= num_samples < n:
        raise CacheMismatchError(f"{source}: has N={n} draws; --num-samples must be in [1, {n})")
    enc = encoding_for("rs", src.vocab_size, num_samples=num_samples)
    sampling = {**m.sampling, "num_samples": num_samples}
    extra = {**m.extra, "thinned_from": {"path": str(source), "num_samples": n, "seed": seed}}
    base = dataclasses.replace(m, sampling=sampling, encoding=enc, shards=[], extra=extra)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    pos = 0
    for sh, rec in zip(src.shards, m.shards, strict=True):
        path = out / rec["file"]
        if path.exists():  # finished by an earlier, interrupted run of the same command
            records.append(check_finished_shard(path, base).shards[0])
            pos += rec["num_tokens"]
            continue
        w = ShardWriter.open(
            path,
            encoding=enc,
            vocab_size=src.vocab_size,
            doc_start=rec["doc_start"],
            doc_end=rec["doc_end"],
            chunk_tokens=sh.header.chunk_tokens,
        )
        lengths = np.diff(sh.doc_offsets.astype(np.int64))
        pos += int(sh.doc_offsets[w.next_document - rec["doc_start"]])
        for d in range(w.next_document, rec["doc_end"]):
            length = int(lengths[d - rec["doc_start"]])
            rows = src.read(d, 0, length)
            counts = np.rint(rows.weights.astype(np.float64) * n).astype(np.int64)
            positions = np.arange(pos, pos + length)
            new = thin_counts(counts, num_samples, seed, positions)
            ids, new = _compact(rows.ids, new)
            w.add_document(length, ids, new / num_samples, (new > 0).sum(-1), new)
            pos += length
            if d % 256 == 255:
                w.commit()
        records.append(w.finalize(rec["token_crc32"], rec.get(TOKEN_HASH_NAME), sidecar=base))
    atomic_write_text(out / MANIFEST_NAME, dataclasses.replace(base, shards=records).to_json())
    return {"output": str(out), "num_samples": num_samples, "from": n, "shards": len(records)}


def _compact(ids: np.ndarray, counts: np.ndarray):
    """Move surviving entries left, ordered by count desc then id asc."""
    key = np.where(counts > 0, counts * (1 << 40) - ids, -1)
    order = np.argsort(-key, axis=1, kind="stable")
    return np.take_along_axis(ids, order, 1), np.take_along_axis(counts, order, 1)
