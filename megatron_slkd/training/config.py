"""The student pretraining configuration: dataclasses, YAML, command-line overrides.

One :class:`TrainConfig` holds a section per concern (``model``, ``parallel``,
``data``, ``kd``, ``optim``, ``train``, ``eval``, ``checkpoint``, ``log``).
Every field is documented where it is declared; the command line exposes each
one as ``--<section>-<field>`` in kebab case (``--kd-alpha``,
``--parallel-tensor``, ``--train-global-batch-size``) with that docstring as
its help, so the YAML file, the flags and the saved config use the same names.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from pathlib import Path

from megatron_slkd.errors import ConfigError

__all__ = [
    "ModelConfig",
    "ParallelConfig",
    "DataConfig",
    "KDConfig",
    "OptimConfig",
    "LoopConfig",
    "EvalConfig",
    "CheckpointConfig",
    "LogConfig",
    "TrainConfig",
    "load_config",
    "parse_blend",
    "add_config_arguments",
    "config_from_args",
    "config_to_dict",
    "field_docs",
]


@dataclasses.dataclass
class ModelConfig:
    """The student: a megatron-core GPTModel (Llama-style by default)."""

    num_layers: int = 4
    """Transformer layers."""
    hidden_size: int = 128
    """Model width."""
    ffn_hidden_size: int = 384
    """MLP inner width (per branch of the gated unit when ``swiglu``)."""
    num_attention_heads: int = 4
    """Attention heads; the tensor-parallel size must divide it."""
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention; None means one per head."""
    seq_length: int = 256
    """Tokens per training sample."""
    vocab_size: int | None = None
    """Tokenizer vocabulary; None reads it from the data prefix's meta.json."""
    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of this times the tensor-parallel size."""
    swiglu: bool = True
    """SwiGLU MLP (else GELU)."""
    normalization: str = "RMSNorm"
    """RMSNorm or LayerNorm."""
    rotary_base: float = 10000.0
    """RoPE base."""
    tie_embeddings: bool = True
    """Share the input embedding with the output layer."""
    init_method_std: float = 0.02
    """Standard deviation of the weight initialization (output projections are scaled
    by 1/sqrt(2 * num_layers), as in megatron-core)."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    transformer_impl: str = "auto"
    """Layer spec: 'transformer_engine', 'local', or 'auto' (Transformer Engine when it
    imports and the run is on GPU, else local)."""


@dataclasses.dataclass
class ParallelConfig:
    """How the processes of the launch split the model; data parallel takes the rest."""

    tensor: int = 1
    """Tensor-parallel size (divides the heads, query groups and the world size)."""
    pipeline: int = 1
    """Pipeline-parallel size (divides the layers and the world size)."""
    virtual_pipeline: int | None = None
    """Model chunks per pipeline rank for the interleaved schedule (None: not interleaved)."""
    sequence_parallel: bool = False
    """megatron-core sequence parallelism (needs tensor > 1)."""
    distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (megatron-core distributed optimizer)."""
    peer_timeout: float = 60.0
    """Seconds a process of the run may go without a heartbeat (killed, or it or its
    machine hangs) before the others stop with one line naming it, instead of waiting for
    it in a collective (NCCL: 10 minutes). Its own errors reach the others at once."""


@dataclasses.dataclass
class DataConfig:
    """Where the training tokens come from."""

    path: list[str] = dataclasses.field(default_factory=list)
    """Megatron blend: one data prefix, or weight prefix weight prefix ..."""
    split: str = "98,2,0"
    """Train, validation, test shares of each prefix (megatron-core's split string)."""
    train_path: list[str] = dataclasses.field(default_factory=list)
    """Per-split blend (Megatron's --train-data-path): the training data, whole; with it,
    path and split are not used."""
    valid_path: list[str] = dataclasses.field(default_factory=list)
    """Per-split blend (Megatron's --valid-data-path): the validation data, whole."""
    index_cache: str | None = None
    """Directory for megatron-core's dataset index files (default: <checkpoint.dir>/index-cache);
    may be shared by runs: the files are keyed by each dataset's contents too, so a dataset
    rewritten at the same path gets its own."""
    num_workers: int = 1
    """DataLoader worker processes per data-loading rank (0 reads in the training process)."""
    loader_timeout: float = 600.0
    """Seconds the worker processes may take to hand over one micro-batch before the run
    stops with one line (a worker that hangs: a stalled file system, a deadlock), where it
    would wait for ever; a worker stopped or frozen whole while it hands one over, which
    torch's timeout does not reach, stops the run 10 s later. 0 waits for ever. Only with
    num_workers > 0."""
    seed: int = 1234
    """Seed of megatron-core's document and sample shuffles."""
    reset_attention_mask: bool = False
    """Each token attends only to the tokens of its own document within a packed sample
    (Megatron-LM's --reset-attention-mask), so the student conditions on what the teacher
    did: the cache holds each document's distributions given that document's own prefix.
    Local layer spec only (Transformer Engine's causal attention ignores the dataset's
    mask; such a run is refused). The student's rotary positions are relative, so nothing
    like Megatron-LM's --reset-position-ids is needed besides."""
    eod_mask_loss: bool = False
    """No loss where the input token is the end-of-document id: the position that predicts
    the next document's first token, which the cache holds no target for (Megatron-LM's
    --eod-mask-loss)."""
    tokenizer_type: str | None = None
    """For data without a tokenizer record: Megatron's --tokenizer-type (HuggingFaceTokenizer,
    SentencePieceTokenizer, GPTSentencePieceTokenizer, GPT2BPETokenizer, NullTokenizer)."""
    tokenizer_model: str | None = None
    """With tokenizer_type: the HF directory/name/.gguf or SentencePiece .model."""
    vocab_file: str | None = None
    """With tokenizer_type GPT2BPETokenizer: vocab.json."""
    merge_file: str | None = None
    """With tokenizer_type GPT2BPETokenizer: merges.txt."""
    vocab_size: int | None = None
    """With tokenizer_type NullTokenizer: ids below this; the EOD is this id."""
    legacy_tokenizer: bool = False
    """With tokenizer_type SentencePieceTokenizer: as Megatron-LM's --legacy-tokenizer built
    it (<EOD> appended and ending documents) instead of as megatron-core builds it."""
    meta: dict[str, str] = dataclasses.field(default_factory=dict)
    """Data prefix -> its record from `slkd describe-data --output` (read-only data dirs)."""


@dataclasses.dataclass
class KDConfig:
    """Sparse-logit distillation."""

    caches: dict[str, str] = dataclasses.field(default_factory=dict)
    """Data prefix -> sparse-logit cache: a directory, or an s3://BUCKET/PATH or
    msc://PROFILE/PATH URL (credentials from the client's own configuration)."""
    object_cache_dir: str | None = None
    """Where chunks of caches on object storage are kept on this node (default:
    $SLKD_OBJECT_CACHE_DIR or ~/.cache/megatron-slkd/objects); shared by its processes."""
    object_cache_gb: float | None = None
    """Bound of that local cache in GB, least recently used chunks evicted (default:
    $SLKD_OBJECT_CACHE_BYTES or 16 GiB)."""
    readahead_batches: int = 4
    """For caches on object storage: each loader process fetches the chunks of its next
    this many micro-batches ahead, in the order the sampler will ask for them (0: off)."""
    alpha: float = 0.0
    """Weight of the hard-label cross-entropy; the teacher's sparse targets get
    1 - alpha (0: pure distillation)."""
    ce_only: bool = False
    """Train with plain cross-entropy (megatron-core's vocab-parallel CE); caches, when
    given, then only serve the KL-to-teacher evaluation."""
    allow_mixed_teachers: bool = False
    """Train on a blend whose caches come from more than one teacher run (another teacher
    checkpoint, RS beside top-k, another temperature): refused by default, since the
    student would learn a mixture of teachers (a cache left over from an older teacher
    looks like any other)."""
    check_tokens: bool = True
    """Compare every shard's 128-bit token identity with the data before training: one
    read of every token, spread over the ranks, the first time a (dataset, cache) pair is
    met; later starts find its verdict and read none. --no-kd-check-tokens skips it with a
    warning."""


@dataclasses.dataclass
class OptimConfig:
    """megatron-core Adam (distributed when parallel.distributed_optimizer) and its schedule."""

    lr: float = 3e-3
    """Peak learning rate."""
    min_lr: float | None = None
    """Learning rate at the end of the cosine decay; None: a tenth of ``lr`` (so
    ``--optim-lr`` alone sets the whole schedule)."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""


@dataclasses.dataclass
class LoopConfig:
    """Steps and batches."""

    steps: int = 100
    """Optimizer steps."""
    micro_batch_size: int = 2
    """Samples per micro-batch per data-parallel rank."""
    global_batch_size: int = 8
    """Samples per optimizer step (micro batch x data parallel x accumulation)."""
    seed: int = 1234
    """Seed of the weight initialization and the model-parallel RNG."""
    device: str = "auto"
    """'cpu', 'cuda' or 'auto' (cuda when available)."""
    bf16: bool | None = None
    """bf16 weights and compute with fp32 main weights; None: on GPU only."""


@dataclasses.dataclass
class EvalConfig:
    """Held-out evaluation: LM loss, calibration, KL to the teacher."""

    interval: int = 50
    """Evaluate every this many steps (and at the end); 0 only at the end."""
    batches: int = 4
    """Global batches of the validation split per evaluation (the same ones every time)."""
    ece_bins: int = 15
    """Equal-width confidence bins of the expected calibration error (at least 10)."""


@dataclasses.dataclass
class CheckpointConfig:
    """megatron-core dist_checkpointing of model, optimizer, scheduler, data position, RNG."""

    dir: str = "runs/student"
    """Run directory: checkpoints, the resolved config, logs."""
    interval: int = 50
    """Save every this many steps (and at the end); 0 only at the end."""
    resume: bool = True
    """Continue from the latest checkpoint in dir when there is one."""
    keep: int = 2
    """Checkpoints to keep (older ones are deleted after a save succeeds)."""
    lock_timeout: float = 300.0
    """Seconds without heartbeat after which another host's claim on the run directory is
    taken over (one run per directory; a dead owner on this host is taken over at once)."""
    reshardable: bool = False
    """Save the distributed optimizer so a run with another TP/PP layout can resume it
    (gathers its state per data-parallel group; needs Transformer Engine or Apex Adam with
    megatron-core 0.16). Off: each rank saves its own shard; resumable with the same TP/PP."""


@dataclasses.dataclass
class LogConfig:
    """Progress lines, JSONL and TensorBoard."""

    interval: int = 1
    """Print and log training metrics every this many steps."""
    tensorboard: bool = True
    """Write TensorBoard events to <checkpoint.dir>/tensorboard (when tensorboard imports)."""


@dataclasses.dataclass
class TrainConfig:
    """Everything ``slkd train`` needs; sections as in the YAML file."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """The student model."""
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    """Parallel layout."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """Training data."""
    kd: KDConfig = dataclasses.field(default_factory=KDConfig)
    """Distillation."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    """Steps and batches."""
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    """Evaluation."""
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    """Checkpoints."""
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    """Logging."""

    def validate(self) -> None:
        """Refuse settings that cannot run, with what to change."""
        from megatron_slkd.urls import refuse_urls

        refuse_urls(
            {f"{k}.{f}": v for k, sec in config_to_dict(self).items() for f, v in sec.items()},
            "config ",
            allow={"kd.caches": "value"},
        )
        m, p, t = self.model, self.parallel, self.train
        d = self.data
        blends = ((d.path, "data.path"), (d.train_path, "data.train_path"),
                  (d.valid_path, "data.valid_path"))  # fmt: skip
        prefixes = [p for path, name in blends if path for p in parse_blend(path, name)[0]]
        self.kd.caches = key_by_prefix(self.kd.caches, prefixes)
        self.data.meta = key_by_prefix(self.data.meta, prefixes)
        if not self.data.path and not self.data.train_path:
            raise ConfigError(
                "no training data: set data.path (--data-path PREFIX ...) or a per-split blend "
                "(--data-train-path ... --data-valid-path ...)"
            )
        if self.data.path and (self.data.train_path or self.data.valid_path):
            raise ConfigError("give either data.path (with data.split) or per-split blends")
        if self.optim.min_lr is None:  # derived here, so the range check sees its value
            self.optim.min_lr = self.optim.lr / 10
        self._check_ranges()
        groups = m.num_query_groups or m.num_attention_heads
        for what, n in (
            ("num_attention_heads", m.num_attention_heads),
            ("num_query_groups", groups),
        ):
            if n % p.tensor:
                raise ConfigError(
                    f"parallel.tensor={p.tensor} does not divide model.{what}={n}; choose a "
                    "tensor-parallel size that divides it"
                )
        chunks = p.pipeline * (p.virtual_pipeline or 1)
        if m.num_layers % chunks:
            raise ConfigError(
                f"model.num_layers={m.num_layers} is not divisible by pipeline x virtual "
                f"pipeline = {chunks}; change the layers or the pipeline sizes"
            )
        if p.virtual_pipeline is not None and (p.virtual_pipeline < 2 or p.pipeline < 2):
            raise ConfigError("parallel.virtual_pipeline needs pipeline >= 2 and at least 2 chunks")
        if self.data.reset_attention_mask and p.pipeline > 2:
            # Middle stages read no data, so their layers would attend across documents.
            raise ConfigError(
                f"data.reset_attention_mask with parallel.pipeline={p.pipeline}: the middle "
                "pipeline stages read no batch, so their layers could not keep the documents "
                "apart; use at most 2 pipeline stages (virtual stages are fine) or drop "
                "--data-reset-attention-mask"
            )
        if self.data.loader_timeout < 0:
            raise ConfigError(f"data.loader_timeout={self.data.loader_timeout} must be 0 "
                              "(wait for ever) or positive (seconds)")  # fmt: skip
        if not p.peer_timeout > 0:
            raise ConfigError(f"parallel.peer_timeout={p.peer_timeout} must be positive (seconds)")
        if p.sequence_parallel and p.tensor == 1:
            raise ConfigError("parallel.sequence_parallel needs parallel.tensor > 1")
        if p.sequence_parallel and (m.transformer_impl == "local" or not _have_te()):
            raise ConfigError(
                "parallel.sequence_parallel needs the Transformer Engine layer spec (the "
                "local spec's torch norms do not support it); drop "
                "--parallel-sequence-parallel or install transformer_engine"
            )
        if t.global_batch_size % t.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={t.micro_batch_size}"
            )
        if not 0.0 <= self.kd.alpha <= 1.0:
            raise ConfigError(f"kd.alpha={self.kd.alpha} must lie in [0, 1]")
        if self.eval.ece_bins < 10:
            raise ConfigError(f"eval.ece_bins={self.eval.ece_bins}: use at least 10 bins")
        if m.transformer_impl not in ("auto", "local", "transformer_engine"):
            raise ConfigError("model.transformer_impl must be auto, local or transformer_engine")

    # Settings that mean nothing outside these bounds (a micro-batch of 0 divides by zero
    # in the schedule, a negative learning rate trains away from the data): the smallest
    # value each may take, and whether that bound itself is allowed.
    _AT_LEAST = {
        "parallel.tensor": (1, True), "parallel.pipeline": (1, True), "train.steps": (1, True),
        "model.num_layers": (1, True), "model.hidden_size": (1, True),
        "model.ffn_hidden_size": (1, True), "model.num_attention_heads": (1, True),
        "model.num_query_groups": (1, True), "model.seq_length": (1, True),
        "model.vocab_size": (1, True), "model.make_vocab_size_divisible_by": (1, True),
        "model.rotary_base": (0, False), "model.init_method_std": (0, False),
        "model.hidden_dropout": (0, True), "model.attention_dropout": (0, True),
        "data.num_workers": (0, True), "kd.readahead_batches": (0, True),
        "kd.object_cache_gb": (0, False), "optim.lr": (0, True), "optim.min_lr": (0, True),
        "optim.warmup_steps": (0, True), "optim.weight_decay": (0, True),
        "optim.adam_beta1": (0, True), "optim.adam_beta2": (0, True),
        "optim.adam_eps": (0, False), "optim.clip_grad": (0, True),
        "train.micro_batch_size": (1, True), "train.global_batch_size": (1, True),
        "eval.interval": (0, True), "eval.batches": (0, True), "checkpoint.interval": (0, True),
        "checkpoint.keep": (1, True), "checkpoint.lock_timeout": (0, False),
        "log.interval": (1, True), "data.seed": (0, True), "train.seed": (0, True),
    }  # fmt: skip

    def _check_ranges(self) -> None:
        import math

        for name, (low, inclusive) in self._AT_LEAST.items():
            section, field = name.split(".")
            value = getattr(getattr(self, section), field)
            if value is None:  # unset: its default is derived elsewhere
                continue
            ok = math.isfinite(value) and (value >= low if inclusive else value > low)
            if not ok:
                bound = f"at least {low}" if inclusive else f"above {low}"
                flag = "--" + name.replace(".", "-").replace("_", "-")
                raise ConfigError(f"{name}={value} must be {bound} ({flag})")
        for name in ("hidden_dropout", "attention_dropout"):
            if getattr(self.model, name) >= 1:
                raise ConfigError(f"model.{name}={getattr(self.model, name)} must be below 1")
        if not (self.optim.adam_beta1 < 1 and self.optim.adam_beta2 < 1):
            raise ConfigError("optim.adam_beta1 and optim.adam_beta2 must be below 1")
        if self.data.seed >= 2**32:  # megatron-core shuffles with numpy's RandomState
            raise ConfigError(f"data.seed={self.data.seed} must be below 2**32 (--data-seed)")
        if self.optim.min_lr > self.optim.lr:
            raise ConfigError(f"optim.min_lr={self.optim.min_lr} is above optim.lr="
                              f"{self.optim.lr} (megatron-core's scheduler asserts on it); lower "
                              "--optim-min-lr with --optim-lr")  # fmt: skip

    def check_world(self, world: int) -> int:
        """The data-parallel size for ``world`` processes; refuses layouts that do not fit."""
        p, t = self.parallel, self.train
        mp = p.tensor * p.pipeline
        if world % mp:
            raise ConfigError(
                f"tensor x pipeline = {p.tensor} x {p.pipeline} = {mp} does not divide the "
                f"{world} processes of the launch; launch a multiple of {mp} processes"
            )
        dp = world // mp
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} is not a multiple of micro batch "
                f"x data parallel = {t.micro_batch_size} x {dp}; change the batch sizes"
            )
        if p.pipeline > 1 and p.virtual_pipeline:
            micro = t.global_batch_size // (t.micro_batch_size * dp)
            if micro % p.pipeline:
                raise ConfigError(
                    f"the interleaved schedule needs micro-batches per step ({micro}) to be a "
                    f"multiple of parallel.pipeline={p.pipeline}"
                )
        return dp


# ---------------------------------------------------------------- docs and types


def _have_te() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


def field_docs(cls) -> dict[str, str]:
    """The docstring written under each field of dataclass ``cls``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unwrap(tp):
    """(base type, optional) of an annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _sections():
    hints = typing.get_type_hints(TrainConfig)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(TrainConfig)]


def parse_blend(path: list[str], name: str) -> tuple[list[str], list[float] | None]:
    """Megatron's blend list: ``PREFIX...`` or ``WEIGHT PREFIX WEIGHT PREFIX ...``."""
    try:
        float(path[0])
    except ValueError:
        return list(path), None
    if len(path) % 2:
        raise ConfigError(f"{name}: weights and prefixes must alternate, got {path}")
    return [path[i + 1] for i in range(0, len(path), 2)], [
        float(path[i]) for i in range(0, len(path), 2)
    ]


def key_by_prefix(pairs: dict[str, str], prefixes: list[str]) -> dict[str, str]:
    """``pairs`` from ``PREFIX=VALUE`` flags, re-split where a data prefix holds ``=``.

    A flag is split at its first ``=``; where the key so found is not a prefix of the
    run but the entry splits at a later ``=`` into one (``data/lang=en/corpus=cache``),
    that split is taken. A key that names a prefix's files by another spelling
    (``./data/corpus`` for ``data/corpus``, or its absolute path) is keyed by the prefix
    as the blend spells it. Entries that match no prefix are kept as they were.
    """
    import os

    from megatron_slkd.storage import is_url

    def same(path: str) -> str:
        return path if is_url(path) else os.path.normpath(os.path.abspath(path))

    known = set(prefixes)
    spelled = {same(p): p for p in prefixes}
    out = {}
    for key, value in pairs.items():
        if key not in known:
            entry = f"{key}={value}"
            cuts = [i for i, c in enumerate(entry) if c == "=" and entry[:i] in known]
            if cuts:  # the longest prefix: a/b=c and a/b=c/d=x mean the prefix a/b=c
                key, value = entry[: cuts[-1]], entry[cuts[-1] + 1 :]
            else:
                key = spelled.get(same(key), key)
        out[key] = value
    return out


def _coerce(value, tp, where: str):
    base, optional = _unwrap(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: a value is required")
    origin = typing.get_origin(base)
    try:
        if origin is list:
            if isinstance(value, str):
                value = value.split()
            return [str(v) for v in value]
        if origin is dict:
            if isinstance(value, dict):
                return {str(k): str(v) for k, v in value.items()}
            if isinstance(value, str):
                value = value.split()
            pairs = [str(v).split("=", 1) for v in value]
            if any(len(p) != 2 for p in pairs):
                raise ValueError("expected KEY=VALUE entries")
            return dict(pairs)
        if base is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(f"not a boolean: {value!r}")
            return bool(value)
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"not an integer: {value}")
        return base(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _from_dict(data: dict, source: str) -> TrainConfig:
    cfg = TrainConfig()
    unknown = set(data) - {name for name, _ in _sections()}
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}")
    for name, cls in _sections():
        section = data.get(name) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping")
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        bad = set(section) - known
        if bad:
            raise ConfigError(
                f"{source}: unknown {name} field(s) {sorted(bad)}; known: {sorted(known)}"
            )
        target = getattr(cfg, name)
        for key, value in section.items():
            setattr(target, key, _coerce(value, hints[key], f"{source}: {name}.{key}"))
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict:
    """The config as plain YAML-ready data."""
    return dataclasses.asdict(cfg)


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """A config from a YAML file (optional) with ``{"section.field": value}`` overrides."""
    import yaml

    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections")
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        data.setdefault(section, {})
        data[section][key] = value
    return _from_dict(data, str(path) if path else "config")


# ---------------------------------------------------------------- command line


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` plus one ``--<section>-<field>`` flag per config field."""
    parser.add_argument(
        "--config", metavar="YAML", help="YAML file with the sections below; flags override it"
    )
    for name, cls in _sections():
        group = parser.add_argument_group(f"{name}: {cls.__doc__.splitlines()[0]}")
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = f"--{name}-{f.name}".replace("_", "-")
            base, _ = _unwrap(hints[f.name])
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            helptext = f"{docs.get(f.name, '')} (default: {default})"
            dest = f"cfg__{name}__{f.name}"
            origin = typing.get_origin(base)
            if base is bool:
                group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                                   default=None, help=helptext)  # fmt: skip
            elif origin in (list, dict):
                group.add_argument(flag, dest=dest, nargs="+", default=None, help=helptext,
                                   metavar="PREFIX=DIR" if origin is dict else "VALUE")  # fmt: skip
            else:
                group.add_argument(flag, dest=dest, default=None, help=helptext,
                                   metavar=base.__name__.upper())  # fmt: skip


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The YAML file of ``--config`` with every flag that was given applied on top."""
    overrides = {}
    for key, value in vars(args).items():
        if key.startswith("cfg__") and value is not None:
            _, section, field = key.split("__")
            overrides[f"{section}.{field}"] = value
    return load_config(args.config, overrides)
