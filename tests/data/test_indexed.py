"""The offline tools' IndexedDataset reader: the same arrays and tokens as megatron-core's
own reader on data written by megatron-core's builder, and every damaged pair of files
refused by name, when opened, by every command that reads data."""

import os
import shutil
import struct

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_slkd.data.indexed import check_files, iter_token_blocks, open_dataset
from megatron_slkd.errors import DataFormatError, DataMismatchError
from tests.helpers import slkd, write_positional_cache


def _write(prefix: str, docs, dtype=np.int32) -> str:
    """``docs`` (lists of sequences) as preprocess_data.py writes them; a document of
    several sequences is a sentence-split one, and empty sequences are kept."""
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(torch.as_tensor(np.concatenate(doc).astype(np.int64)),
                             [len(s) for s in doc])  # fmt: skip
    builder.finalize(prefix + ".idx")
    return prefix


def _docs(seed: int, n: int, high: int) -> list:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        parts = int(rng.integers(1, 4))
        docs.append([rng.integers(0, high, int(rng.integers(0, 40))) for _ in range(parts)])
    docs[0][0] = np.zeros(0, np.int64)  # an empty first sequence
    return docs


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.int64])
def test_reads_what_megatron_core_reads(tmp_path, dtype):
    high = min(np.iinfo(dtype).max, 70_000)
    a = _write(str(tmp_path / "a"), _docs(0, 40, high), dtype)
    b = _write(str(tmp_path / "b"), _docs(1, 25, high), dtype)
    # Megatron-LM's merge_datasets.py: one builder, the indices of both added.
    merged = IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=dtype)
    for prefix in (a, b):
        merged.add_index(prefix)
    merged.finalize(str(tmp_path / "m.idx"))
    for prefix in (a, b, str(tmp_path / "m")):
        theirs, mine = IndexedDataset(prefix), open_dataset(prefix)
        assert mine.dtype == np.dtype(dtype) and len(mine) == len(theirs)
        for name in ("sequence_lengths", "document_indices"):
            assert np.array_equal(getattr(mine, name), getattr(theirs, name)), name
        assert np.array_equal(mine.sequence_pointers, theirs.index.sequence_pointers)
        for i in range(len(theirs)):
            assert np.array_equal(mine.get(i), theirs.get(i))
            n = int(theirs.sequence_lengths[i])
            if n > 3:
                assert np.array_equal(mine.get(i, 2, n - 3), theirs.get(i, 2, n - 3))
        whole = np.concatenate([theirs.get(i) for i in range(len(theirs))])
        blocks = np.concatenate(list(iter_token_blocks(mine, 0, len(mine), block_tokens=50)))
        assert np.array_equal(blocks, whole)


def _put(path: str, at: int, fmt: str, value) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(struct.pack(fmt, value))


# (damage, what the one-line error must say). Header: magic 0-8, version 9-16, dtype
# code 17, sequence count 18-25, document count 26-33; the lengths start at 34.
DAMAGE = {
    "idx cut short": r"d\.idx: \d+ bytes, but its header announces 30 sequences .* truncated",
    "bin cut short": r"points \d+ bytes into .*d\.bin, which has 1000 \(sequence \d+ of 30\)",
    "idx of another bin": r"points \d+ bytes into .*d\.bin, which has \d+ .*another \.bin",
    "not an index": r"d\.idx: not a megatron-core index \(starts with b'TNTIDX",
    "version 2": r"d\.idx: index version 2, this reader knows version 1",
    "float tokens": r"d\.idx: dtype code 7 \(float32\): token ids need an integer dtype",
    "negative length": r"d\.idx: sequence 3 has length -5: the index is damaged",
    "documents out of order": r"d\.idx: its document index is not an ordered list",
    "idx missing": r"d\.idx: dataset file not found",
}


def _damaged(tmp_path, damage: str) -> str:
    prefix = _write(str(tmp_path / "d"), [[np.arange(1, 60) % 50] for _ in range(30)])
    idx, binary = prefix + ".idx", prefix + ".bin"
    if damage == "idx cut short":
        os.truncate(idx, os.path.getsize(idx) - 9)
    elif damage == "bin cut short":
        os.truncate(binary, 1000)
    elif damage == "idx of another bin":
        small = _write(str(tmp_path / "s"), [[np.arange(1, 5)]])
        shutil.copy(small + ".bin", binary)
    elif damage == "not an index":
        _put(idx, 0, "9s", b"TNTIDX\x00\x00\x00")  # the old, non-mmap Megatron-LM format
    elif damage == "version 2":
        _put(idx, 9, "<Q", 2)
    elif damage == "float tokens":
        _put(idx, 17, "<B", 7)
    elif damage == "negative length":
        _put(idx, 34 + 4 * 3, "<i", -5)
    elif damage == "documents out of order":
        _put(idx, 34 + 12 * 30 + 8 * 5, "<q", 29)
    elif damage == "idx missing":
        os.remove(idx)
    return prefix


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_files_are_refused_when_opened(tmp_path, damage):
    prefix = _damaged(tmp_path, damage)
    with pytest.raises(DataFormatError, match=DAMAGE[damage]):
        open_dataset(prefix)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_the_checks_every_rank_runs_find_the_damage_a_copy_leaves(tmp_path, damage):
    # check_files reads a header and one sequence's entries: the values of the index
    # (negative lengths, documents out of order) wait for open_dataset.
    prefix = _damaged(tmp_path, damage)
    if damage in ("negative length", "documents out of order"):
        check_files(prefix)
        return
    with pytest.raises(DataFormatError, match=DAMAGE[damage]):
        check_files(prefix)


def test_an_empty_data_file_is_no_dataset(tmp_path):
    prefix = _write(str(tmp_path / "e"), [[np.zeros(0, np.int64)]])
    for check in (open_dataset, check_files):
        with pytest.raises(DataMismatchError, match=r"e\.bin is empty: the dataset holds no"):
            check(prefix)


def test_a_prefix_given_as_a_file_or_a_directory_names_the_prefix_meant(tmp_path):
    # Megatron names a dataset by its path without .bin/.idx; a user gives one of the
    # files, or the directory holding them.
    data = tmp_path / "data"
    data.mkdir()
    prefix = _write(str(data / "corpus_text_document"), [[np.arange(5)]])
    for given in (prefix + ".bin", prefix + ".idx"):
        with pytest.raises(DataFormatError, match=rf"data prefix is the path without "
                                                  rf"\.bin/\.idx: {prefix}$"):  # fmt: skip
            check_files(given)
    with pytest.raises(DataFormatError, match=rf"is a directory; .* in it without \.bin/\.idx: "
                                              rf"{prefix}$"):  # fmt: skip
        check_files(str(data))
    with pytest.raises(DataFormatError, match=r"nothing\.bin: dataset file not found$"):
        check_files(str(tmp_path / "nothing"))
    r = slkd("train", "--data-path", prefix + ".bin", "--kd-ce-only", "--checkpoint-dir",
             tmp_path / "run", check=False)  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip().endswith(f"without .bin/.idx: {prefix}"), r.stderr


@pytest.mark.parametrize("damage", ["idx cut short", "bin cut short"])
def test_every_command_that_reads_data_refuses_damaged_files_first(tmp_path, damage):
    """One typed line, exit status 2, before a teacher or a tokenizer is looked for: the
    ones named do not exist, so any later check would report them instead."""
    prefix = _damaged(tmp_path, damage)
    docs = [np.arange(1, 60) % 50] * 30
    cache = write_positional_cache(tmp_path / "cache", docs, vocab=64)
    null = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tmp_path / "no-tok"]
    commands = {
        "build-cache": ["build-cache", "--data-prefix", prefix, "--teacher", tmp_path / "none",
                        "--output", tmp_path / "out", *null],  # fmt: skip
        "build-cache --dry-run": ["build-cache", "--data-prefix", prefix, "--teacher",
                                  tmp_path / "none", "--output", tmp_path / "out",
                                  "--dry-run"],  # fmt: skip
        "verify-cache": ["verify-cache", cache, "--data-prefix", prefix, *null],
        "inspect-cache": ["inspect-cache", cache, "--data-prefix", prefix, "--doc", "0"],
        "remap-cache": ["remap-cache", cache, "--data-prefix", prefix, "--output",
                        tmp_path / "remapped", "--no-mpi"],  # fmt: skip
        "describe-data": ["describe-data", prefix, *null, "--no-text-check"],
        "train": ["train", "--data-path", prefix, "--kd-ce-only", "--data-tokenizer-type",
                  "HuggingFaceTokenizer", "--data-tokenizer-model", tmp_path / "no-tok",
                  "--checkpoint-dir", tmp_path / "run"],  # fmt: skip
    }
    for name, argv in commands.items():
        r = slkd(*argv, check=False)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, (name, r.stdout, r.stderr)
        assert __import__("re").search(DAMAGE[damage], lines[0]), (name, lines[0])


def _layout(prefix: str, lengths, seed: int = 0) -> str:
    """One document of sequences of ``lengths`` (random tokens), in one builder call: an
    index of 400,000 sequences is written in a fraction of a second."""
    tokens = np.random.default_rng(seed).integers(0, 500, int(np.sum(lengths)))
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    builder.add_document(torch.from_numpy(tokens), [int(n) for n in lengths])
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.mark.parametrize("sequences", [1000, 400_000])  # read whole; sampled (over 4 MiB)
def test_index_key_follows_the_document_layout_not_the_path_or_the_tokens(tmp_path, sequences):
    from megatron_slkd.data.indexed import index_key

    lengths = np.random.default_rng(1).integers(1, 8, sequences)
    key = index_key(_layout(str(tmp_path / "a"), lengths))
    assert os.path.getsize(tmp_path / "a.idx") > (4 << 20) or sequences < 10_000
    assert index_key(_layout(str(tmp_path / "copy"), lengths)) == key  # another place
    assert index_key(_layout(str(tmp_path / "b"), lengths, seed=2)) == key  # other tokens
    moved = lengths.copy()
    moved[sequences // 3] += 1  # a token moves between two sequences: same total size
    moved[-1] -= 1 if moved[-1] > 1 else -1
    assert index_key(_layout(str(tmp_path / "c"), moved)) != key


def test_a_dataset_rewritten_in_place_gets_sample_indices_of_its_own(tmp_path):
    # megatron-core keys the indices it keeps in path_to_cache by path and settings: the
    # second build used to read the first dataset's indices, cutting samples of the new
    # documents at the old ones' boundaries, with no error.
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from megatron_slkd.training.data import DataTokenizer

    prefix = str(tmp_path / "data")

    def samples(index_cache: str) -> GPTDataset:
        meta = {"vocab_size": 500, "eod": 0, "fingerprint": "t"}
        config = GPTDatasetConfig(
            random_seed=1, sequence_length=16, blend=([prefix], None), split="100,0,0",
            path_to_cache=str(tmp_path / index_cache), reset_position_ids=False,
            tokenizer=DataTokenizer(meta, {prefix: {"tokenizer": meta}}),
            reset_attention_mask=False, eod_mask_loss=False, mid_level_dataset_surplus=0.005,
        )  # fmt: skip
        return BlendedMegatronDatasetBuilder(GPTDataset, [20, 0, 0], lambda: True,
                                             config).build()[0]  # fmt: skip

    def write(seed: int, lengths) -> None:
        rng = np.random.default_rng(seed)
        _write(prefix, [[np.append(rng.integers(1, 500, n - 1), 0)] for n in lengths])

    write(0, [40] * 10)
    first = samples("kept")
    write(1, [90] * 6 + [25] * 4)  # preprocessed again, at the same path
    again, fresh = samples("kept"), samples("new")
    assert not np.array_equal(first.sample_index, fresh.sample_index)
    assert np.array_equal(again.sample_index, fresh.sample_index)
    assert all(torch.equal(again[i]["tokens"], fresh[i]["tokens"]) for i in range(len(fresh)))
