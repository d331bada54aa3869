"""Where this process stands in a launch (torchrun, srun, Slurm job arrays, mpirun),
and setting up torch.distributed plus megatron-core's parallel state from it.

Cache building splits shards across the processes of a launch without any
communication: process r of W builds shards r, r + W, r + 2W, ... With a
tensor-parallel teacher the unit is the data-parallel rank instead: the TP
ranks of one group build the same shards together.
"""

from __future__ import annotations

import os
import sys

__all__ = [
    "process_rank",
    "array_task",
    "launch_rank",
    "share",
    "init_distributed",
    "free_port",
    "host_all_reduce",
    "any_rank",
    "close_distributed",
    "die_with_parent",
]

_PAIRS = (
    ("RANK", "WORLD_SIZE"),  # torchrun
    ("SLURM_PROCID", "SLURM_NTASKS"),  # srun
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),  # Open MPI
    ("PMI_RANK", "PMI_SIZE"),  # MPICH, Intel MPI
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_rank(env=None) -> tuple[int, int]:
    """(rank, world size) of this process within its launch; (0, 1) when alone."""
    env = os.environ if env is None else env
    for r, w in _PAIRS:
        if r in env and w in env:
            return int(env[r]), int(env[w])
    return 0, 1


def array_task(env=None) -> tuple[int, int]:
    """(index, count) of this Slurm array task; (0, 1) outside job arrays."""
    env = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
    return 0, 1


def share(rank: int, world: int, env=None) -> tuple[int, int]:
    """A worker's (index, count) across all array tasks, given its place within its task."""
    task, tasks = array_task(env)
    return task * world + rank, world * tasks


def launch_rank(env=None) -> tuple[int, int]:
    """(rank, world size) of this process across the whole launch, array tasks included."""
    return share(*process_rank(env), env)


def init_distributed(
    tensor_parallel: int = 1,
    device: str = "cpu",
    pipeline_parallel: int = 1,
    *,
    virtual_pipeline: int | None = None,
) -> None:
    """torch.distributed (NCCL on GPU, gloo on CPU) and megatron-core's parallel state.

    Reads the launcher's environment; alone, it makes a one-process group. On
    CPU it enables the compat module that lets megatron-core run without CUDA.
    """
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    rank, world = process_rank()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            job = int(os.environ.get("SLURM_JOB_ID", "0"))
            if world == 1:  # alone: any free port, so that runs side by side do not collide
                os.environ["MASTER_PORT"] = str(free_port())
            else:
                os.environ["MASTER_PORT"] = str(29500 + job % 20000) if job else "29500"
        gpu = device.startswith("cuda")
        if gpu:
            local = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID"))
            torch.cuda.set_device(int(local) if local else rank % torch.cuda.device_count())
        dist.init_process_group("nccl" if gpu else "gloo", rank=rank, world_size=world)
    if device == "cpu":
        from megatron_slkd.compat import cpu

        cpu.enable()
    if not parallel_state.model_parallel_is_initialized():
        if world % (tensor_parallel * pipeline_parallel):
            from megatron_slkd.errors import ConfigError

            raise ConfigError(
                f"tensor x pipeline parallel size {tensor_parallel} x {pipeline_parallel} does "
                f"not divide the {world} processes of the launch; launch a multiple of it"
            )
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel,
            pipeline_model_parallel_size=pipeline_parallel,
            virtual_pipeline_model_parallel_size=virtual_pipeline,
        )


def host_all_reduce(t, op=None, group=None):
    """All-reduce a small CPU tensor of host-side figures (flags, loss sums, timings)
    whatever the backend: NCCL reduces only CUDA tensors, so there it goes through the
    current device and back. Returns the reduced CPU tensor (``t`` itself on gloo)."""
    import torch
    import torch.distributed as dist

    op = dist.ReduceOp.SUM if op is None else op
    if dist.get_backend(group) != "nccl":
        dist.all_reduce(t, op=op, group=group)
        return t
    x = t.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(x, op=op, group=group)
    t.copy_(x.cpu())
    return t


def any_rank(flag: bool, group=None) -> bool:
    """Whether ``flag`` holds on any rank of ``group`` (every rank must ask): how ranks
    agree that one of them failed or was signalled, so none waits in a collective."""
    import torch
    import torch.distributed as dist

    return bool(host_all_reduce(torch.tensor([float(flag)]), dist.ReduceOp.MAX, group).item())


def close_distributed() -> None:
    """Destroy megatron-core's parallel state and the process groups, if any, before the
    interpreter exits (called by every ``slkd`` command on its way out).

    A gloo group destroyed with the interpreter, whether ``destroy_process_group`` was
    called or not, may abort the process (``terminate called without an active
    exception``: status 134 instead of the command's own, here about one exit in five).
    So reference cycles that still hold groups (an exception's frames) are collected
    first, while the groups can still be freed, and then the groups are destroyed.
    """
    if "torch.distributed" not in sys.modules:
        return
    import gc

    import torch.distributed as dist

    if not dist.is_initialized():
        return
    gc.collect()  # 0.2 s with megatron-core imported: only where there are groups
    if "megatron.core.parallel_state" in sys.modules:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def die_with_parent(parent: int) -> None:
    """Have Linux end this process (SIGKILL) when the process that started it ends, and
    end it at once if that process, ``parent``'s pid, is already gone. For the helper
    processes multiprocessing *spawn* starts: one outlives a parent killed with SIGKILL,
    reparented for ever, wherever no launcher kills the process group or cgroup (torchrun
    and Slurm do; a lone process on a workstation has neither). Elsewhere than Linux,
    nothing. The signal comes when the *thread* that started this process ends: start it
    from a thread that lives as long as its process."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl: no worse than without
        return
    if os.getppid() != parent:  # it ended between our start and the prctl
        os._exit(1)
