"""Text -> tokenizer -> Megatron IndexedDataset (``PREFIX.bin`` / ``PREFIX.idx``).

One document per text file or per JSON line, the end-of-document token
appended, written with megatron-core's own ``IndexedDatasetBuilder``. A
sidecar ``PREFIX.meta.json`` records the tokenizer (fingerprint, vocabulary
size, how to load it) and the document and token counts; caches built on the
dataset copy the fingerprint and are checked against it.

The outputs appear atomically: they are written under temporary names and
renamed once complete, so a crash never leaves a dataset that looks finished.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib
import io
import json
import lzma
import multiprocessing as mp
import os
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from megatron_slkd.data.corpus import BUILTIN_CORPORA
from megatron_slkd.data.tokenizers import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_sentencepiece,
)
from megatron_slkd.errors import DataPreparationError
from megatron_slkd.ownership import DEFAULT_TIMEOUT_S, claim
from megatron_slkd.records import dump_record, load_record

__all__ = ["PrepareConfig", "prepare_data", "iter_documents", "input_files", "read_meta",
           "META_SUFFIX"]  # fmt: skip

META_SUFFIX = ".meta.json"
_JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
# Compressed inputs (corpora ship as .json.gz, .jsonl.zst, ...): suffix -> module.
_COMPRESSED = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma", ".zst": "zstandard"}
_DECOMPRESSION_ERRORS = (EOFError, OSError, lzma.LZMAError, zlib.error)


@dataclasses.dataclass
class PrepareConfig:
    """Inputs and tokenizer of ``slkd prepare-data``."""

    output_prefix: str
    """Where to write PREFIX.bin, PREFIX.idx and PREFIX.meta.json."""
    inputs: list[str] = dataclasses.field(default_factory=list)
    """Text files, JSONL files, or directories of them (read recursively, sorted; see
    :func:`input_files` for what a directory's listing skips)."""
    builtin_corpus: str | None = None
    """Name of a built-in corpus (``stdlib-docstrings``) used instead of or besides inputs."""
    max_documents: int | None = None
    """Stop after this many documents (all when None)."""
    json_key: str = "text"
    """Field of each JSON line that holds the document text."""
    tokenizer_model: str | None = None
    """A SentencePiece ``.model`` file."""
    train_sentencepiece: int | None = None
    """Train a SentencePiece BPE model of this vocabulary size on the inputs."""
    hf_tokenizer: str | None = None
    """A Hugging Face tokenizer: local directory, cached hub name, or ``.gguf`` file."""
    eod_token: str | None = None
    """Token that ends each document (default: the tokenizer's EOS)."""
    workers: int = 1
    """Tokenizer processes."""
    progress: bool = True
    """Show a progress bar on stderr."""
    lock_timeout: float = DEFAULT_TIMEOUT_S
    """Seconds without heartbeat after which another host's claim on the output prefix is
    taken over (a dead owner on this host is taken over at once)."""


def input_files(cfg: PrepareConfig) -> tuple[list[Path], list[Path]]:
    """The files ``cfg.inputs`` name, in reading order, and those its directories hold but
    that are skipped: the output's own files (``PREFIX.*``, its partial files too) and
    every Megatron IndexedDataset file (``X.bin`` and ``X.idx`` side by side,
    ``X.meta.json`` beside ``X.idx``).

    Listed once, before anything is written: an output prefix inside an input directory
    had its partial ``.bin`` (empty, or being written) read back as one more document,
    and a rerun read the first run's dataset as text.
    """
    out = Path(cfg.output_prefix).resolve()  # compared with inputs spelled any way (.., links)
    files, skipped = [], []
    for item in cfg.inputs:
        p = Path(item)
        if p.is_file():
            files.append(p)
            continue
        if not p.is_dir():
            raise DataPreparationError(f"{p}: input not found")
        for f in sorted(p.rglob("*")):
            if not f.is_file() or f.name.startswith("."):
                continue
            ours = f.name.startswith(out.name + ".") and f.parent.resolve() == out.parent
            (skipped if ours or _dataset_file(f) else files).append(f)
    return files, skipped


def _dataset_file(f: Path) -> bool:
    """Whether ``f`` is part of a Megatron IndexedDataset (never text to tokenize)."""
    name = f.name
    if name.endswith(META_SUFFIX):
        return f.with_name(name[: -len(META_SUFFIX)] + ".idx").is_file()
    pair = {".bin": ".idx", ".idx": ".bin"}.get(f.suffix)
    return pair is not None and f.with_suffix(pair).is_file()


def iter_documents(cfg: PrepareConfig, files: list[Path] | None = None) -> Iterator[str]:
    """Documents in input order: built-in corpus first, then each file or JSON line
    (``files``: :func:`input_files`'s list, made when not given)."""
    if files is None:
        files = input_files(cfg)[0]
    return _documents(cfg, files)


def _documents(cfg: PrepareConfig, files: list[Path]) -> Iterator[str]:
    count = 0

    def done() -> bool:
        return cfg.max_documents is not None and count >= cfg.max_documents

    if cfg.builtin_corpus:
        if cfg.builtin_corpus not in BUILTIN_CORPORA:
            raise DataPreparationError(
                f"unknown built-in corpus {cfg.builtin_corpus!r}; "
                f"choose from {sorted(BUILTIN_CORPORA)}"
            )
        for text in BUILTIN_CORPORA[cfg.builtin_corpus]():
            if done():
                return
            count += 1
            yield text
    for path in files:
        for text in _file_documents(path, cfg.json_key):
            if done():
                return
            count += 1
            yield text


def _open_bytes(path: Path):
    """``path`` opened for reading bytes, decompressed by its last suffix."""
    module = _COMPRESSED.get(path.suffix)
    if module is None:
        return open(path, "rb")
    if module == "zstandard":
        try:
            import zstandard
        except ImportError as exc:
            raise DataPreparationError(
                f"{path}: reading .zst files needs the zstandard package: "
                "pip install 'megatron-slkd[data]' (or zstandard)"
            ) from exc
        return io.BufferedReader(_ZstdReader(path, zstandard), buffer_size=1 << 20)
    return importlib.import_module(module).open(path, "rb")


class _ZstdReader(io.RawIOBase):
    """A ``.zst`` file's frames decompressed in order as one stream (streaming
    compressors write long files as several frames: the Pile's ``.jsonl.zst``). A file
    that ends inside a frame raises ``EOFError``, where zstandard's own stream reader
    ends quietly with the data it has (a corpus cut short would pass for a smaller one);
    damaged data raises ``OSError``, as the standard library's decompressors do."""

    def __init__(self, path: Path, zstandard) -> None:
        super().__init__()
        self._raw = open(path, "rb")
        self._codec = zstandard.ZstdDecompressor()
        self._error = zstandard.ZstdError
        self._frame = None  # the decompressor of the frame being read
        self._fed = b""  # input past the end of the last frame, not decompressed yet
        self._out, self._at = b"", 0

    def readable(self) -> bool:
        return True

    def _decompress(self) -> bytes:
        while True:
            data, self._fed = self._fed or self._raw.read(1 << 20), b""
            if not data:
                if self._frame is not None and not self._frame.eof:
                    raise EOFError("the file ends inside a zstd frame")
                return b""
            if self._frame is None or self._frame.eof:
                self._frame = self._codec.decompressobj()
            try:
                out = self._frame.decompress(data)
            except self._error as exc:
                raise OSError(f"zstd: {exc}") from exc
            if self._frame.eof:
                self._fed = self._frame.unused_data
            if out:
                return out

    def readinto(self, buf) -> int:
        if self._at == len(self._out):
            self._out, self._at = self._decompress(), 0
        n = min(len(buf), len(self._out) - self._at)
        buf[:n] = memoryview(self._out)[self._at : self._at + n]
        self._at += n
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _file_documents(path: Path, json_key: str) -> Iterator[str]:
    """The documents of one input file: each JSON line's ``json_key`` (``.jsonl``,
    ``.json``, ``.ndjson``), else the whole file; either may be compressed (``.gz``,
    ``.bz2``, ``.xz``, ``.zst`` after the format's suffix)."""
    inner = Path(path.stem).suffix if path.suffix in _COMPRESSED else path.suffix
    lineno = 0
    with _open_bytes(path) as f:  # a missing or unreadable file: the OSError as it is
        try:
            if inner not in _JSON_SUFFIXES:
                yield _decoded(f.read(), path)
                return
            for lineno, raw in enumerate(f, 1):
                line = _decoded(raw, f"{path}:{lineno}")
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[json_key]
                except (ValueError, KeyError, TypeError) as exc:
                    raise DataPreparationError(
                        f"{path}:{lineno}: expected a JSON object with a string "
                        f"{json_key!r} field ({type(exc).__name__}: {exc})"
                    ) from exc
                if not isinstance(text, str):
                    raise DataPreparationError(
                        f"{path}:{lineno}: field {json_key!r} is not a string"
                    )
                yield text
        except _DECOMPRESSION_ERRORS as exc:  # damaged or cut short
            where = f"{path}:{lineno + 1}" if lineno else str(path)
            raise DataPreparationError(
                f"{where}: cannot be read ({type(exc).__name__}: {exc}); the file is damaged "
                "or cut short"
            ) from exc


def _decoded(raw: bytes, where) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataPreparationError(f"{where}: not UTF-8 text ({exc})") from exc


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(spec: dict) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(spec)


def _encode(text: str) -> np.ndarray:
    assert _WORKER_TOKENIZER is not None
    ids = _WORKER_TOKENIZER.encode(text)
    ids.append(_WORKER_TOKENIZER.eod)
    return np.asarray(ids, dtype=np.int64)


def _make_tokenizer(cfg: PrepareConfig, files: list[Path]) -> Tokenizer:
    chosen = [
        x for x in (cfg.tokenizer_model, cfg.train_sentencepiece, cfg.hf_tokenizer) if x is not None
    ]
    if len(chosen) != 1:
        raise DataPreparationError(
            "give exactly one of --tokenizer-model, --train-sentencepiece, --hf-tokenizer"
        )
    if cfg.tokenizer_model:
        tok: Tokenizer = SentencePieceTokenizer(cfg.tokenizer_model)
    elif cfg.hf_tokenizer:
        tok = HFTokenizer(cfg.hf_tokenizer)
    else:
        model = train_sentencepiece(iter_documents(cfg, files), cfg.output_prefix,
                                    cfg.train_sentencepiece)  # fmt: skip
        tok = SentencePieceTokenizer(model)
    if cfg.eod_token:
        tok.set_eod(cfg.eod_token)
    return tok


def read_meta(prefix: str) -> dict:
    """The ``PREFIX.meta.json`` sidecar of a prepared dataset."""
    path = Path(prefix + META_SUFFIX)
    try:
        return load_record(path, DataPreparationError)
    except FileNotFoundError as exc:
        raise DataPreparationError(
            f"{path}: no tokenizer record next to the dataset; prepare it with "
            "`slkd prepare-data`, or name its tokenizer (`slkd describe-data`)"
        ) from exc


def prepare_data(cfg: PrepareConfig) -> dict:
    """Build the dataset; returns the sidecar record (also written to disk).

    The output prefix is claimed (``PREFIX.owner``, see :mod:`megatron_slkd.ownership`):
    two runs on one prefix renamed their files over each other's, and could leave the
    ``.bin`` of one beside the ``.idx`` of the other. Under the claim, the partial files
    of killed runs are removed.
    """
    if not cfg.inputs and not cfg.builtin_corpus:
        raise DataPreparationError("no input: give --input paths or --builtin-corpus")
    prefix = cfg.output_prefix
    files, skipped = input_files(cfg)
    if skipped:
        shown = ", ".join(str(f) for f in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        print(f"prepare-data: skipping {len(skipped)} file(s) of Megatron datasets in the "
              f"input directories ({shown})", file=sys.stderr)  # fmt: skip
    with claim(Path(prefix), what="dataset", timeout_s=cfg.lock_timeout):
        _remove_partial_files(prefix, "*")  # of killed runs: the claim says none is live
        return _prepare(cfg, files)


def _remove_partial_files(prefix: str, pid: str) -> None:
    """The partial files of the run with ``pid`` (``*``: of any run) on ``prefix``:
    ``PREFIX.partial-PID.bin/.idx``, and ``.PREFIX.partial-PID.bin.tmp``, where
    multi-storage-client (megatron-core's builder writes through it when it is installed)
    keeps a file until it is closed."""
    out = Path(prefix)
    pattern = f"{glob.escape(out.name)}.partial-{pid}.*"
    for left in [*out.parent.glob(pattern), *out.parent.glob("." + pattern)]:
        left.unlink(missing_ok=True)


def _prepare(cfg: PrepareConfig, files: list[Path]) -> dict:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tqdm import tqdm

    prefix = cfg.output_prefix
    start = time.time()
    tokenizer = _make_tokenizer(cfg, files)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    tmp = f"{prefix}.partial-{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    num_docs = num_tokens = 0
    bar = tqdm(desc="tokenizing", unit="doc", disable=not cfg.progress)
    pool = None
    try:
        if cfg.workers > 1:
            ctx = mp.get_context("spawn")
            pool = ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(tokenizer.spec,))
            encoded = pool.imap(_encode, iter_documents(cfg, files), chunksize=8)
        else:
            global _WORKER_TOKENIZER
            _WORKER_TOKENIZER = tokenizer
            encoded = map(_encode, iter_documents(cfg, files))
        import torch

        for ids in encoded:
            builder.add_item(torch.from_numpy(ids))
            builder.end_document()
            num_docs += 1
            num_tokens += len(ids)
            bar.update(1)
            bar.set_postfix(tokens=num_tokens, refresh=False)
        builder.finalize(tmp + ".idx")
        if num_docs == 0:  # removed with the partial files, like any other failure
            raise DataPreparationError("the inputs hold no documents")
    except BaseException:
        # Closed first: with multi-storage-client installed, megatron-core's builder writes
        # through msc.open, whose file would be written out again when collected.
        try:
            builder.data_file.close()
        except OSError:
            pass  # out of space again: the error being raised says so; the files go anyway
        _remove_partial_files(prefix, str(os.getpid()))
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    meta = {
        "tokenizer": {
            "fingerprint": tokenizer.fingerprint(),
            "vocab_size": tokenizer.vocab_size,
            "eod": tokenizer.eod,
            **tokenizer.spec,
        },
        "num_documents": num_docs,
        "num_tokens": num_tokens,
        "dtype": np.dtype(dtype).name,
    }
    # The old record goes first: a crash between the renames and the new record leaves a
    # dataset without one (refused, "no tokenizer record"), never the old tokenizer's.
    Path(prefix + META_SUFFIX).unlink(missing_ok=True)
    os.replace(tmp + ".bin", prefix + ".bin")
    os.replace(tmp + ".idx", prefix + ".idx")
    from megatron_slkd.data.describe import scan_dataset
    from megatron_slkd.records import atomic_write_text

    meta["scan"] = scan_dataset(prefix, progress=False)  # later checks need not read it again
    atomic_write_text(Path(prefix + META_SUFFIX), dump_record(meta))
    meta["seconds"] = round(time.time() - start, 2)
    return meta
