"""Describe a cache: bytes per token and entry, unique ids per position, one position.

    slkd inspect-cache cache/ --plot unique_ids.png
    slkd inspect-cache cache/ --doc 3 --offset 17 --data-prefix data/corpus

The tokenizer recorded in the manifest decodes ids (or name one the Megatron way,
--tokenizer-type T --tokenizer-model M; a bare --tokenizer-model is a SentencePiece
model; --hf-tokenizer a Hugging Face one).
"""

from __future__ import annotations

import argparse

from megatron_slkd.cache.reader import open_cache
from megatron_slkd.cache.stats import cache_stats, plot_histogram, position_view
from megatron_slkd.data.describe import add_tokenizer_arguments, tokenizer_from_args


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: give 1 or more")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("cache", help="the cache directory")
    p.add_argument("--doc", type=int, help="show the stored distribution at this document ...")
    p.add_argument("--offset", type=int, default=0, help="... and this token offset (default 0)")
    p.add_argument("--top", type=_positive, default=10, help="entries to show at a position")
    p.add_argument("--data-prefix", help="dataset prefix, to show context and the actual token")
    p.add_argument("--hf-tokenizer", help="Hugging Face tokenizer to decode ids")
    p.add_argument("--plot", metavar="FILE.png", help="save the unique-ids histogram")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_tokenizer_arguments(p, meta=False, text_check=False)


def _tokenizer(args, manifest):
    from megatron_slkd.data.tokenizers import load_tokenizer
    from megatron_slkd.errors import SlkdError

    if args.tokenizer_model and not args.tokenizer_type:  # a SentencePiece model, as before
        return load_tokenizer({"kind": "sentencepiece", "path": args.tokenizer_model})
    if args.tokenizer_type:
        return tokenizer_from_args(args)
    if args.hf_tokenizer:
        return load_tokenizer({"kind": "huggingface", "path": args.hf_tokenizer})
    try:
        return load_tokenizer(manifest.tokenizer)
    except (SlkdError, KeyError):
        return None


def run(args: argparse.Namespace) -> int:
    from megatron_slkd.cli import emit

    cache = open_cache(args.cache)
    stats = cache_stats(cache)
    if args.plot:
        plot_histogram(stats, args.plot)
        stats["plot"] = args.plot
    if args.doc is not None:
        ds = None
        if args.data_prefix:
            from megatron_slkd.data.indexed import open_dataset

            ds = open_dataset(args.data_prefix)
        tok = _tokenizer(args, cache.manifest)
        try:
            stats["position"] = position_view(
                cache, args.doc, args.offset, tokenizer=tok, ds=ds, top=args.top
            )
        except IndexError as exc:  # the reader names the cache and the valid range
            from megatron_slkd.errors import ConfigError

            raise ConfigError(f"--doc {args.doc} --offset {args.offset}: {exc}") from exc

    def human(s):
        print(
            f"{s['path']}: {s['documents']} documents, {s['tokens']} tokens, "
            f"{s['entries']} entries, {s['bytes']} bytes"
        )
        print(
            f"  {s['bytes_per_token']:.3f} bytes/token ({s['gb_per_billion_tokens']:.2f} GB per "
            f"1B tokens), {s['bytes_per_entry']:.3f} bytes/entry "
            f"({s['entry_bytes']} packed + {s['overhead_bytes_per_token']:.3f} overhead/token)"
        )
        print(f"  unique ids per position: mean {s['unique_ids_per_position_mean']:.2f}")
        hist = s["unique_ids_histogram"]
        peak = max(hist.values(), default=1)
        for k, v in hist.items():
            print(f"  {int(k):4d} {'#' * max(1, round(40 * v / peak))} {v}")
        if "position" in s:
            pv = s["position"]
            print(f"  document {pv['document']} offset {pv['offset']}: {pv['entries']} entries")
            if pv.get("context"):
                print(f"  context: {pv['context']!r}")
            if pv.get("actual_next"):
                print(f"  actual next token: {pv['actual_next']}")
            for e in pv["top"]:
                print(f"    {e['weight']:.3f}  {e['id']:6d}  {e['text']!r}")
        if "plot" in s:
            print(f"  histogram saved to {s['plot']}")

    emit(stats, args.json, human)
    return 0
