"""Tokenizers for ``prepare-data``: SentencePiece models and Hugging Face tokenizers.

Every tokenizer has a *fingerprint*: the SHA-256 of its vocabulary (the pieces
in id order). Two tokenizers with the same fingerprint give ids the same
meaning, so the fingerprint is what a teacher, a cache and a dataset compare.
The end-of-document id is a choice of the dataset and is recorded beside it.
A tokenizer is described by a JSON-ready *spec* (kind and path) from which
:func:`load_tokenizer` rebuilds it, for example to decode ids in
``inspect-cache``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from megatron_slkd.errors import DataPreparationError

__all__ = [
    "Tokenizer",
    "SentencePieceTokenizer",
    "HFTokenizer",
    "load_tokenizer",
    "train_sentencepiece",
]


class Tokenizer:
    """Common interface: ``encode``, ``decode``, ``vocab_size``, ``eod``, ``spec``."""

    spec: dict
    vocab_size: int
    eod: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def pieces(self) -> list[str]:
        """The vocabulary in id order."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for piece in self.pieces():
            h.update(piece.encode("utf-8", "surrogatepass") + b"\0")
        return "sha256:" + h.hexdigest()

    def set_eod(self, token: str) -> None:
        """Mark documents' ends with ``token`` instead of the tokenizer's EOS."""
        pieces = self.pieces()
        if token not in pieces:
            raise DataPreparationError(f"end-of-document token {token!r} is not in the vocabulary")
        self.eod = pieces.index(token)
        self.spec = {**self.spec, "eod_token": token}


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file; the end-of-document id is the model's EOS."""

    def __init__(self, model_path):
        import sentencepiece as spm

        self.path = Path(model_path)
        if not self.path.is_file():
            raise DataPreparationError(f"{self.path}: SentencePiece model not found")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as exc:
            raise DataPreparationError(f"{self.path}: not a SentencePiece model: {exc}") from exc
        self.vocab_size = int(self._sp.get_piece_size())
        self.eod = int(self._sp.eos_id())
        if self.eod < 0:
            raise DataPreparationError(
                f"{self.path}: the model has no EOS piece to mark document ends; "
                "train it with an eos_id"
            )
        self.spec = {"kind": "sentencepiece", "path": str(self.path.resolve())}

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def pieces(self) -> list[str]:
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer: a local directory, a cached hub name, or a GGUF file."""

    def __init__(self, name_or_path: str):
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise DataPreparationError(
                "--hf-tokenizer needs the hf extra: pip install 'megatron-slkd[hf]'"
            ) from exc
        p = Path(name_or_path)
        try:
            if p.suffix == ".gguf":
                if not p.is_file():
                    raise DataPreparationError(f"{p}: GGUF file not found")
                tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
            else:
                tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=not p.exists())
        except DataPreparationError:
            raise
        except (OSError, ValueError) as exc:
            raise DataPreparationError(
                f"{name_or_path}: cannot load a Hugging Face tokenizer ({exc}); give a local "
                "directory, a GGUF file, or a name already in the Hugging Face cache"
            ) from exc
        self._tok = tok
        self.vocab_size = len(tok)
        eod = tok.eos_token_id
        if eod is None:
            raise DataPreparationError(f"{name_or_path}: the tokenizer has no EOS token")
        self.eod = int(eod)
        spec_path = str(p.resolve()) if p.exists() else name_or_path
        self.spec = {"kind": "huggingface", "path": spec_path}

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def pieces(self) -> list[str]:
        inv = {i: t for t, i in self._tok.get_vocab().items()}
        return [inv.get(i, "") for i in range(self.vocab_size)]


def load_tokenizer(spec: dict) -> Tokenizer:
    """Rebuild a tokenizer from its ``spec`` (as recorded next to a dataset)."""
    kind = spec.get("kind")
    if kind == "sentencepiece":
        tok: Tokenizer = SentencePieceTokenizer(spec["path"])
    elif kind == "huggingface":
        tok = HFTokenizer(spec["path"])
    else:
        raise DataPreparationError(f"unknown tokenizer kind {kind!r} in {spec}")
    if spec.get("eod_token"):
        tok.set_eod(spec["eod_token"])
    return tok


def train_sentencepiece(texts: Iterable[str], model_prefix, vocab_size: int) -> Path:
    """Train a BPE SentencePiece model on ``texts``; returns the ``.model`` path."""
    import sentencepiece as spm

    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=(t for t in texts if t.strip()),
            model_prefix=str(model_prefix),
            vocab_size=vocab_size,
            model_type="bpe",
            character_coverage=1.0,
            byte_fallback=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=2,
            max_sentence_length=1 << 16,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise DataPreparationError(
            f"SentencePiece training with vocab size {vocab_size} failed: {exc}"
        ) from exc
    return model_prefix.with_suffix(".model")
