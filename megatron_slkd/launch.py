"""Which task of a launch this process is: torchrun, srun (job arrays too), or mpirun.

Cache building splits shards across every process of a launch without any
communication: process r of W builds shards r, r + W, r + 2W, ...
"""

from __future__ import annotations

import os

__all__ = ["launch_rank"]

_PAIRS = (
    ("RANK", "WORLD_SIZE"),  # torchrun
    ("SLURM_PROCID", "SLURM_NTASKS"),  # srun
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),  # Open MPI
    ("PMI_RANK", "PMI_SIZE"),  # MPICH, Intel MPI
)


def launch_rank(env: dict | None = None) -> tuple[int, int]:
    """(rank, world size) of this process across the launch; (0, 1) when alone.

    Within a Slurm job array, task ``SLURM_ARRAY_TASK_ID`` of
    ``SLURM_ARRAY_TASK_COUNT`` contributes its ranks after those of the
    tasks before it.
    """
    env = os.environ if env is None else env
    rank, world = 0, 1
    for r, w in _PAIRS:
        if r in env and w in env:
            rank, world = int(env[r]), int(env[w])
            break
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        task = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        rank += task * world
        world *= int(env["SLURM_ARRAY_TASK_COUNT"])
    return rank, world
