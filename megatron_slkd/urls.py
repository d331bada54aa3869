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


def refuse_urls(values: dict, where: str = "", allow: tuple[str, ...] = ()) -> None:
    """Raise :class:`ConfigError` for the first URL among ``values`` (name -> value; values
    may be lists, dicts, or ``PREFIX=DIR`` pairs) that the option may not hold.

    Args:
        allow: option names whose values (the ``DIR`` of ``PREFIX=DIR`` pairs, or dict
            values) may be ``s3://``/``msc://`` URLs.

    Raises:
        ConfigError: naming the option and the URL.
    """

    def refuse(name, v, value):
        check_url(value, f"{where}{name} ")  # another scheme: refused everywhere
        raise ConfigError(
            f"{where}{name} {v}: object-storage URLs are not supported here; only caches "
            "are read from s3:// or msc:// (put data, outputs and checkpoints on a local or "
            "shared POSIX file system; nothing was written)"
        )

    def walk(name, v, may_be_url=False):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(name, k)
                walk(name, x, name in allow)
        elif isinstance(v, list | tuple):
            for x in v:
                walk(name, x, may_be_url)
        elif isinstance(v, str):
            parts = v.split("=", 1) if "=" in v and not is_url(v) else [v]
            for i, part in enumerate(parts):
                if not is_url(part):
                    continue
                value_part = len(parts) == 1 or i == 1
                if (may_be_url or name in allow) and value_part and is_object_url(part):
                    check_url(part, f"{where}{name} ")
                    continue
                refuse(name, v, part)

    for name, value in values.items():
        walk(name, value)
