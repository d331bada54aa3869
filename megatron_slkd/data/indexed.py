"""Reading a Megatron IndexedDataset for alignment checks.

A cache row is keyed by (document, offset) where "document" is a sequence of
the IndexedDataset (``prepare-data`` writes one sequence per document, as
Megatron's ``preprocess_data.py`` does without sentence splitting).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from megatron_slkd.errors import CacheMismatchError, DataMismatchError

__all__ = ["open_dataset", "iter_token_blocks", "dataset_fingerprint"]


def open_dataset(prefix: str):
    """megatron-core's ``IndexedDataset`` at ``prefix`` (memory-mapped).

    The arrays it returns (``get``, ``sequence_lengths``) are views of its
    memory maps, which close when the dataset object is collected: keep a
    reference to the dataset while they are in use (or copy them).

    Raises:
        CacheMismatchError: ``PREFIX.bin`` or ``PREFIX.idx`` is missing.
        DataMismatchError: ``PREFIX.bin`` is empty (no document has a token).
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for suffix in (".bin", ".idx"):
        if not Path(prefix + suffix).is_file():
            raise CacheMismatchError(f"{prefix}{suffix}: dataset file not found")
    if Path(prefix + ".bin").stat().st_size == 0:
        # megatron-core cannot memory-map it (and its reader then fails again when collected).
        raise DataMismatchError(
            f"{prefix}.bin is empty: the dataset holds no token (no document, or only empty "
            "ones); there is nothing to distill or train on"
        )
    return IndexedDataset(prefix, mmap=True)


def iter_token_blocks(ds, doc_start: int, doc_end: int, block_tokens: int = 1 << 22) -> Iterator:
    """Tokens of documents ``[doc_start, doc_end)`` in order, in blocks of about
    ``block_tokens``; each block is a numpy array in the dataset's dtype."""
    lengths = ds.sequence_lengths
    d = doc_start
    while d < doc_end:
        e, n = d, 0
        while e < doc_end and (n == 0 or n + int(lengths[e]) <= block_tokens):
            n += int(lengths[e])
            e += 1
        pointer = int(ds.index.sequence_pointers[d])
        yield (
            ds.bin_reader.read(dtype=ds.index.dtype, count=n, offset=pointer)
            if _contiguous(ds, d, e)
            else np.concatenate([ds.get(i) for i in range(d, e)])
        )
        d = e


def _contiguous(ds, d: int, e: int) -> bool:
    ptr = ds.index.sequence_pointers
    size = np.dtype(ds.index.dtype).itemsize
    span = int(ptr[e - 1]) + int(ds.sequence_lengths[e - 1]) * size - int(ptr[d])
    return span == int(ds.sequence_lengths[d:e].sum()) * size


def dataset_fingerprint(prefix: str, ds=None) -> dict:
    """``prefix``, ``num_documents`` and ``num_tokens`` of a dataset, as a manifest records them."""
    ds = ds if ds is not None else open_dataset(prefix)
    lengths = ds.sequence_lengths
    return {
        "prefix": str(prefix),
        "num_documents": int(len(lengths)),
        "num_tokens": int(np.asarray(lengths, dtype=np.int64).sum()),
    }
