"""The megatron-core releases this project runs on, and the one place their APIs differ.

Supported: megatron-core 0.16.x (Python >= 3.10) to 0.19.x (0.17.0 onwards need Python
>= 3.12). Each shim below picks its call by looking at the installed API, not at the
version number, and names the release that changed it; :func:`check_version` refuses a
release outside the range before any model or data loads, since a newer release may
change an API no shim knows yet.
"""

from __future__ import annotations

import functools
import inspect

from megatron_slkd.errors import MegatronVersionError

__all__ = [
    "SUPPORTED",
    "MegatronVersionError",
    "installed_version",
    "tree_version",
    "check_version",
    "cp_split",
]

SUPPORTED = ((0, 16), (0, 19))
"""The oldest and newest (major, minor) releases tested, both included."""


def _parse(version: str) -> tuple[int, int] | None:
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def installed_version() -> str | None:
    """The megatron-core release ``import megatron.core`` would load (a Megatron-LM tree on
    the path before the installed package included), read from its ``package_info.py``
    without importing it; None when there is none."""
    import importlib.util

    spec = importlib.util.find_spec("megatron")
    for location in (spec.submodule_search_locations or []) if spec else []:
        version = tree_version(location)
        if version is not None:
            return version
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return None


def tree_version(megatron_dir: str) -> str | None:
    """The version a source tree's ``megatron/core/package_info.py`` states."""
    import re
    from pathlib import Path

    info = Path(megatron_dir) / "core" / "package_info.py"
    try:
        text = info.read_text()
    except OSError:
        return None
    fields = dict(re.findall(r"^(MAJOR|MINOR|PATCH)\s*=\s*(\d+)", text, re.M))
    if not {"MAJOR", "MINOR"} <= fields.keys():
        return None
    return f"{fields['MAJOR']}.{fields['MINOR']}.{fields.get('PATCH', '0')}"


def check_version(version: str | None = None) -> str | None:
    """Refuse a megatron-core outside :data:`SUPPORTED` (``version``: the installed one).

    Returns:
        The version (None when megatron-core is not installed: the commands that need it
        say so when they import it).

    Raises:
        MegatronVersionError: one line naming the installed version and the range.
    """
    version = installed_version() if version is None else version
    if version is None:
        return None
    (lo_major, lo_minor), (hi_major, hi_minor) = SUPPORTED
    parsed = _parse(version)
    if parsed is None or not (lo_major, lo_minor) <= parsed <= (hi_major, hi_minor):
        raise MegatronVersionError(
            f"megatron-core {version} is installed; megatron-slkd supports "
            f"{lo_major}.{lo_minor} to {hi_major}.{hi_minor}.x (Python 3.10-3.11: "
            f"pip install 'megatron-core>={lo_major}.{lo_minor},<0.17'; Python >= 3.12: "
            f"pip install 'megatron-core>={lo_major}.{lo_minor},<{hi_major}.{hi_minor + 1}')"
        )
    return version


@functools.lru_cache(maxsize=1)
def _cp_takes_hybrid_flag() -> bool:
    from megatron.core.utils import get_batch_on_this_cp_rank

    return "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters


def cp_split(batch: dict) -> dict:
    """``batch`` with its sequence-dimension tensors cut to this context-parallel rank's
    part (megatron-core's ``get_batch_on_this_cp_rank``: per-sequence zigzag, the batch
    holding no ``cu_seqlens``)."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    # The group is given: from megatron-core 0.18.0 a missing one means the world's.
    group = ps.get_context_parallel_group()
    if _cp_takes_hybrid_flag():  # megatron-core 0.18.0 added a required is_hybrid_cp
        return get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=group)
    return get_batch_on_this_cp_rank(batch, cp_group=group)
