"""Megatron-LM's ``pretrain_gpt.py`` with sparse-logit knowledge distillation.

A drop-in for Megatron-LM users: the same arguments, model provider, schedules,
checkpoints and logging as ``pretrain_gpt.py``; the dataset provider builds
``SparseKDGPTDataset`` (megatron-core's GPTDataset plus the teacher's cached
sparse targets, checked against each data prefix), ``forward_step`` broadcasts
the targets with the batch, and ``loss_func`` is the vocab-parallel sparse KD
loss. Run it from a Megatron-LM checkout of the release branch that goes with
the installed megatron-core (core_r0.16.0 with 0.16 on Python >= 3.10,
core_r0.19.0 with 0.19 on Python >= 3.12) with megatron-slkd installed:

    cd Megatron-LM
    PYTHONPATH=$PWD torchrun --nproc-per-node 8 \\
        /path/to/megatron-slkd/examples/megatron_lm/pretrain_gpt_slkd.py \\
        <the usual pretrain_gpt.py arguments: model, --data-path, --tokenizer-*, ...> \\
        --slkd-cache DATA_PREFIX=CACHE_DIR --slkd-alpha 0.0

Every prefix of ``--data-path`` needs a cache built by ``slkd build-cache``
with the tokenizer the run uses. Before ``pretrain()`` starts, every rank checks
that each prefix's files open and that its cache is given and has a manifest;
otherwise the script stops in one line with exit status 2, before any process
group, model or checkpoint load. Logged as ``lm loss`` (label cross-entropy),
``kd loss`` (what is optimized) and ``kl to teacher``.
"""

import argparse
import dataclasses
import os
import sys
from functools import partial

import pretrain_gpt as base  # Megatron-LM's own script, from the checkout on PYTHONPATH
import torch
from gpt_builders import gpt_builder
from megatron.core import parallel_state as ps
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.enums import ModelType
from megatron.training import get_args, get_tokenizer, pretrain, print_rank_0
from megatron.training.arguments import parse_args
from megatron.training.utils import get_blend_and_blend_per_split
from model_provider import model_provider

from megatron_slkd.cache import Manifest
from megatron_slkd.compat.megatron import check_version
from megatron_slkd.data.batch import get_kd_batch
from megatron_slkd.data.describe import check_blend_splits
from megatron_slkd.data.kd_dataset import SparseKDGPTDataset, SparseKDGPTDatasetConfig
from megatron_slkd.errors import CacheMismatchError, ConfigError, SlkdError, one_line
from megatron_slkd.loss import vocab_parallel_sparse_kd_loss
from megatron_slkd.training.config import key_by_prefix
from megatron_slkd.training.data import check_kd_inputs, with_read_ahead


def add_slkd_args(parser):
    """The ``--slkd-*`` arguments."""
    group = parser.add_argument_group("sparse-logit knowledge distillation (megatron-slkd)")
    group.add_argument(
        "--slkd-cache", nargs="+", required=True, metavar="PREFIX=DIR",
        help="the sparse-logit cache of every data prefix of --data-path",
    )  # fmt: skip
    group.add_argument(
        "--slkd-alpha", type=float, default=0.0,
        help="weight of the hard-label cross-entropy; the teacher gets 1 - alpha",
    )  # fmt: skip
    group.add_argument(
        "--slkd-allow-mixed-teachers", action="store_true",
        help="train on caches of more than one teacher run (another teacher checkpoint, RS "
        "beside top-k, another temperature); refused by default",
    )  # fmt: skip
    group.add_argument(
        "--slkd-check-tokens", action=argparse.BooleanOptionalAction, default=True,
        help="compare every shard's 128-bit token identity with the data at start-up, once "
        "per (dataset, cache) pair (default; --no-slkd-check-tokens skips it with a warning)",
    )  # fmt: skip
    group.add_argument(
        "--slkd-object-cache-dir", default=None,
        help="for caches on s3:// or msc://: where fetched chunks are kept on this node "
        "(default: $SLKD_OBJECT_CACHE_DIR or ~/.cache/megatron-slkd/objects)",
    )  # fmt: skip
    group.add_argument(
        "--slkd-object-cache-gb", type=float, default=None,
        help="bound of that local chunk cache in GB, least recently used evicted (default 16 GiB)",
    )  # fmt: skip
    group.add_argument(
        "--slkd-readahead-batches", type=int, default=4,
        help="for caches on object storage, with --dataloader-type single: each loader "
        "process fetches the chunks of its next this many micro-batches ahead (0: off)",
    )  # fmt: skip
    group.add_argument(
        "--slkd-pad-to", type=int, default=None,
        help="entries per position in a batch (default: the caches' N or k)",
    )  # fmt: skip
    return parser


def _prefixes(blend, blend_per_split) -> list[str]:
    """The data prefixes of a blend or of per-split blends, each once, in order."""
    blends = [blend] if blend else [b for b in blend_per_split or [] if b]
    return list(dict.fromkeys(p for b in blends for p in b[0]))


def _caches(args, prefixes: list[str]) -> dict[str, str]:
    """--slkd-cache as prefix -> cache; a prefix holding ``=`` is matched whole."""
    pairs = [c.split("=", 1) for c in args.slkd_cache]
    if any(len(p) != 2 for p in pairs):
        raise CacheMismatchError(f"--slkd-cache takes PREFIX=DIR entries, got {args.slkd_cache}")
    return key_by_prefix(dict(pairs), prefixes)


def check_slkd_inputs(args) -> None:
    """Before ``pretrain()`` initializes anything (process groups, the model, its
    checkpoint: minutes on a large job): every prefix of the blend opens, has a cache
    in --slkd-cache, and that cache's manifest reads, and --reset-attention-mask can
    reach every stage's layers; raises the typed error otherwise."""
    check_version()
    theirs = [f"--{n.replace('_', '-')}" for n in ("logits_load_dir", "logits_save_dir")
              if getattr(args, n, None)]  # Megatron-LM's own offline KD, core_r0.19.0 on
    if theirs:
        raise ConfigError(
            f"--slkd-cache with {' and '.join(theirs)}: two knowledge-distillation paths at "
            "once (Megatron-LM's cached top-K logits and these sparse targets); give one"
        )
    if args.reset_attention_mask and args.pipeline_model_parallel_size > 2:
        # Megatron-LM's get_batch gives middle stages no batch: their layers attend causally
        # across documents, so the run would not do what --reset-attention-mask says.
        raise ConfigError(
            f"--reset-attention-mask with --pipeline-model-parallel-size "
            f"{args.pipeline_model_parallel_size}: the middle pipeline stages read no batch, so "
            "their layers would attend across documents; use at most 2 pipeline stages or drop "
            "--reset-attention-mask"
        )
    blend, per_split = get_blend_and_blend_per_split(args)
    if blend is None and per_split is None:
        return  # --mock-data: megatron-core's mock dataset, no teacher targets to check
    prefixes = _prefixes(blend, per_split)
    check_kd_inputs(prefixes, _caches(args, prefixes), flag="--slkd-cache",
                    mixed_flag=None if args.slkd_allow_mixed_teachers
                    else "--slkd-allow-mixed-teachers")  # fmt: skip


def _entry_bound(cache_dir: str, vocab_size: int) -> int:
    """Most entries a position of this cache can hold (RS: N; top-k: k)."""
    manifest = Manifest.read(cache_dir)  # a directory or an s3:// / msc:// URL
    if manifest.tokenizer.get("vocab_size") not in (None, vocab_size):
        raise CacheMismatchError(
            f"{cache_dir}: built for a vocabulary of {manifest.tokenizer['vocab_size']} "
            f"ids, but the run's tokenizer has {vocab_size}; use the teacher's tokenizer"
        )
    s = manifest.sampling
    return int(s.get("num_samples") if s.get("method") == "rs" else s.get("k"))


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """SparseKDGPTDataset splits, configured exactly like pretrain_gpt.py's GPTDataset."""
    args = get_args()
    plain = base.core_gpt_dataset_config_from_args(args)
    fields = {f.name: getattr(plain, f.name) for f in dataclasses.fields(plain) if f.init}
    caches = _caches(args, _prefixes(plain.blend, plain.blend_per_split))
    vocab = get_tokenizer().vocab_size
    pad_to = args.slkd_pad_to or max(_entry_bound(d, vocab) for d in caches.values())
    gb = args.slkd_object_cache_gb
    config = SparseKDGPTDatasetConfig(
        **fields, kd_caches=caches, kd_check_tokens=args.slkd_check_tokens, kd_pad_to=pad_to,
        kd_object_cache_dir=args.slkd_object_cache_dir,
        kd_object_cache_bytes=None if gb is None else int(gb * 1e9),
    )  # fmt: skip
    # megatron-core's GPTDataset never returns on a split of no tokens: refuse it by name.
    check_blend_splits(config.blend, config.blend_per_split, config.split,
                       config.sequence_length, train_val_test_num_samples,
                       extra_token=config.add_extra_token_to_sequence)  # fmt: skip
    print_rank_0(f"> building sparse-KD GPT datasets ({pad_to} teacher entries per position) ...")
    train, valid, test = BlendedMegatronDatasetBuilder(
        SparseKDGPTDataset,
        train_val_test_num_samples,
        partial(base.is_dataset_built_on_rank, vp_stage=vp_stage),
        config,
    ).build()
    if args.dataloader_type == "single":  # the sampler's order is known: fetch ahead
        train = with_read_ahead(
            train, consumed=0, micro=args.micro_batch_size, dp_rank=ps.get_data_parallel_rank(),
            dp=ps.get_data_parallel_world_size(), workers=args.num_workers,
            batches=args.slkd_readahead_batches,
        )  # fmt: skip
    return train, valid, test


def loss_func(batch: dict, output_tensor: torch.Tensor, model=None):
    """Sparse KD loss summed over the micro-batch's tokens; (loss, tokens, report)."""
    args = get_args()
    res = vocab_parallel_sparse_kd_loss(
        output_tensor, batch["kd_ids"], batch["kd_weights"], batch["labels"],
        alpha=args.slkd_alpha, tp_group=ps.get_tensor_model_parallel_group(),
        vocab_size=get_tokenizer().vocab_size, inplace=True,
    )  # fmt: skip
    mask = batch["loss_mask"].float()
    kd_mask = mask * (batch["kd_weights"].sum(-1) > 0)
    loss = (res.loss * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    n = mask.sum().detach().view(1)
    report = {
        "lm loss": torch.cat([(res.ce.detach() * mask).sum().view(1), n]),
        "kd loss": torch.cat([loss.detach().view(1), n]),
        "kl to teacher": torch.cat(
            [(res.kl.detach() * kd_mask).sum().view(1), kd_mask.sum().view(1)]
        ),
    }
    return loss, num_tokens, report


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    """The batch with its sparse targets (broadcast over TP, routed over PP), then the logits."""
    assert not return_schedule_plan, "--overlap-moe-expert-parallel-comm is not supported here"
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    batch = get_kd_batch(data_iterator, device=device) or {}
    output = model(batch.get("tokens"), batch.get("position_ids"), batch.get("attention_mask"))
    return output, partial(loss_func, batch, model=model)


if __name__ == "__main__":
    try:  # Megatron-LM's own parser over the same command line
        check_slkd_inputs(parse_args(extra_args_provider=add_slkd_args))
    except (SlkdError, OSError) as exc:  # every rank stops; rank 0 says why, in one line
        if os.environ.get("RANK", "0") == "0":
            sys.stderr.write(f"pretrain_gpt_slkd.py: error: {one_line(exc)}\n")
        sys.exit(2)
    train_valid_test_datasets_provider.is_distributed = True
    pretrain(
        train_valid_test_datasets_provider,
        partial(model_provider, gpt_builder),
        ModelType.encoder_or_decoder,
        forward_step,
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
        extra_args_provider=add_slkd_args,
        get_embedding_ranks=base.get_embedding_ranks,
    )
