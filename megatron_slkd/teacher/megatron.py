"""megatron-core GPTModel teachers: conversion from Hugging Face Llama weights, and loading.

``convert_teacher(hf_path, out_dir)`` turns a Llama-family checkpoint (a
directory or a GGUF file) into a megatron-core distributed checkpoint plus a
``slkd_teacher.json`` that records the architecture, the vocabulary and the
source's hash:

- q, k, v (with grouped-query attention) are fused into ``linear_qkv`` in
  megatron-core's layout: per query group, its query heads, then its key,
  then its value;
- gate and up projections are fused into ``linear_fc1`` as ``[gate; up]``
  (megatron-core's sharded state dict splits them per tensor-parallel rank);
- RMSNorm with its epsilon, RoPE with its base, tied embeddings, no biases;
- the vocabulary is padded to a multiple of 128 so the checkpoint loads at
  any tensor-parallel size that divides the padded vocabulary and the heads.

The checkpoint is saved once from an unsharded model; megatron-core's
``dist_checkpointing`` reshards it on load to the tensor and pipeline sizes
of the run. A :class:`MegatronTeacher` returns this rank's vocabulary shard of
the logits, which the sampler consumes through its ``tp_group`` path, so no
rank ever holds full-vocabulary logits.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_slkd.errors import first_line
from megatron_slkd.records import dump_record
from megatron_slkd.teacher.hf import TeacherError, checkpoint_hash
from megatron_slkd.teacher.windows import pad_windows

__all__ = ["convert_teacher", "MegatronTeacher", "is_megatron_teacher", "SPEC_NAME"]

SPEC_NAME = "slkd_teacher.json"
_PAD_MULTIPLE = 128


def is_megatron_teacher(path) -> bool:
    """Whether ``path`` is a directory written by :func:`convert_teacher` or a
    Megatron-LM checkpoint (:mod:`megatron_slkd.teacher.megatron_lm`)."""
    from megatron_slkd.teacher.megatron_lm import is_megatron_lm_checkpoint

    return (Path(path) / SPEC_NAME).is_file() or is_megatron_lm_checkpoint(path)


def teacher_tokenizer(path, megatron: bool, tokenizer_path: str | None = None):
    """The tokenizer of the teacher at ``path``, loaded without the model.
    ``tokenizer_path``: for a Hugging Face teacher, its tokenizer where the model's
    directory holds none; for a Megatron-LM checkpoint, where its recorded tokenizer
    files are on this machine."""
    if not megatron:
        from megatron_slkd.data.tokenizers import HFTokenizer
        from megatron_slkd.errors import DataPreparationError

        try:
            return HFTokenizer(str(tokenizer_path or path))
        except DataPreparationError as exc:
            if tokenizer_path is not None:
                raise
            raise TeacherError(
                f"{exc}; a teacher saved without its tokenizer files "
                "takes the tokenizer from --teacher-tokenizer DIR_OR_NAME_OR_GGUF"
            ) from exc
    from megatron_slkd.data.tokenizers import load_tokenizer

    spec = read_spec(path)
    if spec["architecture"] == "megatron-lm":
        from megatron_slkd.teacher.megatron_lm import tokenizer_from_args

        return tokenizer_from_args(spec, tokenizer_path)
    try:
        return load_tokenizer(spec["tokenizer"])
    except KeyError as exc:
        raise TeacherError(f"{Path(path) / SPEC_NAME}: unreadable teacher spec ({exc})") from exc


def teacher_max_context(path, megatron: bool) -> int | None:
    """The positions the teacher at ``path`` takes, read without loading it; None where
    only the loaded model tells (a hub name, a GGUF file not converted before)."""
    import json

    if megatron:
        return int(read_spec(path)["max_position_embeddings"])
    p = Path(path)
    if p.suffix == ".gguf":
        from megatron_slkd import gguf

        p = gguf.converted(p, "model", create=False) if p.is_file() else None
        if p is None:
            return None
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, ValueError):  # a hub name, a directory without config.json
        return None
    value = config.get("max_position_embeddings") if isinstance(config, dict) else None
    return value if isinstance(value, int) else None


def read_spec(path) -> dict:
    """The checked teacher spec of a converted teacher directory, or the spec of a
    Megatron-LM checkpoint derived from its arguments.

    Raises:
        TeacherError: missing, unreadable or damaged (checksum); a Megatron-LM
            checkpoint this cannot rebuild.
    """
    from megatron_slkd.records import load_record
    from megatron_slkd.teacher.megatron_lm import is_megatron_lm_checkpoint, teacher_spec

    if not (Path(path) / SPEC_NAME).is_file() and is_megatron_lm_checkpoint(path):
        return teacher_spec(path)
    try:
        return load_record(Path(path) / SPEC_NAME, TeacherError)
    except OSError as exc:
        raise TeacherError(f"{Path(path) / SPEC_NAME}: unreadable teacher spec ({exc})") from exc


def megatron_teacher_hash(path) -> str | None:
    """The source checkpoint's hash a converted teacher records, or a Megatron-LM
    checkpoint iteration's own (:func:`~megatron_slkd.teacher.hf.checkpoint_hash`),
    found without loading the model."""
    try:
        spec = read_spec(path)
    except TeacherError:
        return None  # unreadable: loading the teacher reports it
    if spec["architecture"] == "megatron-lm":
        return _iteration_hash(spec["checkpoint"])
    return (spec.get("source") or {}).get("checkpoint_hash")


@functools.lru_cache(maxsize=8)
def _iteration_hash(iteration: str) -> str | None:
    return checkpoint_hash(iteration)


def _spec_from_hf(cfg) -> dict:
    if getattr(cfg, "model_type", "llama") not in ("llama", "mistral", "qwen2"):
        raise TeacherError(f"only Llama-family models convert; got model_type={cfg.model_type!r}")
    heads = cfg.num_attention_heads
    vocab = cfg.vocab_size
    return {
        "architecture": "llama",
        "num_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "ffn_hidden_size": cfg.intermediate_size,
        "num_attention_heads": heads,
        "num_query_groups": getattr(cfg, "num_key_value_heads", None) or heads,
        "kv_channels": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        "layernorm_epsilon": cfg.rms_norm_eps,
        "rotary_base": float(getattr(cfg, "rope_theta", 10000.0)),
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "vocab_size": vocab,
        "padded_vocab_size": -(-vocab // _PAD_MULTIPLE) * _PAD_MULTIPLE,
        "add_qkv_bias": bool(getattr(cfg, "attention_bias", False)),
    }


def check_layout(spec: dict, tp: int, pp: int) -> None:
    """Refuse a TP size that does not divide the teacher's heads, query groups or padded
    vocabulary, or a PP size that does not divide its layers (TeacherError)."""
    for name in ("num_attention_heads", "num_query_groups", "padded_vocab_size"):
        if spec[name] % tp:
            raise TeacherError(
                f"tensor parallel size {tp} does not divide the teacher's {name} "
                f"({spec[name]}); choose a TP size that divides it"
            )
    if spec["num_layers"] % pp:
        raise TeacherError(f"pipeline size {pp} does not divide {spec['num_layers']} layers")


def _transformer_config(spec: dict, tp: int, pp: int, dtype: torch.dtype):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=spec["num_layers"],
        hidden_size=spec["hidden_size"],
        ffn_hidden_size=spec["ffn_hidden_size"],
        num_attention_heads=spec["num_attention_heads"],
        num_query_groups=spec["num_query_groups"],
        kv_channels=spec["kv_channels"],
        normalization="RMSNorm",
        layernorm_epsilon=spec["layernorm_epsilon"],
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec["add_qkv_bias"],
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        use_cpu_initialization=True,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
    )


def _build_model(spec: dict, dtype: torch.dtype):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import (
        get_cuda_rng_tracker,
        model_parallel_cuda_manual_seed,
    )

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    check_layout(spec, tp, pp)
    if spec["architecture"] == "megatron-lm":
        from megatron_slkd.teacher.megatron_lm import model_parts

        config, layer, position = model_parts(spec, dtype)
    else:
        config = _transformer_config(spec, tp, pp, dtype)
        layer = get_gpt_layer_local_spec(normalization="RMSNorm")
        position = dict(position_embedding_type="rope", rotary_base=spec["rotary_base"])
    if not get_cuda_rng_tracker().is_initialized():
        # Attention forks the model-parallel RNG (for dropout, which is off here).
        model_parallel_cuda_manual_seed(0)
    try:
        return GPTModel(
            config=config,
            transformer_layer_spec=layer,
            vocab_size=spec["padded_vocab_size"],
            max_sequence_length=spec["max_position_embeddings"],
            pre_process=ps.is_pipeline_first_stage(),
            post_process=ps.is_pipeline_last_stage(),
            parallel_output=True,
            share_embeddings_and_output_weights=spec["tie_word_embeddings"],
            **position,
        )
    except (AssertionError, ValueError, TypeError, NotImplementedError) as exc:
        where = f"{spec['checkpoint']}: " if "checkpoint" in spec else ""
        raise TeacherError(
            f"{where}the teacher's model cannot be built here ({type(exc).__name__}: "
            f"{first_line(exc)})"
        ) from exc


def _fuse_qkv(q, k, v, spec):
    groups, d = spec["num_query_groups"], spec["kv_channels"]
    per = spec["num_attention_heads"] // groups
    q = q.reshape(groups, per * d, -1)
    k = k.reshape(groups, d, -1)
    v = v.reshape(groups, d, -1)
    return torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])


def _convert_state_dict(hf: dict, spec: dict) -> dict:
    """Hugging Face Llama tensors -> megatron-core GPTModel (local spec) tensors."""
    out = {}
    emb = hf["model.embed_tokens.weight"]
    pad = spec["padded_vocab_size"] - emb.shape[0]
    out["embedding.word_embeddings.weight"] = F.pad(emb, (0, 0, 0, pad))
    for i in range(spec["num_layers"]):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[dst + "input_layernorm.weight"] = hf[src + "input_layernorm.weight"]
        out[dst + "self_attention.linear_qkv.weight"] = _fuse_qkv(
            hf[src + "self_attn.q_proj.weight"],
            hf[src + "self_attn.k_proj.weight"],
            hf[src + "self_attn.v_proj.weight"],
            spec,
        )
        if spec["add_qkv_bias"]:
            out[dst + "self_attention.linear_qkv.bias"] = _fuse_qkv(
                *(hf[src + f"self_attn.{n}_proj.bias"].unsqueeze(-1) for n in "qkv"), spec
            ).squeeze(-1)
        out[dst + "self_attention.linear_proj.weight"] = hf[src + "self_attn.o_proj.weight"]
        out[dst + "pre_mlp_layernorm.weight"] = hf[src + "post_attention_layernorm.weight"]
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]]
        )
        out[dst + "mlp.linear_fc2.weight"] = hf[src + "mlp.down_proj.weight"]
    out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
    if not spec["tie_word_embeddings"]:
        out["output_layer.weight"] = F.pad(hf["lm_head.weight"], (0, 0, 0, pad))
    return out


def convert_teacher(hf_path: str, out_dir) -> dict:
    """Convert a Hugging Face Llama-family model to a megatron-core teacher checkpoint.

    Must run in a process where ``torch.distributed`` and megatron-core's
    ``parallel_state`` are initialized with TP = PP = 1 (the CLI does this).

    Returns:
        The teacher spec written to ``out_dir/slkd_teacher.json``.
    """
    from megatron.core import dist_checkpointing

    from megatron_slkd.teacher.hf import HFTeacher

    hf = HFTeacher(hf_path)
    spec = _spec_from_hf(hf.model.config)
    spec["source"] = {
        "path": str(Path(hf_path).resolve()) if Path(hf_path).exists() else hf_path,
        "checkpoint_hash": hf.checkpoint_hash or checkpoint_hash(hf_path),
    }
    spec["tokenizer"] = {"kind": "huggingface", "path": spec["source"]["path"]}
    model = _build_model(spec, torch.float32)
    converted = _convert_state_dict(hf.model.state_dict(), spec)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise TeacherError(f"conversion left missing={missing[:5]} unexpected={unexpected[:5]}")
    # Written beside the output and renamed into place whole: a conversion stopped midway
    # leaves no directory that reads as a teacher.
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "model").mkdir(parents=True)
        dist_checkpointing.save(model.sharded_state_dict(), str(tmp / "model"))
        (tmp / SPEC_NAME).write_text(dump_record(spec))
        if out.is_dir():
            out.rmdir()  # empty: converted_before refused any other
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return spec


def converted_before(hf_path: str, out_dir) -> dict | None:
    """The spec of ``out_dir`` where it already holds the conversion of ``hf_path`` (a
    rerun: nothing to do), None where it is free (missing or empty); refuses any other
    directory before the model loads, since the conversion would be written into it.

    Raises:
        ConfigError: a file stands at ``out_dir`` or on its path.
        TeacherError: ``out_dir`` holds other files, or the conversion of another model.
    """
    from megatron_slkd.ownership import check_output_dir
    from megatron_slkd.records import load_record

    out = Path(out_dir)
    check_output_dir(out, "converted teacher")
    if not out.is_dir() or not any(out.iterdir()):
        return None
    if not (out / SPEC_NAME).is_file():
        raise TeacherError(
            f"--output {out}: a directory holding other files (not a converted teacher); give "
            "a new or empty directory: the checkpoint is written there whole"
        )
    spec = load_record(out / SPEC_NAME, TeacherError)
    source = spec.get("source") or {}
    have, want = source.get("checkpoint_hash"), checkpoint_hash(hf_path)
    same = have == want if want is not None else source.get("path") == hf_path  # a hub name
    if not same:
        raise TeacherError(
            f"--output {out} holds the conversion of {source.get('path')} "
            f"({have}), not of {hf_path} ({want}); give another --output, or remove it first"
        )
    return spec


class MegatronTeacher:
    """A converted teacher or a Megatron-LM checkpoint on megatron-core, at the run's
    tensor and pipeline sizes.

    ``logits`` returns, per window, this rank's vocabulary shard
    ``[len, padded_V / tp]`` on the last pipeline stage, and ``None`` on the
    others (they run their layers and pass activations on, through
    megatron-core's forward-only pipeline schedule). ``tp_group`` is the group
    the sampler reduces over; ``model_parallel_group`` spans the stages.
    """

    def __init__(self, path, *, dtype: str = "float32", tokenizer=None,
                 tokenizer_path: str | None = None):  # fmt: skip
        """``tokenizer``: the teacher's, when the caller has loaded it;
        ``tokenizer_path``: see :func:`teacher_tokenizer`."""
        from megatron.core import dist_checkpointing
        from megatron.core import parallel_state as ps
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        self.path = Path(path)
        self.spec = read_spec(self.path)
        megatron_lm = self.spec["architecture"] == "megatron-lm"
        self._tokenizer = tokenizer
        if megatron_lm and tokenizer is None:
            self._tokenizer = teacher_tokenizer(self.path, True, tokenizer_path)
        where = self.spec["checkpoint"] if megatron_lm else str(self.path / "model")
        self.model = _build_model(self.spec, getattr(torch, dtype))
        try:
            state = dist_checkpointing.load(self.model.sharded_state_dict(), where)
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 - any failure: unreadable
            again = "the checkpoint is incomplete or damaged" if megatron_lm else (
                "convert the teacher again")  # fmt: skip
            raise TeacherError(
                f"{where}: cannot load the checkpoint ({type(exc).__name__}: "
                f"{first_line(exc)}); {again}"
            ) from exc
        self.model.load_state_dict(state, strict=False)
        self.model.eval()
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.model_parallel_group = ps.get_model_parallel_group()
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.has_logits = ps.is_pipeline_last_stage()
        self.max_context = int(self.spec["max_position_embeddings"])
        if megatron_lm:
            self.vocab_size = int(self._tokenizer.vocab_size)
            self.checkpoint_hash = _iteration_hash(self.spec["checkpoint"])
            # The iteration's name, not its path: nodes may mount the checkpoint elsewhere.
            source = {"megatron_lm_iteration": self.spec["iteration"],
                      "checkpoint_hash": self.checkpoint_hash}  # fmt: skip
        else:
            self.vocab_size = int(self.spec["vocab_size"])
            self.checkpoint_hash = self.spec.get("source", {}).get("checkpoint_hash")
            source = self.spec.get("source")
        self._source = source

    def describe(self) -> dict:
        return {
            "kind": "megatron-core",
            "path": str(self.path.resolve()),
            "architecture": self.spec["architecture"],
            "num_layers": self.spec["num_layers"],
            "hidden_size": self.spec["hidden_size"],
            "vocab_size": self.vocab_size,
            "checkpoint_hash": self.checkpoint_hash,
            "source": self._source,
        }

    def tokenizer(self):
        if self._tokenizer is not None:
            return self._tokenizer
        from megatron_slkd.data.tokenizers import load_tokenizer

        return load_tokenizer(self.spec["tokenizer"])

    @torch.no_grad()
    def logits(self, windows: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """float32 vocabulary-shard logits ``[len(w), padded_V / tp]`` per window
        (last pipeline stage; ``None`` on the other stages)."""
        batch = pad_windows(windows)
        longest = batch.shape[1]
        position_ids = torch.arange(longest).unsqueeze(0).expand_as(batch)
        causal = torch.ones(1, 1, longest, longest, dtype=torch.bool).triu(1)
        if self.pp_size == 1:
            out = self.model(batch, position_ids, causal)  # [b, s, V/tp]
        else:
            out = self._pipeline_forward(batch, position_ids, causal)
            if out is None:
                return None
        return [out[i, : len(w)].float() for i, w in enumerate(windows)]

    def _pipeline_forward(self, batch, position_ids, causal):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, model):
            tokens, pos, mask = next(data_iterator)
            return model(tokens, pos, mask), None  # no loss: the schedule keeps the output

        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([(batch, position_ids, causal)]),
            model=[self.model],
            num_microbatches=1,
            seq_length=batch.shape[1],
            micro_batch_size=batch.shape[0],
            forward_only=True,
        )
        return outputs[0] if self.has_logits else None
