"""Tokenizers: SentencePiece models, Hugging Face tokenizers, GPT-2 BPE files, NullTokenizer.

Every tokenizer has a *fingerprint*: the SHA-256 of its vocabulary (the pieces
in id order). Two tokenizers with the same fingerprint give ids the same
meaning, so the fingerprint is what a teacher, a cache and a dataset compare.
The end-of-document id is a choice of the dataset and is recorded beside it.
A tokenizer is described by a JSON-ready *spec* (kind and path) from which
:func:`load_tokenizer` rebuilds it, for example to decode ids in
``inspect-cache``.

Datasets tokenized elsewhere name their tokenizer the Megatron way
(:func:`megatron_tokenizer`: ``--tokenizer-type`` with ``--tokenizer-model``,
``--vocab-file``/``--merge-file`` or ``--vocab-size``). Where the installed
megatron-core builds that type offline, the tokenizer is megatron-core's own
(``megatron.core.tokenizers``, what Megatron-LM's ``preprocess_data.py`` and
training use by default from core_r0.16.0 on), so its vocabulary size and
end-of-document id are the ones of the Megatron the user runs; the classes
here serve what it does not build (see :func:`megatron_tokenizer`) and rebuild
a tokenizer from its record.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from megatron_slkd.errors import DataPreparationError, quoted

__all__ = [
    "Tokenizer",
    "SentencePieceTokenizer",
    "MegatronSentencePieceTokenizer",
    "HFTokenizer",
    "GPT2BPETokenizer",
    "NullTokenizer",
    "MegatronCoreTokenizer",
    "MEGATRON_TOKENIZER_TYPES",
    "megatron_tokenizer",
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
                from megatron_slkd import gguf

                tok = gguf.load(p, "tokenizer")  # parsed once, then read
            else:
                tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=not p.exists())
        except DataPreparationError:
            raise
        except (OSError, ValueError) as exc:
            raise DataPreparationError(
                f"{name_or_path}: cannot load a Hugging Face tokenizer ({quoted(exc)}); give a "
                "local directory, a GGUF file, or a name already in the Hugging Face cache"
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


class MegatronSentencePieceTokenizer(SentencePieceTokenizer):
    """Megatron-LM's ``SentencePieceTokenizer`` type: the model's pieces, then the special
    tokens it lacks appended in Megatron's order (``<CLS>``, ``<SEP>``, ``<EOD>``,
    ``<MASK>``, then pad, BOS and EOS pieces); documents end with ``<EOD>``."""

    def __init__(self, model_path):
        super().__init__(model_path)
        sp = self._sp
        self._pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        index = {p: i for i, p in enumerate(self._pieces)}

        def special(piece_id: int, fallback: str) -> str:
            return sp.id_to_piece(piece_id) if 0 <= piece_id < len(self._pieces) else fallback

        for t in ("<CLS>", "<SEP>", "<EOD>", "<MASK>", special(sp.pad_id(), "<PAD>"),
                  special(sp.bos_id(), "<BOS>"), special(sp.eos_id(), "<EOS>")):  # fmt: skip
            if t not in index:
                index[t] = len(self._pieces)
                self._pieces.append(t)
        self.vocab_size = len(self._pieces)
        self.eod = index["<EOD>"]
        self.spec = {"kind": "megatron-sentencepiece", "path": str(self.path.resolve())}

    def pieces(self) -> list[str]:
        return list(self._pieces)


class GPT2BPETokenizer(Tokenizer):
    """Megatron-LM's ``GPT2BPETokenizer`` type: ``vocab.json`` and ``merges.txt`` files;
    the vocabulary is the JSON's entries, documents end with ``<|endoftext|>``."""

    def __init__(self, vocab_file, merge_file):
        import json

        self.vocab_path, self.merge_path = Path(vocab_file), Path(merge_file)
        for f in (self.vocab_path, self.merge_path):
            if not f.is_file():
                raise DataPreparationError(f"{f}: GPT2BPETokenizer file not found")
        try:
            encoder = json.loads(self.vocab_path.read_text(encoding="utf-8"))
            from transformers import GPT2TokenizerFast

            self._tok = GPT2TokenizerFast(
                vocab_file=str(self.vocab_path), merges_file=str(self.merge_path)
            )
        except (OSError, ValueError, TypeError) as exc:
            raise DataPreparationError(
                f"{self.vocab_path} / {self.merge_path}: not GPT-2 BPE vocab and merges ({exc})"
            ) from exc
        self._pieces = [""] * len(encoder)
        for piece, i in encoder.items():
            if not 0 <= int(i) < len(encoder):
                raise DataPreparationError(f"{self.vocab_path}: id {i} of {piece!r} out of range")
            self._pieces[int(i)] = piece
        if "<|endoftext|>" not in encoder:
            raise DataPreparationError(f"{self.vocab_path}: no <|endoftext|> token")
        self.vocab_size = len(encoder)
        self.eod = int(encoder["<|endoftext|>"])
        self.spec = {
            "kind": "gpt2bpe",
            "path": str(self.vocab_path.resolve()),
            "merge_file": str(self.merge_path.resolve()),
        }

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def pieces(self) -> list[str]:
        return list(self._pieces)


class NullTokenizer(Tokenizer):
    """Megatron's ``NullTokenizer`` (megatron-core's own): ids ``0..eod-1`` are themselves
    (text is the ids written out) and the end-of-document id ``eod`` is the last of the
    vocabulary, which holds ``eod + 1`` ids.

    What Megatron-LM's ``--vocab-size V`` means changed in megatron-core 0.18.0: before,
    V ids and the end-of-document id V after them (V + 1 in all); from 0.18.0, V ids in
    all, the last (V - 1) the end-of-document id. :meth:`from_vocab_size` reads the flag
    as the installed release does; the record keeps ``eod`` (as ``ids_without_eod``),
    which means the same under both, so a dataset described under one release is read
    the same under the other.
    """

    def __init__(self, ids_without_eod: int):
        from megatron.core.tokenizers.text.libraries.null_tokenizer import (
            NullTokenizer as _CoreNull,
        )

        if int(ids_without_eod) < 1:
            raise DataPreparationError(
                f"NullTokenizer needs at least one id before the end-of-document id, got "
                f"{ids_without_eod}"
            )
        n = int(ids_without_eod)
        self._tok = _CoreNull(n + 1) if _null_size_is_whole() else _CoreNull(n)
        self.vocab_size = int(self._tok.vocab_size)
        self.eod = int(self._tok.eod)
        assert (self.vocab_size, self.eod) == (n + 1, n), (self.vocab_size, self.eod)
        # Not "vocab_size": a tokenizer record has that key for the whole vocabulary (+1).
        self.spec = {"kind": "null", "ids_without_eod": n}

    @classmethod
    def from_vocab_size(cls, vocab_size: int) -> NullTokenizer:
        """The tokenizer Megatron-LM builds for ``--vocab-size`` under the installed
        megatron-core (see the class docstring)."""
        if int(vocab_size) < (2 if _null_size_is_whole() else 1):
            raise DataPreparationError(
                f"NullTokenizer needs a larger --vocab-size, got {vocab_size}"
            )
        return cls(int(vocab_size) - 1 if _null_size_is_whole() else int(vocab_size))

    @staticmethod
    def vocab_size_flag(ids_without_eod: int) -> int:
        """The ``--vocab-size`` that gives ``NullTokenizer(ids_without_eod)`` under the
        installed megatron-core (see the class docstring)."""
        return int(ids_without_eod) + 1 if _null_size_is_whole() else int(ids_without_eod)

    def encode(self, text: str) -> list[int]:
        return self._tok.text_to_ids(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.ids_to_text([int(i) for i in ids])

    def pieces(self) -> list[str]:
        return [str(i) for i in range(self.vocab_size)]


def _null_size_is_whole() -> bool:
    """Whether megatron-core's NullTokenizer takes the whole vocabulary size (0.18.0 on,
    where it also takes ``eod_id``) rather than the ids before the end-of-document id."""
    import inspect

    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer as core

    return "eod_id" in inspect.signature(core.__init__).parameters


MEGATRON_TOKENIZER_TYPES = (
    "HuggingFaceTokenizer",
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "Llama2Tokenizer",
    "GPT2BPETokenizer",
    "NullTokenizer",
)


def megatron_tokenizer(
    tokenizer_type: str,
    tokenizer_model: str | None = None,
    *,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    vocab_size: int | None = None,
    legacy: bool = False,
) -> Tokenizer:
    """The tokenizer Megatron-LM's ``--tokenizer-type`` names, with its arguments.

    HuggingFaceTokenizer (a local directory) and the SentencePiece types are megatron-core's
    own (:class:`MegatronCoreTokenizer`), built with Megatron-LM's default arguments. The
    fallbacks, each for what megatron-core does not build here:

    - ``legacy`` SentencePieceTokenizer: Megatron-LM's ``--legacy-tokenizer``
      (``megatron.training.tokenizer``, core_r0.16.0 and older; core_r0.19.0 has no
      legacy path), which appends ``<CLS> <SEP> <EOD> <MASK>`` and ends documents with
      ``<EOD>`` where megatron-core's ends them with the model's EOS;
    - GPT2BPETokenizer: megatron-core 0.16-0.19 build it through the Hugging Face hub's
      ``gpt2`` (a network fetch); its vocabulary and EOD come from the files here;
    - a Hugging Face name or GGUF file: megatron-core reads directories only;
    - NullTokenizer: megatron-core's own class, read by release (:class:`NullTokenizer`).

    Raises:
        DataPreparationError: an unknown type, or an argument the type needs is missing.
    """

    def need(value, flag):
        if value is None:
            raise DataPreparationError(f"--tokenizer-type {tokenizer_type} needs {flag}")
        return value

    if tokenizer_type == "HuggingFaceTokenizer":
        model = need(tokenizer_model, "--tokenizer-model (directory, name or .gguf)")
        if Path(model).is_dir():
            return MegatronCoreTokenizer(tokenizer_type, model)
        return HFTokenizer(model)
    if tokenizer_type == "SentencePieceTokenizer" and legacy:
        return MegatronSentencePieceTokenizer(need(tokenizer_model, "--tokenizer-model"))
    if tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                          "Llama2Tokenizer"):  # fmt: skip
        return MegatronCoreTokenizer(tokenizer_type, need(tokenizer_model, "--tokenizer-model"))
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(need(vocab_file, "--vocab-file"), need(merge_file, "--merge-file"))
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer.from_vocab_size(need(vocab_size, "--vocab-size"))
    raise DataPreparationError(
        f"--tokenizer-type {tokenizer_type!r} is not supported; choose from "
        f"{', '.join(MEGATRON_TOKENIZER_TYPES)}"
    )


class MegatronCoreTokenizer(Tokenizer):
    """A tokenizer as the installed megatron-core builds it for Megatron-LM's
    ``--tokenizer-type`` (``MegatronTokenizer.from_pretrained`` with Megatron-LM's default
    arguments: no extra special tokens, fast Hugging Face tokenizers, SentencePiece not in
    legacy mode). Its vocabulary, end-of-document id, encode and decode are megatron-core's;
    its spec names the family (``huggingface`` or ``sentencepiece``), whose class gives the
    same pieces, so a record made with it is rebuilt by :func:`load_tokenizer`."""

    _LIBRARY = {
        "HuggingFaceTokenizer": "huggingface",
        "SentencePieceTokenizer": "sentencepiece",
        "GPTSentencePieceTokenizer": "sentencepiece",
        "Llama2Tokenizer": "sentencepiece",
    }
    _OPTIONS = {
        "huggingface": dict(vocab_file=None, merges_file=None, additional_special_tokens=[],
                            use_fast=True, trust_remote_code=False, include_special_tokens=True),
        "sentencepiece": dict(legacy=False, special_tokens=None),
    }  # fmt: skip

    def __init__(self, tokenizer_type: str, model: str):
        from megatron.core.tokenizers import MegatronTokenizer

        library = self._LIBRARY[tokenizer_type]
        path = Path(model)
        if not path.exists():
            raise DataPreparationError(f"{path}: {tokenizer_type} model not found")
        try:
            self._tok = MegatronTokenizer.from_pretrained(
                tokenizer_path=str(path), metadata_path={"library": library},
                **self._OPTIONS[library],
            )  # fmt: skip
            self._pieces = list(self._tok.vocab)
            self.eod = int(self._tok.eod)
            self.vocab_size = int(self._tok.vocab_size)
        except (OSError, ValueError, RuntimeError, TypeError, AttributeError, KeyError) as exc:
            if library == "sentencepiece":
                raise DataPreparationError(
                    f"{path}: not a SentencePiece model ({quoted(exc)})"
                ) from exc
            raise DataPreparationError(
                f"{path}: cannot load a Hugging Face tokenizer ({quoted(exc)}); give a local "
                "directory, a GGUF file, or a name already in the Hugging Face cache"
            ) from exc
        if len(self._pieces) != self.vocab_size:  # ids without a piece: none known so far
            raise DataPreparationError(
                f"{path}: megatron-core's {tokenizer_type} has {self.vocab_size} ids but "
                f"{len(self._pieces)} pieces; name the tokenizer another way"
            )
        self.spec = {"kind": library, "path": str(path.resolve())}

    def encode(self, text: str) -> list[int]:
        return list(self._tok.tokenize(text))

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.detokenize([int(i) for i in ids])

    def pieces(self) -> list[str]:
        return list(self._pieces)


def load_tokenizer(spec: dict) -> Tokenizer:
    """Rebuild a tokenizer from its ``spec`` (as recorded next to a dataset)."""
    kind = spec.get("kind")
    if kind == "sentencepiece":
        tok: Tokenizer = SentencePieceTokenizer(spec["path"])
    elif kind == "megatron-sentencepiece":
        tok = MegatronSentencePieceTokenizer(spec["path"])
    elif kind == "huggingface":
        tok = HFTokenizer(spec["path"])
    elif kind == "gpt2bpe":
        tok = GPT2BPETokenizer(spec["path"], spec["merge_file"])
    elif kind == "null":
        tok = NullTokenizer(spec["ids_without_eod"])
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
