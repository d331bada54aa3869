"""Datasets prepared elsewhere: their tokenizer record, and checks made before a model loads.

A Megatron IndexedDataset written by Megatron-LM's ``preprocess_data.py``, by
megatron-core's ``IndexedDatasetBuilder`` or by NeMo is a ``.bin``/``.idx``
pair and nothing else. Every command that reads a data prefix needs its
tokenizer record (fingerprint, vocabulary size, end-of-document id). It comes,
in this order, from

1. the Megatron-style tokenizer flags (``--tokenizer-type``, ``--tokenizer-model``,
   ``--vocab-file``, ``--merge-file``, ``--vocab-size``);
2. ``--data-meta FILE``, a record written by ``slkd describe-data --output``;
3. ``PREFIX.meta.json``, written by ``slkd prepare-data`` or ``slkd describe-data``.

:func:`check_dataset` then runs, before any model loads: both files present
and consistent, the largest token id below the tokenizer's (and the teacher's)
vocabulary (a full scan), and the id the documents end with (when they all end
with one) equal to the tokenizer's end-of-document id. A record written by
``describe-data`` keeps the scan's result keyed by the files' sizes and the
index's CRC, so later commands do not scan again.

Those checks pass for any tokenizer of the same vocabulary size and
end-of-document id (Llama 2's and Mistral's: 32000 ids, EOS 2), and a teacher
run over text it misreads writes a cache that looks like any other. So a
tokenizer named for a dataset (``describe-data``, or the flags of
``build-cache`` and ``verify-cache``) is also checked against the text itself
(:func:`check_text`): sampled documents are decoded and encoded again, and
with the tokenizer the data was made with nearly every one comes back as it
was; with another, nearly none does. ``--no-text-check`` skips it, for data
that is not text (random or synthetic ids).

A *document* of the cache is one sequence of the IndexedDataset, as
megatron-core's ``GPTDataset`` splits and samples them: a sentence-split
dataset (several sequences per document) is read sequence by sequence.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from megatron_slkd import identity
from megatron_slkd.cache.format import file_crc32
from megatron_slkd.data.tokenizers import MEGATRON_TOKENIZER_TYPES, Tokenizer, megatron_tokenizer
from megatron_slkd.errors import DataMismatchError, DataPreparationError
from megatron_slkd.records import dump_record, load_record

__all__ = [
    "add_tokenizer_arguments",
    "tokenizer_from_args",
    "tokenizer_record",
    "scan_dataset",
    "describe_data",
    "resolve_meta",
    "recorded_meta",
    "check_dataset",
    "check_text",
    "text_round_trip",
    "check_splits",
    "check_blend_splits",
]

META_SUFFIX = ".meta.json"
_SCAN_BLOCK = 1 << 26  # tokens per block of the max-id scan
# check_text: documents sampled, tokens read from each, the share of a document's ids a
# round trip must give back for it to count as text, and the share of documents that must.
_TEXT_DOCS, _TEXT_TOKENS, _TEXT_SAME, _TEXT_NEEDED = 32, 256, 0.97, 0.5


def add_tokenizer_arguments(p: argparse.ArgumentParser, *, meta: bool = True,
                            text_check: bool = True) -> None:  # fmt: skip
    """The Megatron-style tokenizer flags (and ``--data-meta``, ``--text-check``) of a command."""
    g = p.add_argument_group(
        "tokenizer of a dataset without a record (one prepared elsewhere; Megatron-LM's flags)"
    )
    g.add_argument("--tokenizer-type", choices=MEGATRON_TOKENIZER_TYPES,
                   help="Megatron tokenizer type the dataset was tokenized with")  # fmt: skip
    g.add_argument("--tokenizer-model", help="HF directory/name/.gguf or SentencePiece .model")
    g.add_argument("--vocab-file", help="GPT2BPETokenizer: vocab.json")
    g.add_argument("--merge-file", help="GPT2BPETokenizer: merges.txt")
    g.add_argument("--vocab-size", type=int, help="NullTokenizer: ids below this; EOD is this id")
    g.add_argument("--legacy-tokenizer", action="store_true",
                   help="SentencePieceTokenizer as Megatron-LM's --legacy-tokenizer built it "
                   "(<CLS> <SEP> <EOD> <MASK> appended, documents end with <EOD>); without it, "
                   "as megatron-core builds it (documents end with the model's EOS)")  # fmt: skip
    if meta:
        g.add_argument("--data-meta", help="the dataset's record written by `slkd "
                       "describe-data --output` (for a read-only data directory)")  # fmt: skip
    if text_check:
        g.add_argument(
            "--text-check", action=argparse.BooleanOptionalAction, default=True,
            help=f"decode {_TEXT_DOCS} sampled documents with the named tokenizer and encode "
            "them again; refuse the tokenizer when most do not come back as they were (the "
            "data was made with another tokenizer of the same size). Default on; "
            "--no-text-check for data that is not text (random or synthetic ids)",
        )  # fmt: skip


def tokenizer_from_args(args) -> Tokenizer | None:
    """The tokenizer the flags name (None when ``--tokenizer-type`` is not given)."""
    kind = getattr(args, "tokenizer_type", None)
    if kind is None:
        for flag in ("tokenizer_model", "vocab_file", "merge_file", "vocab_size"):
            if getattr(args, flag, None) is not None:
                raise DataPreparationError(
                    f"--{flag.replace('_', '-')} needs --tokenizer-type (one of "
                    f"{', '.join(MEGATRON_TOKENIZER_TYPES)})"
                )
        return None
    return megatron_tokenizer(
        kind,
        getattr(args, "tokenizer_model", None),
        vocab_file=getattr(args, "vocab_file", None),
        merge_file=getattr(args, "merge_file", None),
        vocab_size=getattr(args, "vocab_size", None),
        legacy=bool(getattr(args, "legacy_tokenizer", False)),
    )


def tokenizer_record(tok: Tokenizer) -> dict:
    """What a dataset's record (and a cache's manifest) keeps of a tokenizer."""
    return {"fingerprint": tok.fingerprint(), "vocab_size": tok.vocab_size, "eod": tok.eod,
            **tok.spec}  # fmt: skip


def _file_key(prefix: str) -> dict:
    return {"bin_bytes": os.path.getsize(prefix + ".bin"), "idx_crc32": file_crc32(prefix + ".idx")}


def scan_dataset(prefix: str, *, progress: bool = True) -> dict:
    """Read the whole dataset once: counts, the largest token id, the ids documents end with.

    Raises:
        DataFormatError: a file is missing or damaged, or the two disagree (see
            :class:`~megatron_slkd.data.indexed.IndexedData`).
    """
    from tqdm import tqdm

    from megatron_slkd.data.indexed import open_dataset

    ds = open_dataset(prefix)
    lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
    pointers = np.asarray(ds.sequence_pointers, dtype=np.int64)
    itemsize = ds.dtype.itemsize
    end = int(pointers[-1] + lengths[-1] * itemsize) if len(lengths) else 0
    packed = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * itemsize
    data = ds.read(0, ds.bin_bytes // itemsize)
    total = int(lengths.sum())
    contiguous = end == total * itemsize and np.array_equal(pointers, packed)
    top = -1
    with tqdm(total=total, unit="tok", unit_scale=True, desc=f"scanning {Path(prefix).name}",
              disable=not progress or total < 50 * _SCAN_BLOCK) as bar:  # fmt: skip
        if contiguous:
            for a in range(0, total, _SCAN_BLOCK):
                block = data[a : a + _SCAN_BLOCK]
                top = max(top, int(block.max()))
                bar.update(len(block))
        else:
            for d in range(len(lengths)):
                if lengths[d]:
                    top = max(top, int(ds.get(d).max()))
                bar.update(int(lengths[d]))
    docs = np.asarray(ds.document_indices, dtype=np.int64)
    # The last token of each document's last sequence (empty documents are left out).
    last_seq = docs[1:] - 1
    last_seq = last_seq[(last_seq >= 0) & (docs[1:] > docs[:-1])]
    last_seq = last_seq[lengths[last_seq] > 0]
    ends = (
        np.asarray(data[(pointers[last_seq] // itemsize) + lengths[last_seq] - 1])
        if len(last_seq)
        else np.zeros(0, np.int64)
    )
    values = np.unique(ends)
    cum = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])  # tokens before each sequence
    return {
        "num_sequences": int(len(lengths)),
        "num_documents": int(len(docs) - 1),
        "num_tokens": total,
        "dtype": ds.dtype.name,
        "max_token_id": top,
        "documents_end_with": int(values[0]) if len(values) == 1 else None,
        "empty_documents": int((np.diff(cum[docs]) == 0).sum()),
        **_file_key(prefix),
    }


def describe_data(prefix: str, tok: Tokenizer, output: str | None = None, *,
                  progress: bool = True, text_check: bool = True) -> dict:  # fmt: skip
    """Check ``prefix`` against ``tok`` (:func:`check_text` too, unless ``text_check`` is
    False) and write its record (atomically) to ``PREFIX.meta.json`` or ``output``;
    returns the record."""
    from megatron_slkd.records import atomic_write_text

    record = {"tokenizer": tokenizer_record(tok), "prefix": str(prefix)}
    record["scan"] = scan_dataset(prefix, progress=progress)
    record["num_documents"] = record["scan"]["num_sequences"]
    record["num_tokens"] = record["scan"]["num_tokens"]
    _check_scan(prefix, record["tokenizer"], record["scan"])
    record["text_check"] = check_text(prefix, tok) if text_check else {"skipped": True}
    path = Path(output) if output else Path(prefix + META_SUFFIX)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, dump_record(record))
    return {**record, "written": str(path)}


def _read_record(path: Path, prefix: str) -> dict:
    try:
        record = load_record(path, DataMismatchError)
        if not isinstance(record.get("tokenizer"), dict):
            raise ValueError("no tokenizer section")
        for key in ("fingerprint", "vocab_size"):
            if key not in record["tokenizer"]:
                raise ValueError(f"tokenizer.{key} missing")
    except (OSError, ValueError, AttributeError) as exc:
        raise DataMismatchError(f"{path}: unreadable dataset record for {prefix} ({exc})") from exc
    return record


def resolve_meta(prefix: str, args=None, *, meta_path: str | None = None) -> dict:
    """The tokenizer record of ``prefix`` (see the module docstring for the order).

    ``args`` may carry the tokenizer flags and ``data_meta``; ``meta_path`` is
    ``--data-meta`` given directly.

    Raises:
        DataFormatError: the dataset's files are missing or damaged (checked first, by
            :func:`~megatron_slkd.data.indexed.check_files`: a tokenizer may take seconds
            to load, megatron-core's to import).
        DataMismatchError: no record and no flags, an unreadable record, a
            ``--data-meta`` record of another dataset, or a dataset without tokens.
        DataPreparationError: the flags do not name a loadable tokenizer.
    """
    from megatron_slkd.data.indexed import check_files

    check_files(prefix)  # every rank of a run comes here: a few reads, whatever the size
    record = recorded_meta(prefix, args, meta_path=meta_path)
    if record is not None:
        return record
    tok = tokenizer_from_args(args)
    record = {"tokenizer": tokenizer_record(tok), "prefix": str(prefix)}
    if getattr(args, "text_check", False):  # only where the command has --text-check
        record["text_check"] = check_text(prefix, tok)
    return record


def recorded_meta(prefix: str, args=None, *, meta_path: str | None = None) -> dict | None:
    """:func:`resolve_meta` short of building a tokenizer: None when the flags name one
    (``--tokenizer-type``), else the record they leave to ``--data-meta`` or
    ``PREFIX.meta.json``. A few small reads: every rank of a run may check with it before
    anything heavy that a record exists and reads. Does not look at the dataset's files.

    Raises:
        DataMismatchError: no record and no flags, an unreadable record, or a
            ``--data-meta`` record of another dataset.
        DataPreparationError: a tokenizer file flag without ``--tokenizer-type``.
    """
    if args is not None and getattr(args, "tokenizer_type", None) is not None:
        return None
    if args is not None:
        tokenizer_from_args(args)  # refuses --tokenizer-model and the like without a type
    meta_path = meta_path or (getattr(args, "data_meta", None) if args is not None else None)
    if meta_path:
        record = _read_record(Path(meta_path), prefix)
        scan = record.get("scan") or {}
        if (
            scan
            and Path(prefix + ".bin").is_file()
            and scan.get("bin_bytes") != os.path.getsize(prefix + ".bin")
        ):
            raise DataMismatchError(
                f"{meta_path}: describes a dataset of {scan.get('bin_bytes')} bytes, "
                f"{prefix}.bin has {os.path.getsize(prefix + '.bin')}; describe this one with "
                f"`slkd describe-data {prefix} --output FILE`"
            )
        return record
    path = Path(prefix + META_SUFFIX)
    if path.is_file():
        return _read_record(path, prefix)
    raise DataMismatchError(
        f"{prefix}: no tokenizer record ({path.name}); name the tokenizer the dataset was "
        "made with, as for Megatron-LM (--tokenizer-type T --tokenizer-model M), or record it "
        f"once with `slkd describe-data {prefix} --tokenizer-type T --tokenizer-model M`"
    )


def check_dataset(prefix: str, record: dict, *, progress: bool = True) -> dict:
    """Check ``prefix`` against its tokenizer ``record``; returns the dataset's scan.

    Uses the record's ``scan`` when it still matches the files, else scans.

    Raises:
        DataMismatchError: naming the prefix, the two values, and the flag to change.
    """
    scan = record.get("scan")
    if not (scan and _same_files(prefix, scan)):
        scan = _remembered_scan(prefix, progress)
    _check_scan(prefix, record["tokenizer"], scan)
    return scan


def _remembered_scan(prefix: str, progress: bool) -> dict:
    """The scan of the dataset files now at ``prefix``: remembered by their stat
    (:mod:`megatron_slkd.identity`) from an earlier start, else read and remembered, so a
    dataset without a scan in its record (made by Megatron-LM's tools) is read once."""
    try:
        key = identity.dataset_key(prefix)
    except OSError:
        return scan_dataset(prefix, progress=progress)  # the scan names what is missing
    known = identity.recall("scans", key)
    if known is not None:
        return known["value"]
    started = time.time()
    scan = scan_dataset(prefix, progress=progress)
    if all(identity.recordable(k, started) for k in key.values()):
        identity.remember("scans", key, scan)
    return scan


def _same_files(prefix: str, scan: dict) -> bool:
    """Whether ``scan`` was taken of the dataset files now at ``prefix``."""
    try:
        key = _file_key(prefix)
    except FileNotFoundError:
        return False
    return all(scan.get(k) == v for k, v in key.items())


def _check_scan(prefix: str, tok: dict, scan: dict) -> None:
    """The checks of :func:`check_dataset` on a scan of ``prefix``."""
    how = f"{tok.get('kind', '?')} tokenizer {tok.get('path', '')}".rstrip()
    if scan["max_token_id"] >= tok["vocab_size"]:
        raise DataMismatchError(
            f"{prefix}: token id {scan['max_token_id']} in the data, but the {how} has "
            f"{tok['vocab_size']} ids; the dataset was made with another tokenizer: "
            "pass the right --tokenizer-type/--tokenizer-model (or --data-meta)"
        )
    ends = scan.get("documents_end_with")
    eod = tok.get("eod")
    if ends is not None and eod is not None and scan["num_documents"] > 1 and ends != eod:
        raise DataMismatchError(
            f"{prefix}: every document ends with id {ends}, but the {how} says the "
            f"end-of-document id is {eod}; name the tokenizer the data was made with "
            "(--tokenizer-type, e.g. SentencePieceTokenizer appends <EOD>, "
            "GPTSentencePieceTokenizer the EOS piece)"
        )


def _sample_documents(ds, count: int, tokens: int, skip: int) -> list[np.ndarray]:
    """Up to ``count`` documents spread evenly over ``ds``, their first ``tokens`` ids
    without ``skip`` (the end-of-document id); documents shorter than 16 ids are passed."""
    lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
    long_enough = np.flatnonzero(lengths >= 16)
    picks = long_enough[np.linspace(0, len(long_enough) - 1, min(count, len(long_enough)),
                                    dtype=np.int64)] if len(long_enough) else []  # fmt: skip
    out = []
    for d in dict.fromkeys(int(i) for i in picks):
        ids = np.asarray(ds.get(d, 0, int(min(lengths[d], tokens))), dtype=np.int64)
        out.append(ids[ids != skip])
    return out


def text_round_trip(prefix: str, tok: Tokenizer) -> dict:
    """How much of ``prefix`` reads as text under ``tok``.

    Each of up to 32 documents spread over the dataset (its first 256 ids, the
    end-of-document id left out) is decoded and encoded again; it counts as
    given back when at least 97% of its ids come back in order (a cut through a
    multi-byte character changes the last few). NullTokenizer data is not text.

    Returns:
        ``{"documents": n, "given_back": k, "refused": fewer than half came back,
        "misread": text}`` (``text``: the start of the document that came back
        least, or None), or ``{"skipped": reason}`` when nothing can be checked.
    """
    import difflib

    from megatron_slkd.data.indexed import open_dataset

    if tok.spec.get("kind") == "null":
        return {"skipped": "NullTokenizer ids are not text"}
    ds = open_dataset(prefix)
    docs = _sample_documents(ds, _TEXT_DOCS, _TEXT_TOKENS, tok.eod)
    if not docs:
        return {"skipped": "no document of 16 tokens or more"}
    bad = []
    for ids in docs:
        try:
            text = tok.decode(ids.tolist())
            back = tok.encode(text)
        except (ValueError, IndexError, TypeError, RuntimeError, OverflowError):
            text, back = "(ids it cannot decode)", []  # not ids of this tokenizer
        same = difflib.SequenceMatcher(None, ids.tolist(), back, autojunk=False).ratio()
        if same < _TEXT_SAME:
            bad.append((same, text))
    worst = min(bad, key=lambda b: b[0])[1][:80] if bad else None
    k = len(docs) - len(bad)
    return {"documents": len(docs), "given_back": k, "refused": k < _TEXT_NEEDED * len(docs),
            "misread": worst}  # fmt: skip


def check_text(prefix: str, tok: Tokenizer) -> dict:
    """Refuse ``tok`` for ``prefix`` when the data does not read as text under it.

    Data made with ``tok`` gives back nearly every document of
    :func:`text_round_trip`; data made with another tokenizer of the same size
    (whose ids mean other pieces) nearly none.

    Returns:
        ``{"documents": n, "given_back": k}``, or ``{"skipped": reason}``.

    Raises:
        DataMismatchError: fewer than half of the documents come back, naming
            the prefix, the tokenizer, the counts and how one document reads.
    """
    result = text_round_trip(prefix, tok)
    if "skipped" in result:
        return result
    n, k = result["documents"], result["given_back"]
    if result["refused"]:
        how = f"{tok.spec.get('kind', '?')} tokenizer {tok.spec.get('path', '')}".rstrip()
        raise DataMismatchError(
            f"{prefix}: the data does not read as text under the {how}: of {n} sampled "
            f"documents decoded and encoded again, {k} came back as they were (the "
            f"dataset's own tokenizer gives back nearly all); one reads {result['misread']!r}."
            " Most likely the dataset was made with another tokenizer of that size: name "
            "that one (--tokenizer-type/--tokenizer-model), or pass --no-text-check if the "
            "data is not text"
        )
    return {"documents": n, "given_back": k}


def check_splits(prefixes, split: str, seq_length: int, sizes, *, extra_token: bool = True) -> None:
    """Refuse a split that must yield samples but holds too few tokens for one.

    megatron-core's ``GPTDataset`` loops forever on a split of zero tokens
    (``_get_num_epochs``); this check runs before its builder, with the same
    split arithmetic (sequences ``round(a * n) .. round(b * n)``).

    Args:
        prefixes: data prefixes of the blend.
        split: megatron-core's split string (``"98,2,0"``).
        seq_length: tokens per sample.
        sizes: samples asked of the train, validation and test splits (0 or None: none).

    Raises:
        DataMismatchError: naming the prefix, the split, its sequence and token counts.
    """
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    from megatron_slkd.data.indexed import open_dataset

    try:
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    except (ValueError, AssertionError, ZeroDivisionError) as exc:
        raise DataMismatchError(f"split {split!r}: not a megatron-core split ({exc})") from exc
    need = seq_length + int(extra_token)
    for prefix in prefixes:
        ds = open_dataset(prefix)  # kept while its arrays (views of its memory maps) are read
        lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
        n = len(lengths)
        for name, bounds, size in zip(("train", "validation", "test"), matrix, sizes, strict=False):
            if not size or bounds is None:
                continue
            a, b = int(round(bounds[0] * n)), int(round(bounds[1] * n))
            tokens = int(lengths[a:b].sum())
            if tokens < need:
                raise DataMismatchError(
                    f"data prefix {prefix}: the {name} split of {split!r} holds {b - a} of its "
                    f"{n} documents{f' ({a}..{b - 1})' if b > a else ''}, {tokens} tokens, "
                    f"fewer than one sample of "
                    f"{need}; give that split a larger share (--data-split), "
                    + ("turn evaluation off (--eval-batches 0), " if name != "train" else "")
                    + "or use more data"
                )


def check_blend_splits(blend, blend_per_split, split: str | None, seq_length: int, sizes, *,
                       extra_token: bool = True) -> None:  # fmt: skip
    """:func:`check_splits` for megatron-core's two ways of naming data: one ``blend``
    (prefixes, weights) cut by ``split``, or ``blend_per_split`` (train, valid, test
    blends or None), each of whose prefixes serves its split whole."""
    if blend is not None:
        check_splits(blend[0], split, seq_length, sizes, extra_token=extra_token)
    for i, per_split in enumerate(blend_per_split or []):
        if per_split is not None:
            check_splits(per_split[0], "100,0,0", seq_length, [sizes[i], 0, 0],
                         extra_token=extra_token)  # fmt: skip
