"""Tokenize text into a Megatron IndexedDataset (PREFIX.bin/.idx + PREFIX.meta.json).

One document per text file or JSON line, with the end-of-document token
appended. Examples:

    slkd prepare-data --builtin-corpus stdlib-docstrings --train-sentencepiece 8000 \\
        --output-prefix data/stdlib
    slkd prepare-data --input corpus/ --json-key text --hf-tokenizer model.gguf \\
        --output-prefix data/corpus --workers 8
"""

from __future__ import annotations

import argparse

from megatron_slkd.data.prepare import PrepareConfig, prepare_data
from megatron_slkd.ownership import add_lock_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input",
        nargs="+",
        default=[],
        metavar="PATH",
        help="text files, JSONL files (.jsonl/.json/.ndjson) or directories of them; any "
        "may be compressed (.gz, .bz2, .xz, .zst: e.g. corpus.jsonl.zst); a directory is read "
        "recursively in name order, skipping hidden files, Megatron datasets (.bin/.idx "
        "pairs, .meta.json) and the output's own files",
    )
    p.add_argument(
        "--builtin-corpus",
        choices=["stdlib-docstrings"],
        help="use a built-in corpus (Python standard-library docstrings)",
    )
    p.add_argument(
        "--output-prefix",
        required=True,
        help="output path prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.meta.json",
    )
    p.add_argument("--json-key", default="text", help="JSON field holding the text (default: text)")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer-model", help="a SentencePiece .model file")
    tok.add_argument(
        "--train-sentencepiece",
        type=int,
        metavar="VOCAB_SIZE",
        help="train a SentencePiece BPE model of this size on the input (saved as PREFIX.model)",
    )
    tok.add_argument(
        "--hf-tokenizer",
        metavar="NAME_OR_DIR",
        help="a Hugging Face tokenizer: local directory, cached name, or .gguf file",
    )
    p.add_argument(
        "--eod-token",
        help="token appended to each document (default: the tokenizer's EOS; for example "
        "'<|endoftext|>' for SmolLM2, whose GGUF names <|im_start|> as EOS)",
    )
    p.add_argument("--max-documents", type=int, help="stop after this many documents")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_lock_argument(p)


def run(args: argparse.Namespace) -> int:
    from megatron_slkd.cli import emit

    cfg = PrepareConfig(
        output_prefix=args.output_prefix,
        inputs=args.input,
        builtin_corpus=args.builtin_corpus,
        max_documents=args.max_documents,
        json_key=args.json_key,
        tokenizer_model=args.tokenizer_model,
        train_sentencepiece=args.train_sentencepiece,
        hf_tokenizer=args.hf_tokenizer,
        eod_token=args.eod_token,
        workers=args.workers,
        progress=not args.no_progress,
        lock_timeout=args.lock_timeout,
    )
    meta = prepare_data(cfg)

    def human(m):
        t = m["tokenizer"]
        print(
            f"wrote {args.output_prefix}.bin/.idx: {m['num_documents']} documents, "
            f"{m['num_tokens']} tokens ({m['dtype']}) in {m['seconds']} s"
        )
        print(f"tokenizer: {t['kind']} {t['path']} vocab {t['vocab_size']} eod {t['eod']}")
        print(f"fingerprint: {t['fingerprint']}")

    emit({"output_prefix": args.output_prefix, **meta}, args.json, human)
    return 0
