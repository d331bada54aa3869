"""Teachers straight from Megatron-LM checkpoints (``pretrain_gpt.py --save``).

A Megatron-LM user's teacher is usually a checkpoint their own training wrote:
a ``--save`` directory (``latest_checkpointed_iteration.txt`` and
``iter_NNNNNNN/``) or one of its iteration directories, in the ``torch_dist``
format (Megatron-LM's default): ``metadata.json``, the run's arguments, and
megatron-core's distributed checkpoint files. The arguments (the "common
state") are in ``common.pt`` up to megatron-core 0.18; from 0.19 they are an
object inside the distributed checkpoint itself (``common_state``), and both
are read.

The model is rebuilt from those arguments the way Megatron-LM's
``gpt_builder`` builds it: the arguments that name a ``TransformerConfig``
field set it (``core_transformer_config_from_args``), ``--swiglu`` and the
other activation flags set the activation, ``--group-query-attention`` the
query groups, and the position embedding, rotary settings, tied or untied
output layer and padded vocabulary come from the same arguments. It runs on
megatron-core's local layer spec, whose checkpoint keys are Transformer
Engine's (megatron-core maps them), so a checkpoint trained with either spec
has the keys this loads. Tensor and pipeline sizes
are this run's own: ``dist_checkpointing`` reshards on load. Parallel layouts,
fusions, recomputation and low-precision recipes of the training run are
replaced by this run's: they change how the forward is computed, not what.

Architectures the local spec cannot rebuild (mixture of experts, multi-latent
attention, hybrid Mamba, heterogeneous or custom layer specs, sliding-window
or gated attention, the legacy model) are refused by name before anything
loads, as are checkpoints in another format (legacy ``torch``, ``torch_dcp``,
``fsdp_dtensor``).

The common state is read with a restricted unpickler: argument values, torch
dtypes and enums are rebuilt; any other object becomes an opaque stand-in, and
no code from the file runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import functools
import io
import json
import pickle
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_slkd.errors import first_line
from megatron_slkd.teacher.hf import TeacherError

__all__ = [
    "find_iteration",
    "is_megatron_lm_checkpoint",
    "read_args",
    "teacher_spec",
    "model_parts",
    "tokenizer_files",
    "tokenizer_from_args",
]

_TRACKER = "latest_checkpointed_iteration.txt"

# Architecture arguments this loader cannot rebuild: (argument, value that is fine, what it is).
_REFUSED = (
    ("num_experts", None, "a mixture of experts"),
    ("multi_latent_attention", False, "multi-latent attention"),
    ("experimental_attention_variant", None, "an experimental attention variant"),
    ("heterogeneous_layers_config_path", None, "heterogeneous layers"),
    ("is_hybrid_model", False, "a hybrid (Mamba) model"),
    ("hybrid_override_pattern", None, "a hybrid (Mamba) model"),
    ("spec", None, "a custom layer spec (--spec)"),
    ("use_legacy_models", False, "Megatron-LM's legacy model"),
    ("yaml_cfg", None, "a model defined by --yaml-cfg"),
    ("window_size", None, "sliding-window attention"),
    ("window_attn_skip_freq", None, "sliding-window attention"),
    ("qk_l2_norm", False, "L2-normalized queries and keys"),
    ("attention_output_gate", False, "a gated attention output"),
    ("softmax_type", "vanilla", "a non-vanilla attention softmax"),
    ("no_rope_freq", None, "layers without RoPE"),
    ("mrope_section", None, "multimodal RoPE"),
    ("linear_attention_freq", None, "linear attention layers"),
    ("quick_geglu", False, "the quick-GeGLU activation"),
    # megatron-core's torch norms (the local spec without Apex) refuse it.
    ("layernorm_zero_centered_gamma", False, "zero-centered norm weights"),
    ("apply_layernorm_1p", False, "zero-centered norm weights"),
)

# What a TransformerConfig field copied from the arguments must become for this run:
# its own layout, dtype and plain (unfused, full-precision, no-dropout) forward.
_THIS_RUN = dict(
    virtual_pipeline_model_parallel_size=None,
    pipeline_model_parallel_layout=None,
    num_layers_in_first_pipeline_stage=None,
    num_layers_in_last_pipeline_stage=None,
    account_for_embedding_in_pipeline_split=False,
    account_for_loss_in_pipeline_split=False,
    sequence_parallel=False,
    context_parallel_size=1,
    hierarchical_context_parallel_sizes=None,
    hybrid_context_parallel=False,
    expert_model_parallel_size=1,
    expert_tensor_parallel_size=1,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    use_cpu_initialization=True,
    perform_initialization=False,  # every weight comes from the checkpoint
    init_model_with_meta_device=False,
    gradient_accumulation_fusion=False,
    bias_dropout_fusion=False,
    bias_activation_fusion=False,
    masked_softmax_fusion=False,
    apply_rope_fusion=False,
    persist_layer_norm=False,
    cross_entropy_loss_fusion=False,
    use_fused_weighted_squared_relu=False,
    tp_comm_overlap=False,
    recompute_granularity=None,
    recompute_method=None,
    recompute_num_layers=None,
    recompute_modules=None,
    distribute_saved_activations=False,
    fp8=None,
    fp8_param=False,
    fp4=None,
    fp4_param=False,
    first_last_layers_bf16=False,
    enable_cuda_graph=False,
    external_cuda_graph=False,
    cuda_graph_impl="none",
    cuda_graph_scope=[],
    cpu_offloading=False,
    cpu_offloading_num_layers=0,
    fine_grained_activation_offloading=False,
    offload_modules=[],
    transformer_impl="local",
    batch_invariant_mode=False,
    use_te_activation_func=False,
    symmetric_ar_type=None,
    mtp_num_layers=None,
    calculate_per_token_loss=False,
    config_logger_dir="",
    delay_wgrad_compute=False,
    overlap_moe_expert_parallel_comm=False,
    moe_extended_tp=False,
    tp_comm_bootstrap_backend="nccl",
    cp_comm_type=None,
    log_max_attention_logit=False,
    qk_clip=False,
)


def find_iteration(path) -> Path | None:
    """The iteration directory of the Megatron-LM checkpoint at ``path``, else None.

    ``path`` is a ``--save`` directory (its tracker file names the iteration, or
    ``release``) or an iteration directory itself.

    Raises:
        TeacherError: the tracker names an iteration whose directory is missing,
            or cannot be read.
    """
    p = Path(path)
    tracker = p / _TRACKER
    if tracker.is_file():
        try:
            text = tracker.read_text().strip()
        except OSError as exc:
            raise TeacherError(f"{tracker}: unreadable ({exc})") from exc
        name = "release" if text == "release" else None
        if name is None:
            try:
                name = f"iter_{int(text):07d}"
            except ValueError:
                raise TeacherError(
                    f"{tracker}: names iteration {text!r}, not a number or 'release'; point "
                    "--teacher at the iteration directory to use"
                ) from None
        if not (p / name).is_dir():
            raise TeacherError(
                f"{tracker}: names {name}, but {p / name} does not exist (a save that did not "
                "finish?); point --teacher at an iteration directory that does"
            )
        return p / name
    if p.is_dir() and (
        (p / _COMMON).is_file() or (p / "metadata.json").is_file() or any(p.glob("mp_rank_*"))
    ):
        return p
    return None


def is_megatron_lm_checkpoint(path) -> bool:
    """Whether ``path`` is a Megatron-LM checkpoint (a ``--save`` or iteration directory)."""
    try:
        return find_iteration(path) is not None
    except TeacherError:
        return True  # one, damaged: reading it says how


def _check_format(iteration: Path) -> None:
    if any(iteration.glob("mp_rank_*")):
        raise TeacherError(
            f"{iteration}: a Megatron-LM checkpoint in the legacy 'torch' format "
            "(mp_rank_* files); megatron-slkd reads the 'torch_dist' format. Convert it "
            "with Megatron-LM: load it with --ckpt-format torch --ckpt-convert-format "
            "torch_dist --ckpt-convert-save DIR, then point --teacher at DIR"
        )
    meta = iteration / "metadata.json"
    try:
        backend = json.loads(meta.read_text()).get("sharded_backend")
    except (OSError, ValueError, AttributeError) as exc:
        raise TeacherError(
            f"{meta}: missing or unreadable ({first_line(exc)}); this is not a Megatron-LM "
            "checkpoint in the torch_dist format (formats torch_dcp and fsdp_dtensor are not "
            "read: convert to torch_dist)"
        ) from exc
    if backend != "torch_dist":
        raise TeacherError(
            f"{meta}: sharded backend {backend!r}; megatron-slkd reads 'torch_dist' "
            "checkpoints (convert with Megatron-LM's --ckpt-convert-format torch_dist)"
        )


class _Opaque:
    """Stands in for an object of the common state not needed to rebuild the model."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


class _ArgsUnpickler(pickle.Unpickler):
    """Rebuilds arguments, dtypes and enums; everything else becomes ``_Opaque``."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("argparse", "Namespace"):
            return argparse.Namespace
        if module == "collections" and name == "OrderedDict":
            from collections import OrderedDict

            return OrderedDict
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.split(".")[0] in ("megatron", "signal", "enum"):
            try:
                found = super().find_class(module, name)
            except (ImportError, AttributeError):
                return _Opaque
            if isinstance(found, type) and issubclass(found, enum.Enum):
                return found
        return _Opaque

    def persistent_load(self, pid):  # tensors in the common state: not needed
        return None


_COMMON = "common.pt"
_COMMON_OBJECT = "common_state/shard_0_1"  # megatron-core 0.19: ShardedObject("common_state")


def args_location(iteration) -> Path:
    """Where the run's arguments of ``iteration`` are: its ``common.pt`` (megatron-core up
    to 0.18), else the distributed checkpoint's metadata (0.19 keeps them inside)."""
    common = Path(iteration) / _COMMON
    return common if common.exists() else Path(iteration) / ".metadata"


def _common_state_bytes(iteration: Path, where: Path) -> bytes:
    """The ``torch.save`` bytes of the common state at ``where`` (:func:`args_location`):
    ``common.pt`` whole, or (megatron-core 0.19) the byte range the distributed
    checkpoint's metadata gives for ``common_state``."""
    if where.name == _COMMON:
        return where.read_bytes()
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(str(iteration)).read_metadata().storage_data
    except (RuntimeError, ValueError, pickle.UnpicklingError, EOFError) as exc:
        raise OSError(f"unreadable ({first_line(exc)})") from exc
    info = next((v for k, v in storage.items() if k.fqn == _COMMON_OBJECT), None)
    if info is None:
        raise FileNotFoundError(f"no {_COMMON} and no {_COMMON_OBJECT!r} in the checkpoint")
    if getattr(info, "transform_descriptors", None):
        raise OSError(f"{_COMMON_OBJECT!r} is stored transformed ({info.transform_descriptors})")
    with open(Path(iteration) / info.relative_path, "rb") as f:
        f.seek(info.offset)
        data = f.read(info.length)
    if len(data) != info.length:
        raise EOFError(f"{info.relative_path} ends inside {_COMMON_OBJECT!r}")
    return data


@functools.lru_cache(maxsize=8)
def read_args(iteration) -> argparse.Namespace:
    """The training run's arguments, from the common state of ``iteration``
    (:func:`args_location`).

    Raises:
        TeacherError: missing, unreadable, or holding no arguments.
    """
    path = args_location(iteration)
    try:
        with zipfile.ZipFile(io.BytesIO(_common_state_bytes(Path(iteration), path))) as z:
            name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
            state = _ArgsUnpickler(io.BytesIO(z.read(name))).load()
    except (OSError, zipfile.BadZipFile, StopIteration, pickle.UnpicklingError, EOFError) as exc:
        raise TeacherError(
            f"{path}: cannot read the checkpoint's arguments ({type(exc).__name__}: "
            f"{first_line(exc)}); the checkpoint is incomplete or damaged"
        ) from exc
    if isinstance(state, (list, tuple)) and state:  # megatron-core 0.19 saves [state]
        state = state[0]
    args = state.get("args") if isinstance(state, dict) else None
    if not isinstance(args, argparse.Namespace):
        raise TeacherError(f"{path}: holds no training arguments ('args'); not a Megatron-LM "
                           "checkpoint")  # fmt: skip
    return args


def _need(args: argparse.Namespace, where: Path, *names: str) -> None:
    missing = [n for n in names if getattr(args, n, None) is None]
    if missing:
        raise TeacherError(f"{args_location(where)}: the arguments lack {missing}; not a GPT "
                           "checkpoint of Megatron-LM")  # fmt: skip


def _refusals(args: argparse.Namespace) -> list[str]:
    found = []
    for name, fine, what in _REFUSED:
        value = getattr(args, name, fine)
        if value and value != fine:
            found.append(f"{what} (--{name.replace('_', '-')} {value})")
    kind = getattr(args, "position_embedding_type", "learned_absolute")
    if kind not in ("learned_absolute", "rope", "none"):
        found.append(f"position embedding {kind!r}")
    return found


def teacher_spec(path) -> dict:
    """The teacher spec of the Megatron-LM checkpoint at ``path``, read without loading it.

    Keys as a converted teacher's spec (architecture, sizes, positions), plus
    ``checkpoint`` (the iteration directory) and ``args`` (the run's arguments).

    Raises:
        TeacherError: not one, another format, or an architecture this cannot rebuild.
    """
    iteration = find_iteration(path)
    if iteration is None:
        raise TeacherError(f"{path}: not a Megatron-LM checkpoint (no {_TRACKER}, no {_COMMON})")
    _check_format(iteration)
    args = read_args(iteration)
    _need(args, iteration, "num_layers", "hidden_size", "num_attention_heads",
          "padded_vocab_size", "max_position_embeddings")  # fmt: skip
    refused = _refusals(args)
    if refused:
        raise TeacherError(
            f"{iteration}: the checkpoint's model has {'; '.join(refused)}, which megatron-slkd "
            "cannot rebuild on megatron-core's local layer spec; dense GPT models only "
            "(convert it to Hugging Face and use that directory as --teacher)"
        )
    heads = int(args.num_attention_heads)
    groups = int(args.num_query_groups) if getattr(args, "group_query_attention", False) else heads
    return {
        "architecture": "megatron-lm",
        "num_layers": int(args.num_layers),
        "hidden_size": int(args.hidden_size),
        "num_attention_heads": heads,
        "num_query_groups": groups,
        "padded_vocab_size": int(args.padded_vocab_size),
        "max_position_embeddings": int(args.max_position_embeddings),
        "tie_word_embeddings": not getattr(args, "untie_embeddings_and_output_weights", False),
        "checkpoint": str(iteration.resolve()),
        "iteration": iteration.name,
        "args": args,
    }


def tokenizer_from_args(spec: dict, override: str | None = None):
    """The tokenizer the checkpoint's run used (``--tokenizer-type`` and its files).

    ``override`` replaces the recorded tokenizer path (a model file or directory;
    for GPT2BPETokenizer a directory holding the vocab and merge files under their
    recorded names) when the files are not on this machine.

    Raises:
        TeacherError: an unsupported type, or recorded files that are not here.
    """
    from megatron_slkd.data.tokenizers import megatron_tokenizer
    from megatron_slkd.errors import DataPreparationError

    kind, model, vocab, merges = tokenizer_files(spec, override)
    where = args_location(spec["checkpoint"])
    if kind == "NullTokenizer":
        return _null_tokenizer(spec["args"], where)
    try:
        args = spec["args"]
        return megatron_tokenizer(
            kind, model, vocab_file=vocab, merge_file=merges,
            vocab_size=getattr(args, "vocab_size", None),
            legacy=bool(getattr(args, "legacy_tokenizer", False)),
        )  # fmt: skip
    except (DataPreparationError, OSError, ValueError) as exc:
        raise TeacherError(f"{where}: cannot load the run's tokenizer ({first_line(exc)})") from exc


def _null_tokenizer(args, where):
    """The NullTokenizer of the run, by what ``--vocab-size`` meant to the Megatron-LM that
    saved it (not to the installed one): runs whose arguments hold
    ``null_tokenizer_eod_id`` (core_r0.19.0; not core_r0.16.0) count the end-of-document
    id inside ``--vocab-size`` (the last id, unless that flag moved it), older runs add it
    after."""
    from megatron_slkd.data.tokenizers import NullTokenizer

    size = int(args.vocab_size)
    if not hasattr(args, "null_tokenizer_eod_id"):
        return NullTokenizer(size)
    eod = args.null_tokenizer_eod_id
    if eod is not None and int(eod) != size - 1:
        raise TeacherError(
            f"{where}: the run's NullTokenizer has its end-of-document id at {eod}, not at "
            f"the end of its {size} ids; only the last id is supported"
        )
    return NullTokenizer(size - 1)


def tokenizer_files(spec: dict, override: str | None = None) -> tuple:
    """(type, model, vocab file, merge file) of the run's tokenizer, each file checked to
    be on this machine (cheap: nothing is loaded). ``override``: see
    :func:`tokenizer_from_args`.

    Raises:
        TeacherError: an unsupported type, or recorded files that are not here.
    """
    from megatron_slkd.data.tokenizers import MEGATRON_TOKENIZER_TYPES

    args, where = spec["args"], args_location(spec["checkpoint"])
    kind = getattr(args, "tokenizer_type", None)
    if kind not in MEGATRON_TOKENIZER_TYPES:
        raise TeacherError(
            f"{where}: the run used --tokenizer-type {kind}, which megatron-slkd does not read "
            f"(it reads {', '.join(MEGATRON_TOKENIZER_TYPES)})"
        )
    model = getattr(args, "tokenizer_model", None)
    vocab, merges = getattr(args, "vocab_file", None), getattr(args, "merge_file", None)
    if override is not None:
        if kind == "GPT2BPETokenizer":
            vocab, merges = (str(Path(override) / Path(f).name) if f else None
                             for f in (vocab, merges))  # fmt: skip
        else:
            model = override
    recorded = [f for f in (model, vocab, merges) if f and "/" in str(f)]
    gone = [f for f in recorded if not Path(f).exists()]
    if gone:
        what = "the directory holding them" if kind == "GPT2BPETokenizer" else "its path here"
        raise TeacherError(
            f"{where}: the teacher was trained with --tokenizer-type {kind} and "
            f"{', '.join(map(str, gone))}, not on this machine; give the same tokenizer with "
            f"--teacher-tokenizer PATH ({what})"
        )
    return kind, model, vocab, merges


def _config(args: argparse.Namespace, tp: int, pp: int, dtype: torch.dtype, where: str):
    """The run's TransformerConfig, as Megatron-LM derives it, at this run's layout."""
    from megatron.core import ModelParallelConfig
    from megatron.core.transformer import TransformerConfig

    fields = {f.name for f in dataclasses.fields(TransformerConfig) if f.init}
    # The run's parallel layout is not the model: every ModelParallelConfig field is this
    # run's (megatron-core 0.19.0 added tensor_parallel_num_weight_shards, which a run at
    # TP 1 records as 1 and a load at TP 2 refuses).
    layout = {f.name for f in dataclasses.fields(ModelParallelConfig)}
    kw = {n: getattr(args, n) for n in fields - layout if hasattr(args, n)}
    # A dense model takes no MoE setting (mixture-of-experts runs are refused), and
    # megatron-core 0.19.0 refuses two deprecated ones that older runs record by default.
    kw = {k: v for k, v in kw.items() if not isinstance(v, _Opaque) and not k.startswith("moe_")}
    if getattr(args, "swiglu", False):
        kw.update(gated_linear_unit=True, activation_func=F.silu)
    elif getattr(args, "squared_relu", False):
        from megatron.core.activations import squared_relu

        kw["activation_func"] = squared_relu
    if not getattr(args, "group_query_attention", False):
        kw["num_query_groups"] = None
    kw.update({k: v for k, v in _THIS_RUN.items() if k in fields})
    kw.update(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        num_moe_experts=None,
    )
    try:
        return TransformerConfig(**kw)
    except (AssertionError, ValueError, TypeError) as exc:
        raise TeacherError(
            f"{where}: the checkpoint's arguments do not make a model here "
            f"({type(exc).__name__}: {first_line(exc)})"
        ) from exc


def model_parts(spec: dict, dtype: torch.dtype) -> tuple:
    """(TransformerConfig, layer spec, GPTModel position arguments) of the checkpoint's
    architecture at this process's TP/PP sizes, as Megatron-LM's ``gpt_builder`` makes
    them (on the local layer spec).

    Raises:
        TeacherError: the arguments do not make a model here.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    args = spec["args"]
    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    config = _config(args, tp, pp, dtype, spec["checkpoint"])
    layer = get_gpt_layer_local_spec(
        qk_layernorm=bool(getattr(args, "qk_layernorm", False)),
        normalization=getattr(args, "normalization", "LayerNorm"),
    )
    position = dict(
        position_embedding_type=getattr(args, "position_embedding_type", "learned_absolute"),
        rotary_percent=float(getattr(args, "rotary_percent", 1.0)),
        rotary_base=getattr(args, "rotary_base", 10000),
        rope_scaling=bool(getattr(args, "use_rope_scaling", False)),
    )
    return config, layer, position
