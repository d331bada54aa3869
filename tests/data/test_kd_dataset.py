"""Tier 1: SparseKDGPTDataset rows equal the cache rows found from the raw tokens.

The corpus encodes positions in its tokens: token = base + absolute position
within its prefix. So for any sample megatron-core's builder makes, each label
position's true source position is read straight off the token, and the
expected teacher row is the cache row at that absolute position: an oracle
that shares no index arithmetic with the dataset.
"""

import dataclasses

import numpy as np
import pytest
import torch.distributed as dist
from helpers import write_dataset, write_positional_cache
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from megatron.core.datasets.blended_megatron_dataset_builder import (
    BlendedMegatronDatasetBuilder,
)

from megatron_slkd.cache import open_cache
from megatron_slkd.data.kd_dataset import SparseKDGPTDataset, SparseKDGPTDatasetConfig
from megatron_slkd.errors import CacheMismatchError
from megatron_slkd.testing import free_port

VOCAB = 65536
BASES = {"a": 1, "b": 30001}  # 0 stays free: GPTDataset writes 0 over padding


class _Tokenizer:
    vocab_size = VOCAB
    eod = VOCAB - 1
    pad = VOCAB - 2
    unique_identifiers = {"class": "positional"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    # megatron-core's BlendedDataset asks torch.distributed for the rank.
    if not dist.is_initialized():
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
        )
    root = tmp_path_factory.mktemp("kd")
    rng = np.random.default_rng(0)
    out = {}
    for name, base in BASES.items():
        lengths = rng.integers(1, 120, size=40)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        docs = [base + np.arange(starts[i], starts[i + 1]) for i in range(len(lengths))]
        prefix = write_dataset(root / name, docs)
        cache = write_positional_cache(root / f"{name}-cache", docs, VOCAB)
        out[name] = (prefix, cache)
    return root, out


def _config(root, corpus, seq, seed, split, extra, caches=None):
    return SparseKDGPTDatasetConfig(
        random_seed=seed, sequence_length=seq, blend=([corpus["a"][0], corpus["b"][0]], [0.6, 0.4]),
        split=split, path_to_cache=str(root / "index-cache"), tokenizer=_Tokenizer(),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        add_extra_token_to_sequence=extra, mid_level_dataset_surplus=0.005,
        kd_caches=caches or {corpus[n][0]: str(corpus[n][1]) for n in BASES},
    )  # fmt: skip


def _check_sample(s, caches, seq) -> int:
    """Assert every row of sample ``s`` against the oracle; returns rows with a target."""
    tokens, ids, w = s["tokens"].numpy(), s["kd_ids"].numpy(), s["kd_weights"].numpy()
    assert ids.shape[0] == len(s["labels"]) == seq and ids.shape == w.shape
    checked = 0
    for t in range(seq):
        tok = int(tokens[t])
        if tok == 0:  # padding at the end of the data: no teacher target
            assert not w[t].any() and s["loss_mask"][t] == 0
            continue
        name = "a" if tok < BASES["b"] else "b"
        row = caches[name].read_tokens(tok - BASES[name], 1)
        n = int(row.num_entries[0])
        assert np.array_equal(ids[t, :n], row.ids[0, :n]), t
        assert np.array_equal(w[t, :n], row.weights[0, :n]) and not w[t, n:].any()
        checked += n > 0
    return checked


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seq=st.integers(4, 96),
    seed=st.integers(0, 10_000),
    extra=st.booleans(),
    split=st.sampled_from(["90,5,5", "60,30,10", "100,0,0"]),
    samples=st.integers(5, 150),
)
def test_every_row_equals_the_cache_row_at_its_token_position(corpus, seq, seed, extra, split,
                                                               samples):  # fmt: skip
    root, data = corpus
    caches = {name: open_cache(data[name][1]) for name in BASES}
    cfg = _config(root, data, seq, seed, split, extra)
    sizes = [samples, samples // 4 if split != "100,0,0" else 0, 0]
    datasets = BlendedMegatronDatasetBuilder(SparseKDGPTDataset, sizes, lambda: True, cfg).build()
    checked = 0
    for ds in (d for d in datasets if d is not None):
        for i in range(len(ds)):
            checked += _check_sample(ds[i], caches, seq)
    assert checked > 0


def test_padding_at_the_end_of_the_data(corpus):
    root, data = corpus
    caches = {name: open_cache(data[name][1]) for name in BASES}
    cfg = dataclasses.replace(_config(root, data, 50, 0, "50,50,0", True),
                              drop_last_partial_validation_sequence=False,
                              blend=([data["a"][0]], None))  # fmt: skip
    valid = BlendedMegatronDatasetBuilder(SparseKDGPTDataset, [10, None, 0], lambda: True,
                                          cfg).build()[1]  # fmt: skip
    padded = 0
    for i in range(len(valid)):
        sample = valid[i]
        padded += int((sample["tokens"] == 0).any())
        _check_sample(sample, caches, 50)
    assert padded == 1  # the split's partial last sample, padded by megatron-core


def test_prefix_without_cache_and_misaligned_cache_are_refused(corpus):
    root, data = corpus
    cfg = _config(root, data, 16, 0, "100,0,0", True, caches={data["a"][0]: str(data["a"][1])})
    with pytest.raises(CacheMismatchError, match=r"b has no sparse-logit cache"):
        BlendedMegatronDatasetBuilder(SparseKDGPTDataset, [10, 0, 0], lambda: True, cfg).build()
    swapped = {data["a"][0]: str(data["b"][1]), data["b"][0]: str(data["a"][1])}
    cfg = _config(root, data, 16, 0, "100,0,0", True, caches=swapped)
    with pytest.raises(CacheMismatchError, match=r"does not match data prefix .*tokens in the"):
        BlendedMegatronDatasetBuilder(SparseKDGPTDataset, [10, 0, 0], lambda: True, cfg).build()


def test_a_cache_of_other_tokens_with_the_same_lengths_is_refused_by_default(
    corpus, tmp_path, caplog
):
    # Pre-chunked corpora: every document has one length, so lengths identify nothing.
    root, data = corpus
    src = data["a"][0]
    from megatron_slkd.data import open_dataset

    ds = open_dataset(src)
    docs = [ds.get(d).astype(np.int64) for d in range(len(ds))]
    other = write_dataset(tmp_path / "other", [d[::-1].copy() for d in docs])  # same lengths
    caches = {other: str(data["a"][1])}
    cfg = dataclasses.replace(
        _config(root, data, 16, 0, "100,0,0", True, caches=caches), blend=([other], None),
        path_to_cache=str(tmp_path / "index-cache"),
    )  # fmt: skip
    with pytest.raises(CacheMismatchError, match=r"token identity of documents 0\.\.\d+ differs"):
        BlendedMegatronDatasetBuilder(SparseKDGPTDataset, [10, 0, 0], lambda: True, cfg).build()
    # The explicit opt-out accepts it, and says so in the log.
    with caplog.at_level("WARNING", logger="megatron_slkd"):
        built = BlendedMegatronDatasetBuilder(
            SparseKDGPTDataset, [10, 0, 0], lambda: True,
            dataclasses.replace(cfg, kd_check_tokens=False),
        ).build()  # fmt: skip
    assert built[0] is not None
    assert any("NOT compared" in r.getMessage() for r in caplog.records)


def test_sentence_split_dataset_rows_equal_the_cache_rows(tmp_path):
    # preprocess_data.py --split-sentences: several sequences per document. megatron-core's
    # GPTDataset splits and samples by sequence, and so does the cache (a sequence is a cache
    # "document"): every row must still be the cache row of its token's position.
    if not dist.is_initialized():
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
        )
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(5)
    lengths = rng.integers(1, 60, size=90)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    seqs = [BASES["a"] + np.arange(starts[i], starts[i + 1]) for i in range(len(lengths))]
    prefix = str(tmp_path / "split")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for i, s in enumerate(seqs):
        builder.add_item(torch.from_numpy(s.astype(np.int64)))
        if i % 3 == 2 or i == len(seqs) - 1:  # three sentences per document
            builder.end_document()
    builder.finalize(prefix + ".idx")
    from megatron_slkd.data import open_dataset

    ds = open_dataset(prefix)
    assert len(ds.document_indices) - 1 == 30 and len(ds.sequence_lengths) == 90
    cache_dir = write_positional_cache(tmp_path / "cache", seqs, VOCAB)
    cfg = dataclasses.replace(
        _config(tmp_path, {"a": (prefix, cache_dir), "b": (prefix, cache_dir)}, 24, 3, "80,20,0",
                True, caches={prefix: str(cache_dir)}),
        blend=([prefix], None),
    )  # fmt: skip
    caches = {"a": open_cache(cache_dir)}
    built = BlendedMegatronDatasetBuilder(SparseKDGPTDataset, [40, 10, 0], lambda: True,
                                          cfg).build()  # fmt: skip
    checked = 0
    for d in built[:2]:
        for i in range(len(d)):
            checked += _check_sample(d[i], caches, 24)
    assert checked > 100


def test_a_dataset_rewritten_in_place_gets_sample_indices_of_its_own(corpus, tmp_path):
    # As Megatron-LM's entry builds it: a tokenizer whose identifiers say nothing of the
    # data. megatron-core keys the indices it keeps in path_to_cache by path and settings;
    # the dataset preprocessed again at the same path, with its new cache, used to be read
    # through the first one's indices, samples cut at the old documents' boundaries.
    prefix = str(tmp_path / "a")

    def write(lengths, cache: str) -> None:
        starts = np.concatenate([[0], np.cumsum(lengths)])
        docs = [1 + np.arange(starts[i], starts[i + 1]) for i in range(len(lengths))]
        write_dataset(tmp_path / "a", docs)
        write_positional_cache(tmp_path / cache, docs, VOCAB)

    def built(index_cache: str, cache: str):
        config = dataclasses.replace(
            _config(tmp_path, corpus[1], 32, 1, "100,0,0", False,
                    caches={prefix: str(tmp_path / cache)}),
            blend=([prefix], None), path_to_cache=str(tmp_path / index_cache),
        )  # fmt: skip
        return BlendedMegatronDatasetBuilder(SparseKDGPTDataset, [12, 0, 0], lambda: True,
                                             config).build()[0]  # fmt: skip

    write([50] * 8, "cache")
    first = built("kept", "cache")
    write([130] * 2 + [20] * 7, "new-cache")  # preprocessed again: other documents
    again, fresh = built("kept", "new-cache"), built("new", "new-cache")
    assert not np.array_equal(first.sample_index, fresh.sample_index)
    assert np.array_equal(again.sample_index, fresh.sample_index)
    for i in range(len(fresh)):
        assert np.array_equal(again[i]["tokens"].numpy(), fresh[i]["tokens"].numpy())
