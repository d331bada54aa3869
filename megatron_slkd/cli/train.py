"""Pretrain a student with megatron-core on sparse teacher targets (or plain CE).

One process per rank, launched by torchrun or srun (the Slurm environment is
read); alone it trains on one process. Settings come from a YAML file
(``--config``) and from one flag per setting, which wins over the file. The
resolved config, checkpoints, ``train_log.jsonl`` and TensorBoard events go to
``--checkpoint-dir``; a rerun resumes from its latest checkpoint.

    slkd train --data-path data/corpus --kd-caches data/corpus=cache/ --kd-alpha 0.0 \\
        --train-steps 200 --checkpoint-dir runs/rskd
    torchrun --nproc-per-node 2 -m megatron_slkd.training --config student.yaml \\
        --parallel-tensor 2
    slkd train --data-path data/corpus --kd-ce-only --checkpoint-dir runs/ce   # baseline
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    from megatron_slkd.training.config import add_config_arguments

    add_config_arguments(p)
    p.add_argument("--json", action="store_true", help="print the final metrics as one JSON object")


def run(args: argparse.Namespace) -> int:
    import os
    import warnings

    import torch
    import torch.distributed as dist

    from megatron_slkd.training.config import config_from_args
    from megatron_slkd.training.loop import train

    for noise in (
        r"`torch\.distributed\.\w+` is deprecated",  # megatron-core's collectives
        ".*CUDA_DEVICE_MAX_CONNECTIONS",
        "full scope is deprecated",
    ):
        warnings.filterwarnings("ignore", message=noise)
    cfg = config_from_args(args)
    cfg.validate()
    if "OMP_NUM_THREADS" not in os.environ:  # share the cores among the ranks of this node
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", 1)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))
    final = train(cfg)  # the process groups are closed by the CLI (launch.close_distributed)
    if args.json and dist.get_rank() == 0:
        print(json.dumps(final, sort_keys=True))
    return 0
