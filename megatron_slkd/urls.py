"""Object-storage URLs are refused, never taken for local paths.

``s3://bucket/cache`` given where a path is expected would otherwise become a
local directory named ``s3:`` and every command would "succeed" on it. Until
caches and datasets can live on object storage, every command refuses a value
that starts with a URL scheme (``s3://``, ``msc://``, ``gs://``, ...).
"""

from __future__ import annotations

import re

from megatron_slkd.errors import ConfigError

__all__ = ["is_url", "refuse_urls"]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_url(value) -> bool:
    """Whether ``value`` is a string that starts with a URL scheme."""
    return isinstance(value, str) and _URL.match(value) is not None


def refuse_urls(values: dict, where: str = "") -> None:
    """Raise :class:`ConfigError` for the first URL among ``values`` (name -> value; values
    may be lists, dicts, or ``PREFIX=DIR`` pairs).

    Raises:
        ConfigError: naming the option and the URL.
    """

    def walk(name, v):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(name, k)
                walk(name, x)
        elif isinstance(v, list | tuple):
            for x in v:
                walk(name, x)
        elif isinstance(v, str):
            for part in v.split("="):
                if is_url(part):
                    raise ConfigError(
                        f"{where}{name} {v}: object-storage URLs are not supported yet; put "
                        "the data and caches on a local or shared POSIX file system (nothing "
                        "was written)"
                    )

    for name, value in values.items():
        walk(name, value)
