"""``SparseKDGPTDataset``: megatron-core's GPTDataset plus the teacher's sparse targets.

Each sample is built by megatron-core's own document, sample and shuffle
indices; this subclass derives the same (document, offset, length) spans and
reads the matching cache rows, so ``kd_ids[i]`` / ``kd_weights[i]`` are the
teacher's distribution of ``labels[i]`` (cache row p of a document is the
distribution of its token p + 1, decision D1). Where a label is the first
token of the next document, or padding, the row is empty and the loss falls
back to cross-entropy. Alignment between each cache and its data prefix is
checked when the dataset is built (decision D5).

Build it with ``BlendedMegatronDatasetBuilder(SparseKDGPTDataset, sizes,
is_built_on_rank, config)`` and a :class:`SparseKDGPTDatasetConfig` whose
``kd_caches`` maps every data prefix of the blend to its cache directory.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megatron_slkd.cache.reader import SparseKDCache, open_cache
from megatron_slkd.errors import CacheMismatchError

__all__ = ["SparseKDGPTDataset", "SparseKDGPTDatasetConfig", "sample_spans"]


@dataclasses.dataclass
class SparseKDGPTDatasetConfig(GPTDatasetConfig):
    """GPTDatasetConfig with the sparse-logit caches of the blend."""

    kd_caches: dict[str, str] = dataclasses.field(default_factory=dict)
    """Data prefix -> cache directory, for every prefix of the blend."""
    kd_check_tokens: bool = True
    """At build time, compare each shard's token identity (recorded when the cache was
    built) with the data: one read of every token for a (dataset, cache) pair not shown
    aligned before (a verdict, :func:`~megatron_slkd.data.verify.check_content`). Document
    count and lengths are always compared; turning this off (a warning is logged)
    accepts a cache of another dataset whose documents have the same lengths."""
    kd_data_meta: dict[str, dict] = dataclasses.field(default_factory=dict)
    """Data prefix -> its tokenizer record (``slkd describe-data``, or the Megatron-style
    tokenizer flags), for prefixes without ``PREFIX.meta.json``; the caches' tokenizer
    is checked against it."""
    kd_object_cache_dir: str | None = None
    """Local directory for chunks of caches on object storage (None: the default of
    :mod:`megatron_slkd.cache.remote`)."""
    kd_object_cache_bytes: int | None = None
    """Bound of that directory in bytes (None: the default)."""
    kd_index_keys: dict[str, str] = dataclasses.field(default_factory=dict)
    """Data prefix -> its :func:`~megatron_slkd.data.indexed.index_key`, filled in for
    every local prefix of ``kd_caches`` when not given. Part of the key of the sample
    indices megatron-core keeps in ``path_to_cache``, which otherwise holds paths and
    settings only: a dataset preprocessed again at the same path (and its new cache)
    would be read through the old documents' boundaries, silently."""
    kd_pad_to: int | None = None
    """Pad ``kd_ids``/``kd_weights`` of every sample to this many entries (at least the
    cache's most per position), so a loader's default collate can stack samples
    (Megatron-LM's loader does); None keeps each sample's own largest K and needs
    :func:`megatron_slkd.data.batch.collate_kd`."""

    def __post_init__(self) -> None:
        from megatron_slkd.data.indexed import index_keys

        super().__post_init__()
        if not self.kd_index_keys:
            self.kd_index_keys = index_keys(self.kd_caches)


_log = logging.getLogger(__name__)
_CACHES: dict[tuple[str, str], SparseKDCache] = {}
_LOCK = threading.Lock()


def _open_checked(prefix: str, cache_dir: str, check_tokens: bool,
                  record: dict | None = None, config=None) -> SparseKDCache:  # fmt: skip
    """The cache of ``prefix``, opened and checked against the data at ``prefix`` once per
    process and pair (the train, validation and test splits of one prefix share it)."""
    from megatron_slkd.data.indexed import open_dataset
    from megatron_slkd.data.verify import check_content, tokenizer_problems
    from megatron_slkd.storage import is_object_url

    where = cache_dir if is_object_url(cache_dir) else str(Path(cache_dir).resolve())
    key = (str(Path(prefix).resolve()), where)
    with _LOCK:
        if key not in _CACHES:
            cache = open_cache(
                cache_dir,
                local_cache_dir=getattr(config, "kd_object_cache_dir", None),
                local_cache_bytes=getattr(config, "kd_object_cache_bytes", None),
            )
            if not check_tokens:
                _log.warning(
                    "token checksums of cache %s are NOT compared with data prefix %s "
                    "(kd_check_tokens off): a cache of another dataset with the same document "
                    "lengths would train on wrong targets",
                    cache_dir,
                    prefix,
                )
            missing = int(cache.manifest.extra.get("missing_documents") or 0)
            if missing:
                _log.warning(
                    "cache %s has empty rows for %d documents of %s (remapped with "
                    "--allow-missing): those positions train with cross-entropy",
                    cache_dir,
                    missing,
                    prefix,
                )
            # The dataset's tokens are read only where no verdict says they were shown
            # equal to the cache's (a first start, verify-cache, or the ranks' shared check).
            problems = check_content(cache, prefix, open_dataset(prefix), tokens=check_tokens)
            problems += tokenizer_problems(cache, prefix, record)
            if problems:
                raise CacheMismatchError(
                    f"cache {cache_dir} does not match data prefix {prefix}: " + "; ".join(problems)
                )
            _CACHES[key] = cache
        return _CACHES[key]


def sample_spans(dataset: GPTDataset, idx: int, rows: int):
    """(documents, offsets, lengths) of the first ``rows`` text positions of sample ``idx``.

    Mirrors ``GPTDataset._query_document_sample_shuffle_indices``: the same
    shuffle, sample and document indices, the same offsets.
    """
    i = int(dataset.shuffle_index[idx])
    beg, beg_off = (int(x) for x in dataset.sample_index[i])
    end, end_off = (int(x) for x in dataset.sample_index[i + 1])
    lengths = dataset.dataset.sequence_lengths
    docs, offsets, counts, total = [], [], [], 0
    for j in range(beg, end + 1):
        doc = int(dataset.document_index[j])
        off = beg_off if j == beg else 0
        n = (end_off - off if j == end else int(lengths[doc]) - off) + (
            dataset.config.add_extra_token_to_sequence if j == end else 0
        )
        n = min(n, rows - total)
        if n <= 0:  # an empty part (a sample may start at a document's very end)
            continue
        docs.append(doc)
        offsets.append(off)
        counts.append(n)
        total += n
    return docs, offsets, counts


class SparseKDGPTDataset(GPTDataset):
    """A GPTDataset whose samples also carry ``kd_ids`` and ``kd_weights``.

    Sample keys: those of GPTDataset, plus ``kd_ids`` ``[S, K]`` (int64) and
    ``kd_weights`` ``[S, K]`` (float32, rows summing to 1, or all 0 where the
    position has no teacher target), K the largest entry count in the sample.
    """

    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split,
                 config: SparseKDGPTDatasetConfig) -> None:  # fmt: skip
        caches = getattr(config, "kd_caches", None) or {}
        if dataset_path not in caches:
            raise CacheMismatchError(
                f"data prefix {dataset_path} has no sparse-logit cache; add it to kd_caches "
                f"(given: {sorted(caches)}) or build one with `slkd build-cache`"
            )
        self.kd_cache = _open_checked(dataset_path, caches[dataset_path],
                                      getattr(config, "kd_check_tokens", True),
                                      (getattr(config, "kd_data_meta", None) or {}).get(
                                          dataset_path), config)  # fmt: skip
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples,
                         index_split, config)  # fmt: skip

    @staticmethod
    def _key_config_attributes() -> list[str]:
        return [*GPTDataset._key_config_attributes(), "kd_index_keys"]

    def kd_prefetch(self, idx: int) -> None:
        """Start fetching the cache chunks of sample ``idx`` (caches on object storage;
        nothing for a local cache); returns at once."""
        if self.kd_cache.remote:
            rows = self.config.sequence_length
            self.kd_cache.prefetch_spans(*sample_spans(self, idx, rows))

    def __getitem__(self, idx: int | None) -> dict[str, torch.Tensor]:
        sample = super().__getitem__(idx)  # also loads the lazy indices
        rows = len(sample["labels"])
        docs, offsets, lengths = sample_spans(self, 0 if idx is None else idx, rows)
        got = self.kd_cache.read_spans(docs, offsets, lengths)
        k = got.ids.shape[1]
        pad_to = getattr(self.config, "kd_pad_to", None)
        if pad_to is not None:
            if k > pad_to:
                raise CacheMismatchError(
                    f"{self.kd_cache.path}: sample {idx} has {k} entries at one position, more "
                    f"than kd_pad_to={pad_to}; raise it to the cache's largest entry count"
                )
            k = pad_to
        ids = np.zeros((rows, k), dtype=np.int64)
        weights = np.zeros((rows, k), dtype=np.float32)
        n = got.ids.shape[0]  # fewer rows than labels only at padding
        width = got.ids.shape[1]
        ids[:n, :width], weights[:n, :width] = got.ids, got.weights
        if idx is None:
            weights[:] = 0.0
        sample["kd_ids"] = torch.from_numpy(ids)
        sample["kd_weights"] = torch.from_numpy(weights)
        return sample
