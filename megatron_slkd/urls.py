"""Which options may hold object-storage URLs; every other URL is refused, never taken
for a local path.

``s3://bucket/cache`` given where a path is expected would otherwise become a
local directory named ``s3:`` and the command would "succeed" on it. Caches
may be read from ``s3://`` and ``msc://`` (:mod:`megatron_slkd.storage`) by
the options each caller lists; datasets, outputs and checkpoints stay on a
local or shared POSIX file system, and schemes other than those two are
refused everywhere.
"""

from __future__ import annotations

from megatron_slkd.errors import ConfigError
from megatron_slkd.storage import check_url, is_object_url, is_url

__all__ = ["is_url", "refuse_urls"]


def refuse_urls(values: dict, where: str = "", allow: dict[str, str] | None = None) -> None:
    """Raise :class:`ConfigError` for the first URL among ``values`` (name -> value; values
    may be lists, dicts, or ``KEY=VALUE`` pairs) that the option may not hold.

    Args:
        allow: option name -> where its ``s3://``/``msc://`` URLs may be: ``"any"`` (a
            cache given alone or in any part), ``"value"`` (the ``DIR`` of ``PREFIX=DIR``
            and dict values), ``"key"`` (the ``CACHE`` of ``CACHE=PREFIX`` and dict keys).

    Raises:
        ConfigError: naming the option and the URL.
    """
    allow = allow or {}

    def check(name, v, part, position):
        if not is_url(part):
            return
        check_url(part, f"{where}{name} ")  # another scheme: refused everywhere
        if allow.get(name) in ("any", position) and is_object_url(part):
            return
        raise ConfigError(
            f"{where}{name} {v}: object-storage URLs are not supported here; only caches "
            "are read from or written to s3:// or msc:// (put data and checkpoints on a local "
            "or shared POSIX file system; nothing was written)"
        )

    def walk(name, v, position="alone"):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(name, k, "key")
                walk(name, x, "value")
        elif isinstance(v, list | tuple):
            for x in v:
                walk(name, x, position)
        elif isinstance(v, str):
            if "=" in v and position == "alone":
                key, value = v.split("=", 1)
                check(name, v, key, "key")
                check(name, v, value, "value")
            else:
                check(name, v, v, position)

    for name, value in values.items():
        walk(name, value)
