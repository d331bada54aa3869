"""The text check of a tokenizer named for a dataset: how well it tells the right one.

    python benchmarks/text_check.py [--documents 400] [--no-save]

`describe-data` (and `build-cache`/`verify-cache` given tokenizer flags) decode
32 documents spread over the data and encode them again; fewer than half coming
back as they were refuses the tokenizer. Measured on the built-in corpus
(docstrings of the Python standard library), datasets written with
megatron-core's `IndexedDatasetBuilder`:

- `smollm2`: SmolLM2's tokenizer on data it made (right), and on the same data
  with the ids under a fixed permutation, <|endoftext|> kept (a tokenizer of
  the same 49152 ids whose ids mean other pieces: wrong);
- `sentencepiece`: two SentencePiece models of 4000 pieces trained on the two
  halves of the corpus, each on data the first made (right, wrong), as Llama
  2's and Mistral's tokenizers (32000 ids, EOS 2 each) would be.

One JSON line per pair: documents sampled, documents given back, seconds.
"""

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import record  # noqa: E402


def _dataset(prefix: str, docs) -> str:
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for d in docs:
        builder.add_document(torch.as_tensor(np.asarray(d, dtype=np.int32)), [len(d)])
    builder.finalize(prefix + ".idx")
    return prefix


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--documents", type=int, default=400, help="documents in each dataset")
    p.add_argument("--no-save", action="store_true", help="print, do not append to results/")
    args = p.parse_args()
    from megatron_slkd.data.corpus import stdlib_docstrings
    from megatron_slkd.data.describe import text_round_trip
    from megatron_slkd.data.tokenizers import (
        HFTokenizer,
        SentencePieceTokenizer,
        train_sentencepiece,
    )
    from megatron_slkd.teacher import smollm2_gguf

    texts = [t for t in stdlib_docstrings() if len(t) > 200]
    random.Random(0).shuffle(texts)
    work = Path(tempfile.mkdtemp(prefix="slkd-text-check-"))
    half = len(texts) // 2
    a = SentencePieceTokenizer(train_sentencepiece(texts[:half], work / "a", 4000))
    b = SentencePieceTokenizer(train_sentencepiece(texts[half:], work / "b", 4000))
    sample = texts[: args.documents]
    pairs = []
    made = _dataset(str(work / "sp"), [a.encode(t) + [a.eod] for t in sample])
    pairs += [("sentencepiece", "right", made, a), ("sentencepiece", "wrong", made, b)]
    if smollm2_gguf() is not None:
        h = HFTokenizer(str(smollm2_gguf()))
        docs = [h.encode(t) for t in sample]
        perm = np.random.default_rng(0).permutation(h.vocab_size)
        perm[perm == h.eod], perm[h.eod] = perm[h.eod], h.eod
        own = _dataset(str(work / "hf"), [[*d, h.eod] for d in docs])
        other = _dataset(str(work / "hf-perm"), [[*perm[d], h.eod] for d in docs])
        pairs += [("smollm2", "right", own, h), ("smollm2", "wrong", other, h)]
    for family, which, prefix, tok in pairs:
        t = time.perf_counter()
        result = text_round_trip(prefix, tok)  # with the verdict check_text acts on
        record("text_check", f"{family}_{which}_tokenizer", not args.no_save,
               documents=result["documents"], given_back=result["given_back"],
               refused=result["refused"], seconds=round(time.perf_counter() - t, 3),
               vocab_size=tok.vocab_size)  # fmt: skip


if __name__ == "__main__":
    main()
