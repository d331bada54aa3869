"""Datasets and loaders of the student run: megatron-core's builder, a resumable sampler.

Samples come from megatron-core's ``BlendedMegatronDatasetBuilder`` (its
document, sample and shuffle indices), as :class:`SparseKDGPTDataset` when
the run has caches and as plain ``GPTDataset`` otherwise. The sampler walks
the global sample order from ``consumed_samples``: each micro-batch step takes
``micro_batch_size x data_parallel`` consecutive samples and data-parallel
rank r gets the r-th slice, as Megatron-LM's pretraining sampler does. A run
resumed from a checkpoint therefore sees exactly the samples it would have
seen without the interruption.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from megatron_slkd.data.batch import collate_kd
from megatron_slkd.errors import (
    CacheFormatError,
    CacheMismatchError,
    ConfigError,
    DataMismatchError,
    LoaderFailedError,
    SlkdError,
    first_line,
)
from megatron_slkd.training.config import TrainConfig, parse_blend

__all__ = [
    "DataTokenizer",
    "data_prefixes",
    "data_blends",
    "read_tokenizer",
    "check_cache_contents",
    "build_datasets",
    "first_reordered",
    "make_loader",
    "TimedIterator",
]


class DataTokenizer:
    """What megatron-core's GPTDataset asks of a tokenizer, from the prefix's meta.json.

    megatron-core keys the sample indices it keeps in ``path_to_cache`` by the dataset's
    path and settings, not by its contents: a dataset rewritten at the same path (another
    preprocessing, a re-tokenization) would be read through the indices of the old one,
    samples cut at the old documents' boundaries, without an error. The tokenizer's
    ``unique_identifiers`` are part of that key, so with ``records`` they also carry each
    prefix's :func:`~megatron_slkd.data.indexed.index_key`: a rewritten dataset gets
    indices of its own.
    """

    def __init__(self, meta: dict, records: dict[str, dict] | None = None) -> None:
        from megatron_slkd.data.indexed import index_keys

        self.vocab_size = int(meta["vocab_size"])
        self.eod = int(meta["eod"])
        self.records = records or {}
        """Data prefix -> its whole record (the caches' tokenizers are checked against it)."""
        self.index_keys = index_keys(self.records)
        """Data prefix -> its index_key (the KD datasets' config takes them from here)."""
        self.unique_identifiers = {"fingerprint": meta["fingerprint"]}
        if self.index_keys:
            self.unique_identifiers["data"] = self.index_keys


def data_blends(cfg: TrainConfig) -> list[tuple[list[str], list[float] | None] | None] | None:
    """The per-split blends (train, valid, test), or None when data.path is split."""
    if not (cfg.data.train_path or cfg.data.valid_path):
        return None
    return [
        parse_blend(cfg.data.train_path, "data.train_path") if cfg.data.train_path else None,
        parse_blend(cfg.data.valid_path, "data.valid_path") if cfg.data.valid_path else None,
        None,
    ]


def data_prefixes(cfg: TrainConfig) -> tuple[list[str], list[float] | None]:
    """Every prefix the run reads (with data.path's weights; None for per-split blends or one
    unweighted prefix list)."""
    blends = data_blends(cfg)
    if blends is None:
        return parse_blend(cfg.data.path, "data.path")
    prefixes = [p for b in blends if b is not None for p in b[0]]
    return list(dict.fromkeys(prefixes)), None


_PREPARE = "; prepare it with `slkd prepare-data`"


def check_inputs(cfg: TrainConfig) -> None:
    """The checks of ``cfg``'s inputs that cost a few small reads, so every rank runs them
    before megatron-core is imported and any process group forms: :func:`check_kd_inputs`,
    each prefix's tokenizer record (unless the flags name the tokenizer; building it and
    scanning the data wait for :func:`read_tokenizer`)."""
    from megatron_slkd.data.describe import recorded_meta
    from megatron_slkd.data.indexed import prefix_hint
    from megatron_slkd.ownership import check_output_dir

    check_output_dir(cfg.checkpoint.dir, "training run")
    prefixes = data_prefixes(cfg)[0]
    for p in prefixes:
        if not Path(p + ".idx").is_file():
            raise ConfigError(f"data prefix {p}: no {p}.idx{prefix_hint(p) or _PREPARE}")
    if not cfg.kd.ce_only and not cfg.kd.caches:
        raise ConfigError("no sparse-logit caches: give --kd-caches PREFIX=DIR, or --kd-ce-only")
    check_kd_inputs(prefixes, None if cfg.kd.ce_only else cfg.kd.caches, flag="--kd-caches",
                    otherwise="train with --kd-ce-only",
                    mixed_flag=None if cfg.kd.allow_mixed_teachers
                    else "--kd-allow-mixed-teachers")  # fmt: skip
    _check_meta_prefixes(cfg, prefixes)
    for p in prefixes:
        recorded_meta(p, cfg.data, meta_path=cfg.data.meta.get(p))


def _check_meta_prefixes(cfg: TrainConfig, prefixes: list[str]) -> None:
    unknown = sorted(set(cfg.data.meta) - set(prefixes))
    if unknown:
        raise ConfigError(f"data.meta names prefixes not in data.path: {unknown}")


def check_kd_inputs(prefixes: list[str], caches: dict[str, str] | None, *, flag: str,
                    otherwise: str | None = None,
                    mixed_flag: str | None = None) -> None:  # fmt: skip
    """Refuse, before anything heavy, a data prefix whose files are missing, damaged or
    empty and, unless ``caches`` is None (no KD), one without a cache in ``caches`` (given
    with ``flag``) or whose cache has no readable manifest, and caches of more than one
    teacher run (:func:`check_one_teacher`; ``mixed_flag``: the flag that allows them, None
    when given). Every rank may run it: a few reads per prefix and cache, whatever their
    size (the data's values are checked where it is read). A prefix on object storage
    (Megatron-LM reads those itself) is not looked at here.

    Raises:
        DataFormatError, DataMismatchError: the dataset's files.
        CacheMismatchError: a prefix without a cache; caches of several teacher runs.
        CacheFormatError, ObjectStoreError: a cache directory or manifest missing or
            unreadable.
    """
    from megatron_slkd.cache import Manifest
    from megatron_slkd.data.indexed import check_files
    from megatron_slkd.storage import is_object_url

    for p in prefixes:
        if not is_object_url(p):
            check_files(p)
    if caches is None:
        return
    missing = [p for p in prefixes if p not in caches]
    if missing:
        raise CacheMismatchError(
            f"data prefix(es) {missing} have no sparse-logit cache; give {flag} "
            f"PREFIX=DIR for each (given: {sorted(caches)}), build one with "
            "`slkd build-cache`" + (f", or {otherwise}" if otherwise else "")
        )
    for p in prefixes:
        cache = str(caches[p])
        if not is_object_url(cache) and not Path(cache).is_dir():
            raise CacheFormatError(
                f"{cache}: no such cache directory (the cache of data prefix {p}, given with "
                f"{flag}); build it with `slkd build-cache` and `slkd merge-cache`"
            )
    manifests = {str(caches[p]): Manifest.read(str(caches[p])) for p in prefixes}
    if mixed_flag is not None:
        check_one_teacher(manifests, mixed_flag)


def _teacher_run(manifest) -> dict:
    """What makes two caches' targets those of one teacher: the teacher's identity (its
    checkpoint's content; where it lay and the dtype it ran in do not count) and the
    sampling method and temperature (N and the seed only change the estimate's noise)."""
    teacher = {k: v for k, v in manifest.teacher.items() if k not in ("path", "dtype", "source")}
    if teacher.get("checkpoint_hash") is None and "path" in manifest.teacher:
        teacher["path"] = manifest.teacher["path"]  # a hub name: known by its name only
    s = manifest.sampling
    return {"teacher": teacher, "method": s.get("method"), "temperature": s.get("temperature")}


def check_one_teacher(manifests: dict, flag: str) -> None:
    """Refuse the caches of one blend (cache -> its manifest) when they hold the targets
    of more than one teacher run: another teacher checkpoint, RS beside top-k, another
    temperature. The student would learn a mixture of teachers, which a user rebuilding
    some caches with a new teacher and missing one would never see; ``flag`` asks for it
    on purpose.

    Raises:
        CacheMismatchError: naming two caches and what differs between them.
    """
    from megatron_slkd.cache.writer import differences

    runs = {cache: _teacher_run(m) for cache, m in manifests.items()}
    first, base = next(iter(runs.items()))
    for cache, run in runs.items():
        diff = differences(base, run, form="{name} ({a!r} vs {b!r})")
        if diff:
            groups = len({json.dumps(r, sort_keys=True) for r in runs.values()})
            raise CacheMismatchError(
                f"the caches of this blend hold the targets of {groups} teacher runs: {first} "
                f"and {cache} differ in {'; '.join(diff[:4])}; rebuild the odd ones with the "
                f"same teacher and method, or give {flag} to distill from all of them on purpose"
            )



def check_cache_contents(cfg: TrainConfig, *, rank: int, size: int, all_gather) -> str | None:
    """Show every local cache of the run to hold the targets of its prefix's tokens, once per
    (dataset, cache) pair: the pairs without a verdict have their tokens read by all ``size``
    ranks together, each its share of the shards (:func:`~megatron_slkd.data.verify.
    check_contents`); later starts find the verdict and read no token. Caches on object
    storage are checked where the datasets are built. Every rank calls it.

    Returns:
        A line for the log (None when there is nothing to check).

    Raises:
        CacheMismatchError: a shard's tokens differ from its prefix's (on every rank).
    """
    if cfg.kd.ce_only or not cfg.kd.caches or not cfg.kd.check_tokens:
        return None
    from megatron_slkd.cache import open_cache
    from megatron_slkd.data.verify import check_contents
    from megatron_slkd.storage import is_object_url

    caches = {str(k): str(v) for k, v in cfg.kd.caches.items()}
    pairs = [(p, open_cache(caches[p])) for p in data_prefixes(cfg)[0]
             if not (is_object_url(p) or is_object_url(caches[p]))]  # fmt: skip
    r = check_contents(pairs, rank=rank, size=size, all_gather=all_gather)
    problems = r["problems"]
    if problems:
        raise CacheMismatchError(
            f"{len(problems)} cache shard(s) do not match their data prefix: "
            + "; ".join(problems[:4]) + (" ..." if len(problems) > 4 else "")
        )
    if not r["read"]:
        return f"cache contents: {len(r['known'])} prefix(es) known to match (no token read)"
    return (f"cache contents: {len(r['read'])} prefix(es) shown to match ({r['tokens']:,} tokens "
            f"read by {size} rank(s) in {r['seconds']:.1f} s), {len(r['known'])} known")


def read_tokenizer(cfg: TrainConfig, *, check: bool = True) -> DataTokenizer:
    """The tokenizer shared by every prefix of the blend, after the pre-model checks of each
    prefix (files, token ids against the vocabulary, end-of-document id; with ``check``:
    one rank of a run is enough, the files are the same); refuses a blend of vocabularies."""
    from megatron_slkd.data.describe import check_dataset, resolve_meta

    prefixes, _ = data_prefixes(cfg)
    _check_meta_prefixes(cfg, prefixes)
    metas, records = {}, {}
    for p in prefixes:
        records[p] = resolve_meta(p, cfg.data, meta_path=cfg.data.meta.get(p))
        if check:
            _check_document_ends(cfg, p, records[p]["tokenizer"], check_dataset(p, records[p]))
        metas[p] = records[p]["tokenizer"]
    prints = {m["fingerprint"] for m in metas.values()}
    if len(prints) > 1:
        raise CacheMismatchError(
            f"the blend mixes tokenizers: {sorted(metas)} have {len(prints)} vocabularies"
        )
    tok = DataTokenizer(next(iter(metas.values())), records)
    if cfg.model.vocab_size is not None and cfg.model.vocab_size != tok.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} but the data's tokenizer has "
            f"{tok.vocab_size} ids; drop model.vocab_size or prepare the data with that tokenizer"
        )
    return tok


def _check_document_ends(cfg: TrainConfig, prefix: str, tokenizer: dict, scan: dict) -> None:
    """Refuse the document options on data whose documents do not end with the
    end-of-document id (Megatron-LM's preprocess_data.py without --append-eod): megatron-core
    finds a packed sample's documents by that id, so the attention mask kept nothing apart
    and no loss was masked, with no word, and the student attended across the documents
    the teacher saw one at a time."""
    d = cfg.data
    asked = [f for f, on in (("--data-reset-attention-mask", d.reset_attention_mask),
                             ("--data-eod-mask-loss", d.eod_mask_loss)) if on]  # fmt: skip
    eod = tokenizer.get("eod")
    if asked and eod is not None and scan.get("documents_end_with") != eod:
        raise DataMismatchError(
            f"{prefix}: {' and '.join(asked)} find a packed sample's documents by the "
            f"end-of-document id {eod}, but not every document of {prefix} ends with it "
            "(prepared without --append-eod?), so they would do nothing; prepare the data "
            "with the id appended, or leave them off"
        )


def build_datasets(cfg: TrainConfig, tokenizer: DataTokenizer, train_samples: int,
                   valid_samples: int, *, with_cache: bool):  # fmt: skip
    """(train, valid) datasets; valid is None when the split leaves no validation data.

    Built on the ranks that read data (TP rank 0 of the first and last pipeline
    stages); every cache is checked against its prefix while building.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from megatron_slkd.data.describe import check_blend_splits
    from megatron_slkd.data.kd_dataset import SparseKDGPTDataset, SparseKDGPTDatasetConfig

    prefixes, weights = data_prefixes(cfg)
    blends = data_blends(cfg)
    common = dict(
        random_seed=cfg.data.seed,
        sequence_length=cfg.model.seq_length,
        blend=(prefixes, weights) if blends is None else None,
        blend_per_split=blends,
        split=cfg.data.split if blends is None else None,
        path_to_cache=cfg.data.index_cache or str(Path(cfg.checkpoint.dir) / "index-cache"),
        tokenizer=tokenizer,
        reset_position_ids=False,  # rotary embeddings read no position ids
        reset_attention_mask=cfg.data.reset_attention_mask,
        eod_mask_loss=cfg.data.eod_mask_loss,
        create_attention_mask=True,
        mid_level_dataset_surplus=0.005,
    )
    # megatron-core's GPTDataset never returns on a split of no tokens: refuse it first.
    check_blend_splits(common["blend"], blends, cfg.data.split, cfg.model.seq_length,
                       [train_samples, valid_samples, 0])  # fmt: skip
    if with_cache:
        caches = {str(k): str(v) for k, v in cfg.kd.caches.items()}  # check_inputs: all here
        cls, config = (
            SparseKDGPTDataset,
            SparseKDGPTDatasetConfig(
                **common,
                kd_caches=caches,
                kd_check_tokens=cfg.kd.check_tokens,
                kd_data_meta=tokenizer.records,
                kd_index_keys=tokenizer.index_keys,  # read once, by the tokenizer
                kd_object_cache_dir=cfg.kd.object_cache_dir,
                kd_object_cache_bytes=None
                if cfg.kd.object_cache_gb is None
                else int(cfg.kd.object_cache_gb * 1e9),
            ),
        )
    else:
        cls, config = GPTDataset, GPTDatasetConfig(**common)

    def built_here() -> bool:
        first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        return (first or last) and ps.get_tensor_model_parallel_rank() == 0

    train, valid, _ = BlendedMegatronDatasetBuilder(
        cls, [train_samples, valid_samples, 0], built_here, config
    ).build()
    return train, valid


def first_reordered(old, new, n: int, *, chunk: int = 1 << 20) -> int | None:
    """The first of samples ``0..n-1`` that ``new`` cuts from other tokens than ``old``
    (None when all ``n`` are the same), for two builds of one dataset that asked for
    different numbers of samples: megatron-core shuffles its document and sample indices
    over as many epochs as the count needs, so the order can change from the first sample.

    A sample is the same when it starts and ends at the same offsets of the same
    documents and spans the same documents in between; a blend's, when it comes from the
    same part and is the same sample of it. Compared ``chunk`` samples at a time.
    """
    import numpy as np

    if _same_indices(old, new, n):  # the usual case (the same epochs): no scan
        return None
    for lo in range(0, n, chunk):
        idx = np.arange(lo, min(n, lo + chunk), dtype=np.int64)
        moved = np.flatnonzero(_moved(old, new, idx, idx))
        if moved.size:
            return lo + int(moved[0])
    return None


def _kind(old, new) -> str | None:
    """"blend" (megatron-core's BlendedDataset) or "gpt" where both builds are of that
    kind and shape; None where they cannot be compared sample by sample."""
    if hasattr(old, "dataset_index") != hasattr(new, "dataset_index"):
        return None
    if not hasattr(old, "dataset_index"):
        return "gpt"
    return "blend" if len(old.datasets) == len(new.datasets) else None


def _same_indices(old, new, n: int) -> bool:
    """Whether both builds hold the same index arrays for their first ``n`` samples."""
    import numpy as np

    kind = _kind(old, new)
    if kind is None:
        return False
    if kind == "blend":
        parts = zip(old.datasets, new.datasets, strict=True)
        return (np.array_equal(old.dataset_index[:n], new.dataset_index[:n])
                and np.array_equal(old.dataset_sample_index[:n], new.dataset_sample_index[:n])
                and all(_same_indices(a, b, len(b)) for a, b in parts))  # fmt: skip
    return np.array_equal(old.shuffle_index[:n], new.shuffle_index[:n]) and all(
        np.array_equal(getattr(old, k), getattr(new, k)) for k in ("sample_index", "document_index")
    )


def _moved(old, new, i_old, i_new):
    """Per sample: whether sample ``i_old`` of ``old`` differs from ``i_new`` of ``new``."""
    import numpy as np

    kind = _kind(old, new)
    if kind is None:
        return np.ones(len(i_old), dtype=bool)
    if kind == "blend":
        part = old.dataset_index[i_old]
        moved = part != new.dataset_index[i_new]
        for k in np.unique(part):
            sel = np.flatnonzero((part == k) & ~moved)
            moved[sel] = _moved(old.datasets[k], new.datasets[k],
                                old.dataset_sample_index[i_old[sel]],
                                new.dataset_sample_index[i_new[sel]])  # fmt: skip
        return moved
    (a, first_a), (b, first_b) = _ends(old, i_old), _ends(new, i_new)
    moved = (a != b).any(axis=1)
    same = np.flatnonzero(~moved & (a[:, 4] > 2))  # same ends: the documents in between?
    if same.size:
        n_docs = a[same, 4]
        inner = _documents(old, first_a[same], n_docs) != _documents(new, first_b[same], n_docs)
        moved[same[np.repeat(np.arange(same.size), n_docs)[inner]]] = True
    return moved


def _ends(ds, idx):
    """Per sample of GPTDataset ``ds``: its first document, offset in it, last document,
    offset in it, and the number of documents it spans; and its first document's row of
    the document index."""
    import numpy as np

    j = np.asarray(ds.shuffle_index[idx], dtype=np.int64)
    beg, end = np.asarray(ds.sample_index[j]), np.asarray(ds.sample_index[j + 1])
    doc = ds.document_index
    rows = np.stack([doc[beg[:, 0]], beg[:, 1], doc[end[:, 0]], end[:, 1],
                     end[:, 0] - beg[:, 0] + 1], axis=1).astype(np.int64)  # fmt: skip
    return rows, beg[:, 0]


def _documents(ds, first, n_docs):
    """The documents of GPTDataset ``ds`` from document-index rows ``first``, ``n_docs``
    each, in order."""
    import numpy as np

    starts = np.repeat(first.astype(np.int64) - np.cumsum(n_docs) + n_docs, n_docs)
    return np.asarray(ds.document_index)[starts + np.arange(int(n_docs.sum()))]


def _batches(total: int, consumed: int, micro: int, dp_rank: int, dp: int) -> Iterator[list[int]]:
    step = micro * dp
    i = consumed
    while i + step <= total:
        yield list(range(i + dp_rank * micro, i + (dp_rank + 1) * micro))
        i += step


class _Sampler(torch.utils.data.Sampler):
    def __init__(self, total: int, consumed: int, micro: int, dp_rank: int, dp: int) -> None:
        self.args = (total, consumed, micro, dp_rank, dp)

    def __iter__(self):
        return _batches(*self.args)

    def __len__(self) -> int:
        total, consumed, micro, _, dp = self.args
        return max(total - consumed, 0) // (micro * dp)


def _collate(samples: list[dict], keep_kd: bool) -> dict:
    if not keep_kd:
        samples = [{k: v for k, v in s.items() if not k.startswith("kd_")} for s in samples]
    return collate_kd(samples)


def _is_kd(dataset) -> bool:
    from megatron_slkd.data.kd_dataset import SparseKDGPTDataset

    return isinstance(dataset, SparseKDGPTDataset)


def _kd_datasets(dataset) -> list:
    """The SparseKDGPTDatasets under ``dataset`` (itself, or a blend's parts)."""
    if _is_kd(dataset):
        return [dataset]
    return [d for part in getattr(dataset, "datasets", []) or [] for d in _kd_datasets(part)]


class ReadAhead(torch.utils.data.Dataset):
    """``dataset`` that, asked for the first sample of a micro-batch, starts fetching the
    cache chunks of the next ``batches`` micro-batches the same loader process will be
    asked for: the sampler's order is fixed (:func:`_batches`) and the DataLoader hands
    batch j to worker j mod workers. Only wrapped around caches on object storage."""

    def __init__(self, dataset, *, consumed: int, micro: int, dp_rank: int, dp: int,
                 workers: int, batches: int) -> None:  # fmt: skip
        self.dataset = dataset
        self.args = (consumed, micro, dp_rank, dp, max(workers, 1), batches)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):  # the wrapped dataset's (its split, its config)
        if name in ("dataset", "args"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, idx: int):
        consumed, micro, dp_rank, dp, workers, batches = self.args
        j, m = divmod(idx - consumed - dp_rank * micro, micro * dp)
        if m == 0:  # the first sample of this rank's micro-batch j
            for k in range(1, batches + 1):
                first = consumed + (j + k * workers) * micro * dp + dp_rank * micro
                for i in range(first, min(first + micro, len(self.dataset))):
                    ds, inner = _resolve(self.dataset, i)
                    if _is_kd(ds):
                        ds.kd_prefetch(inner)
        return self.dataset[idx]


def _resolve(dataset, idx: int):
    """(the dataset that builds sample ``idx``, its index there), through blends."""
    while hasattr(dataset, "dataset_index") and hasattr(dataset, "datasets"):
        part = dataset.datasets[dataset.dataset_index[idx]]
        dataset, idx = part, dataset.dataset_sample_index[idx]
    return dataset, int(idx)


def with_read_ahead(dataset, *, consumed: int, micro: int, dp_rank: int, dp: int,
                    workers: int, batches: int):  # fmt: skip
    """``dataset`` wrapped in :class:`ReadAhead` when a cache under it is on object storage
    and ``batches`` > 0; else ``dataset`` itself. ``consumed``: where the sampler starts (any
    multiple of ``micro * dp`` gives the same schedule)."""
    if dataset is None or batches <= 0 or not any(d.kd_cache.remote for d in _kd_datasets(dataset)):
        return dataset
    return ReadAhead(dataset, consumed=consumed, micro=micro, dp_rank=dp_rank, dp=dp,
                     workers=workers, batches=batches)  # fmt: skip


def make_loader(dataset, *, consumed: int, micro: int, dp_rank: int, dp: int,
                num_workers: int, keep_kd: bool = True, readahead: int = 0,
                timeout: float = 0.0):  # fmt: skip
    """Micro-batches of this data-parallel rank from sample ``consumed`` on (None: no data here).

    ``readahead``: micro-batches whose cache chunks each loader process fetches ahead, for
    caches on object storage (:class:`ReadAhead`). ``timeout``: seconds to wait for the
    workers' next micro-batch before torch raises (0: for ever).
    """
    if dataset is None:
        return None
    total = len(dataset)
    dataset = with_read_ahead(dataset, consumed=consumed, micro=micro, dp_rank=dp_rank, dp=dp,
                              workers=num_workers, batches=readahead if keep_kd else 0)  # fmt: skip
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=_Sampler(total, consumed, micro, dp_rank, dp),
        num_workers=num_workers,
        collate_fn=functools.partial(_collate, keep_kd=keep_kd),
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
        timeout=timeout if num_workers else 0,
        worker_init_fn=functools.partial(_worker_signals, exiting=_exiting())
        if num_workers
        else None,
        # The workers' seeds come from here, not from torch's global generator: a run that
        # resumes (and makes its loader after restoring that generator) draws as one that
        # did not stop. The samples are not random: nothing else depends on these seeds.
        generator=torch.Generator().manual_seed(consumed),
    )


_EXITING = None


def _exiting():
    """An event set when this process exits, which its loader workers share.

    multiprocessing's own exit handler stops daemonic children with SIGTERM and then
    waits for them; registered after it, this one runs first (atexit is last in, first
    out), so a worker can tell that SIGTERM from Slurm's preemption.
    """
    global _EXITING
    if _EXITING is None:
        import atexit
        import multiprocessing

        _EXITING = multiprocessing.Event()
        atexit.register(_EXITING.set)
    return _EXITING


def _worker_signals(_worker_id: int, exiting) -> None:
    """Loader workers outlive SIGUSR1 and SIGTERM, Slurm's time-limit warning and its
    preemption, which reach every process of a step: the training process answers them
    by finishing its step, for which it still needs its workers (one killed by SIGTERM
    ended the run at once, with torch's "DataLoader worker ... is killed by signal").
    SIGTERM still ends a worker once its training process is exiting (``exiting``). The
    training process's blocked mask is lifted here: a signal that came before is handled
    the same way."""
    import signal

    def on_term(signum, frame):
        if exiting.is_set():  # multiprocessing's exit handler, stopping its daemonic children
            os._exit(0)

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_term)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM, signal.SIGUSR1))


class TimedIterator:
    """An iterator that adds the time spent waiting in ``next`` to ``wait``; with a
    ``deadline`` (:class:`~megatron_slkd.liveness.Deadline`), each ``next`` runs under it."""

    def __init__(self, iterable, deadline=None) -> None:
        self._it = iter(iterable)
        self.wait = 0.0
        self._deadline = deadline or contextlib.nullcontext()

    def __iter__(self):
        return self

    def __next__(self):
        t = time.perf_counter()
        try:
            with self._deadline:
                return next(self._it)
        except SlkdError as exc:  # e.g. a damaged cache chunk, found on first read
            raise type(exc)(_worker_message(exc)) from None
        finally:
            self.wait += time.perf_counter() - t


def stop_workers(iterator) -> None:
    """Kill the worker processes of a DataLoader ``iterator`` at once, for a run that stops on
    an error: torch's own shutdown waits 5 s for each, then 5 s more after SIGTERM (which
    they outlive, see :func:`_worker_signals`), and for ever for one that hangs. Their
    deaths are unregistered first, so torch's SIGCHLD handler does not report them."""
    workers = getattr(iterator, "_workers", None)
    if not workers:
        return
    try:
        from torch.utils.data._utils import signal_handling

        if getattr(iterator, "_worker_pids_set", False):
            signal_handling._remove_worker_pids(id(iterator))
            iterator._worker_pids_set = False
        for w in workers:
            if w.is_alive():
                w.kill()
        for w in workers:
            w.join(timeout=5)
        iterator._shutdown = True  # nothing left for torch's own shutdown to wait for
    except (AttributeError, KeyError, OSError, RuntimeError, ValueError):
        # Private torch internals changed, or a worker already gone: torch's own shutdown
        # is the fallback.
        pass


RESUME = "checkpoints are kept: run the same command again to resume from the last one"
"""How a training run that stopped goes on, as its one-line errors end."""
HANDOVER_GRACE_S = 10.0
"""How long past ``data.loader_timeout`` a wait for a micro-batch may go before
:func:`handover_deadline` ends the process (torch's own timeout, which raises, comes first
where it can)."""


def handover_deadline(timeout_s: float, watch=None):
    """The :class:`~megatron_slkd.liveness.Deadline` of a wait for a micro-batch from the
    loader's workers (None for ``timeout_s`` 0: wait for ever). torch's ``timeout`` covers
    the wait for a batch to be queued, not its hand-over: a worker stopped or frozen whole
    (SIGSTOP, a frozen cgroup) once its batch is queued blocks the training process in
    passing the batch's shared memory, for ever."""
    from megatron_slkd.liveness import Deadline

    if not timeout_s:
        return None
    waited = timeout_s + HANDOVER_GRACE_S
    reason = (
        f"this process has waited {waited:g} s for a micro-batch from its data loader workers, "
        f"past --data-loader-timeout ({timeout_s:g} s): a worker is stopped or frozen (SIGSTOP, "
        f"a frozen cgroup) while it hands one over, where no timeout reaches; {RESUME}"
    )
    return Deadline(waited, reason, f"slkd train: stopped: {reason}", watch=watch)
_TIMED_OUT = re.compile(r"DataLoader timed out after ([\d.]+) seconds")
_DIED = re.compile(r"DataLoader worker \(pids?(?:\(s\))? ([\d, ]+)\) (.*?)(?:\. |\.?$)", re.M)
_HINTS = {
    "Killed": "the out-of-memory killer, most likely: give the job more host memory or use "
    "fewer --data-num-workers",
    "Bus error": "out of shared memory (/dev/shm), most likely: raise its size (a "
    "container's --shm-size) or use fewer --data-num-workers",
}


def worker_death(exc: BaseException) -> LoaderFailedError | None:
    """A loader worker that died or hangs (not an error it raised), typed; None for
    anything else.

    torch reports it from its SIGCHLD handler, wherever the main thread is (inside the
    backward pass, a collective), or from the loader's next batch; or the batch being
    passed from the dying worker breaks first (its connection reset)."""
    how = pids = None
    if isinstance(exc, RuntimeError) and (late := _TIMED_OUT.search(str(exc))):
        return LoaderFailedError(
            "the data loader workers of this process handed over no micro-batch for "
            f"{float(late.group(1)):g} s (--data-loader-timeout): one hangs (a stalled file "
            f"system, a deadlock); {RESUME}"
        )
    if isinstance(exc, RuntimeError) and (found := _DIED.search(str(exc))):
        pids, how = found.group(1).strip(), found.group(2)
    elif isinstance(exc, (ConnectionError, EOFError)) and _through_multiprocessing(exc):
        how = f"is gone (its connection: {first_line(exc, type(exc).__name__)})"
    if how is None:
        return None
    signal = how.removeprefix("is killed by signal: ") if "by signal" in how else ""
    hint = _HINTS.get(signal, "killed, by the out-of-memory killer most likely, or it "
                      "crashed: its own output above would say why")
    return LoaderFailedError(
        f"a data loader worker of this process{f' (pid {pids})' if pids else ''} "
        f"{how.replace('is killed', 'was killed', 1)} ({hint}); {RESUME}"
    )


def _through_multiprocessing(exc: BaseException) -> bool:
    """Whether ``exc`` was raised passing data between processes."""
    tb = exc.__traceback__
    while tb is not None:
        if f"{os.sep}multiprocessing{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _worker_message(exc: Exception) -> str:
    """The library's own message of an error re-raised by a DataLoader worker (which
    prepends the worker's traceback to it)."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
    return last.split(": ", 1)[1] if ": " in last else last
