"""Record the tokenizer of a dataset prepared elsewhere, after checking it fits the data.

A Megatron IndexedDataset written by Megatron-LM's preprocess_data.py (or by
megatron-core's IndexedDatasetBuilder, or NeMo) has no record of its
tokenizer. Name it once, with Megatron-LM's flags; the record goes next to the
dataset (PREFIX.meta.json, written atomically), or with --output elsewhere
(then give that file to every command as --data-meta):

    slkd describe-data data/corpus_text_document --tokenizer-type HuggingFaceTokenizer \\
        --tokenizer-model HuggingFaceTB/SmolLM2-135M
    slkd describe-data /ro/data/corpus_text_document --tokenizer-type GPT2BPETokenizer \\
        --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt --output meta/corpus.json

The data is read once: the largest token id must be below the tokenizer's
vocabulary, and the id every document ends with (when they all end with one)
must be the tokenizer's end-of-document id. Then 32 sampled documents are
decoded and encoded again: most must come back as they were, or the data was
made with another tokenizer of the same size (--no-text-check skips this, for
data that is not text). A mismatch ends with exit status 2.
"""

from __future__ import annotations

import argparse

from megatron_slkd.data.describe import add_tokenizer_arguments, describe_data, tokenizer_from_args
from megatron_slkd.data.indexed import open_dataset
from megatron_slkd.errors import DataPreparationError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_prefix", help="IndexedDataset prefix (PREFIX.bin / PREFIX.idx)")
    add_tokenizer_arguments(p, meta=False)
    p.add_argument("--output", help="write the record here instead of PREFIX.meta.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run(args: argparse.Namespace) -> int:
    from megatron_slkd.cli import emit

    open_dataset(args.data_prefix)  # damaged files are named before a tokenizer loads
    tok = tokenizer_from_args(args)
    if tok is None:
        raise DataPreparationError("describe-data needs --tokenizer-type (and its files)")
    record = describe_data(args.data_prefix, tok, args.output, progress=not args.no_progress,
                           text_check=args.text_check)

    def human(r):
        s, t = r["scan"], r["tokenizer"]
        ends, empty = s["documents_end_with"], s.get("empty_documents", 0)
        every = "every document with tokens" if empty else "every document"
        print(
            f"{args.data_prefix}: {s['num_documents']} documents in {s['num_sequences']} "
            f"sequences, {s['num_tokens']} tokens ({s['dtype']}); largest id "
            f"{s['max_token_id']} < {t['vocab_size']}; "
            + (f"{every} ends with {ends} (EOD)" if ends is not None else "no common EOD")
            + (f"; {empty} documents are empty (nothing to train on)" if empty else "")
        )
        c = r["text_check"]
        print(f"text check: skipped ({c['skipped'] if c['skipped'] is not True else 'asked'})"
              if "skipped" in c else f"text check: {c['given_back']} of {c['documents']} "
              "sampled documents decoded and encoded again came back as they were")  # fmt: skip
        print(f"tokenizer {t['kind']} {t.get('path', '')} recorded in {r['written']}")

    emit(record, args.json, human)
    return 0
