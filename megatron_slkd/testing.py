"""Helpers for tests and benchmarks: gloo process groups on CPU, a tiny teacher.

``run_distributed(fn, world_size, *args, tp=1, pp=1)`` starts ``world_size``
processes, initializes a gloo process group on a free local port (retrying
when another process grabs the port first), optionally initializes
megatron-core ``parallel_state`` with the given tensor and pipeline sizes
(data parallel takes the rest), calls ``fn(rank, world_size, *args)`` in each,
and re-raises the first failure in the caller. The processes fork from a
``multiprocessing`` fork server that imported torch and megatron-core once (per
calling process), not from the caller: ``fn`` must be importable by name (a
module-level function), and the caller's environment variables and working
directory are passed on.

``srun_like(args, world)`` starts ``slkd ARGS`` as ``world`` processes the way srun
starts a step's tasks, for tests of what one task's death does to the others.

``lose_a_process(args, lost, logs)`` runs two of them, loses one process (a rank killed
or stopped, a data-loader worker or megatron-core's checkpoint writer killed) once rank
0 prints a given line, and reports how the others stopped.

``write_tiny_teacher(directory, tokenizer)`` saves a small random Llama with the
vocabulary of a Hugging Face tokenizer (and that tokenizer) as a teacher
directory: it loads in a second and runs thousands of tokens per second on one
core, for tests of everything around the teacher.
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_slkd.launch import close_distributed, free_port

__all__ = ["LOST", "free_port", "lose_a_process", "run_distributed", "same_rows_fraction",
           "srun_like", "write_tiny_teacher"]

LOST = ("rank killed", "rank stopped", "loader worker killed", "loader worker stopped",
        "checkpoint writer killed")  # fmt: skip
"""What :func:`lose_a_process` can lose: rank 1 (SIGKILL, or SIGSTOP: a hung process or
machine), or a helper process of rank 0 (SIGKILL: the out-of-memory killer's usual
victims; SIGSTOP: a frozen one), a data-loader worker or megatron-core's checkpoint
writer."""

_PORT_ERRORS = ("Address already in use", "EADDRINUSE", "address already in use")


def _worker(rank, world_size, port, fn, args, tp, pp, megatron, threads, cp, environ):
    os.environ.clear()  # the caller's, not the fork server's (started by an earlier call)
    os.environ.update(environ)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        if megatron:
            from megatron.core import parallel_state

            from megatron_slkd.compat import cpu

            cpu.enable()
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=tp,
                pipeline_model_parallel_size=pp,
                context_parallel_size=cp,
            )
        fn(rank, world_size, *args)
    except BaseException as exc:
        raise RuntimeError(f"rank {rank} failed:\n{traceback.format_exc()}") from exc
    finally:
        close_distributed()  # also the groups a cycle holds (pytest.raises keeps one)


_PRELOAD = ("torch", "torch.distributed", "megatron.core.parallel_state",
            "megatron.core.tensor_parallel", "megatron.core.models.gpt", "megatron_slkd.compat.cpu")


def _start_method() -> str:
    """forkserver, preloaded with torch and megatron-core: each process forks from a server
    that imported them once, where spawn's fresh interpreters import them again (seconds
    of CPU per process)."""
    mp.set_forkserver_preload(list(_PRELOAD))
    return "forkserver"


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    megatron: bool = False,
    retries: int = 3,
) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes.

    Args:
        fn: module-level function; its assertions fail the run.
        world_size: number of processes.
        tp, pp, cp: megatron-core tensor, pipeline and context parallel sizes (used
            when ``megatron`` is true; data parallel is ``world_size / (tp * pp * cp)``).
        megatron: initialize megatron-core ``parallel_state`` (with the CPU
            compat module enabled) before calling ``fn``.
        retries: attempts when the chosen port is taken before gloo binds it.
    """
    if megatron and world_size % (tp * pp * cp):
        raise ValueError(f"world size {world_size} is not divisible by tp*pp*cp={tp * pp * cp}")
    threads = max(1, (os.cpu_count() or 1) // world_size)
    for attempt in range(retries):
        try:
            mp.start_processes(
                _worker,
                args=(world_size, free_port(), fn, args, tp, pp, megatron, threads, cp,
                      dict(os.environ)),
                nprocs=world_size,
                start_method=_start_method(),
            )
            return
        except mp.ProcessRaisedException as exc:
            if attempt + 1 < retries and any(e in str(exc) for e in _PORT_ERRORS):
                continue
            raise


def write_tiny_teacher(directory, tokenizer, *, seed: int = 0, layers: int = 2,
                       hidden: int = 32) -> None:  # fmt: skip
    """Save a random Llama (4 heads in 2 query groups, so it shards at TP=2) with the
    vocabulary of ``tokenizer`` (a path the data tokenizer loads from) to ``directory``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_slkd.data.tokenizers import HFTokenizer

    tok = HFTokenizer(str(tokenizer))
    tok._tok.save_pretrained(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=1.0,  # logits of a few units, so comparisons mean something
    )
    LlamaForCausalLM(config).save_pretrained(directory)


def srun_like(args, world: int = 2, *, stdout=None, stderr=None) -> list[subprocess.Popen]:
    """``slkd ARGS`` as ``world`` independent processes, each told its rank and the
    rendezvous as srun tells a step's tasks (``SLURM_PROCID``, ``SLURM_NTASKS``,
    ``MASTER_ADDR``, ``MASTER_PORT`` on a free port): nothing stops the others when one
    dies, unlike torchrun. ``stdout`` and ``stderr`` are given to every process, or
    called with the rank for its own (a file, which its loader workers share). Each leads
    a process group of its own, with its helpers: ``os.killpg(p.pid, SIGKILL)`` ends them
    all, as Slurm ends a step's processes (a process killed alone leaves its helpers
    orphaned)."""
    port, procs = free_port(), []
    for rank in range(world):
        env = {**os.environ, "SLURM_PROCID": str(rank), "SLURM_NTASKS": str(world),
               "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        out, err = (f(rank) if callable(f) else f for f in (stdout, stderr))
        procs.append(subprocess.Popen([sys.executable, "-m", "megatron_slkd", *map(str, args)],
                                      env=env, text=True, stdout=out, stderr=err,
                                      start_new_session=True))
    return procs


def lose_a_process(args, lost: str, logs, *, after: str = "step 7/", wait_s: float = 90.0) -> dict:
    """Run ``slkd ARGS`` as two srun-like ranks, lose ``lost`` (one of :data:`LOST`) once
    rank 0 prints a line starting with ``after``, and wait for the others.

    Returns ``procs``, ``victim`` (rank 1's process where it was the one lost, else None),
    ``waited`` (seconds from the loss until the last other rank exited; None when one
    was still running after ``wait_s``, and then killed), ``said`` (rank -> seconds until
    its first ``slkd`` line), and per rank its stderr (``errs``) and its ``slkd`` lines
    (``lines``). Stderr goes to ``logs/rank-R.err``."""
    import signal
    import time
    from pathlib import Path

    logs = Path(logs)
    logs.mkdir(parents=True, exist_ok=True)
    files = [open(logs / f"rank-{r}.err", "w") for r in (0, 1)]
    procs = srun_like(args, stdout=lambda r: subprocess.PIPE if r == 0 else subprocess.DEVNULL,
                      stderr=lambda r: files[r])  # fmt: skip
    for f in files:
        f.close()
    victim, waited, said = None, None, {}
    try:
        if not any(line.startswith(after) for line in procs[0].stdout):
            raise RuntimeError(f"rank 0 never printed {after!r}: "
                               f"{(logs / 'rank-0.err').read_text()[-3000:]}")  # fmt: skip
        how = signal.SIGKILL if lost.endswith(" killed") else signal.SIGSTOP
        if lost.startswith("rank "):
            victim = procs[1]
            os.kill(victim.pid, how)
        else:
            want = "megatron_slkd" if lost.startswith("loader") else "multiprocessing.spawn"
            kids = subprocess.run(["pgrep", "-P", str(procs[0].pid)], capture_output=True,
                                  text=True).stdout.split()  # fmt: skip
            os.kill(next(int(k) for k in kids if want in Path(f"/proc/{k}/cmdline").read_text()),
                    how)  # fmt: skip
        t = time.perf_counter()
        others = [r for r, p in enumerate(procs) if p is not victim]
        while time.perf_counter() - t < wait_s:
            for r in others:
                if r not in said and "\nslkd " in "\n" + (logs / f"rank-{r}.err").read_text():
                    said[r] = time.perf_counter() - t
            if all(procs[r].poll() is not None for r in others):
                waited = time.perf_counter() - t
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # with the helpers it left behind
            except ProcessLookupError:
                pass
            p.wait()
            if p.stdout is not None:
                p.stdout.close()
    errs = [(logs / f"rank-{r}.err").read_text() for r in (0, 1)]
    return {"procs": procs, "victim": victim, "waited": waited, "said": said, "errs": errs,
            "lines": [[ln for ln in e.splitlines() if ln.startswith("slkd ")] for e in errs]}


def same_rows_fraction(a_dir, b_dir) -> float:
    """Share of positions whose entry ids agree between two caches of one dataset (two
    teachers, or one at two layouts: logits that agree to about 1e-5 move only the draws
    that land next to a CDF boundary)."""
    import numpy as np

    from megatron_slkd.cache import open_cache

    a, b = open_cache(a_dir), open_cache(b_dir)
    ra, rb = a.read_tokens(0, a.num_tokens), b.read_tokens(0, b.num_tokens)
    same = [
        ra.num_entries[i] == rb.num_entries[i]
        and np.array_equal(ra.ids[i, : ra.num_entries[i]], rb.ids[i, : rb.num_entries[i]])
        for i in range(a.num_tokens)
    ]
    return float(np.mean(same))
