"""Checksummed JSON records: every small JSON file the tools write carries its own CRC.

A record is a JSON object with a ``"checksum"`` member, ``"crc32:<8 hex>"``:
the CRC-32 (zlib) of the record's *canonical form*, the UTF-8 bytes of
``json.dumps(record_without_checksum, sort_keys=True, separators=(",", ":"),
ensure_ascii=False)``. Readers recompute it, so a flipped byte, an edited
value or a truncated file is a typed error naming the file, never a silent
default. Records written before checksums existed (no ``"checksum"`` member)
are still read.

Used by the cache manifest and shard sidecars, the shard writer's
``progress.json``, the dataset records (``.meta.json``) and the training run's
``checkpoints/latest``. :func:`atomic_write_text` writes them (and any other
small file) whole or not at all.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

from megatron_slkd.errors import SlkdError

__all__ = [
    "CHECKSUM_KEY",
    "record_checksum",
    "dump_record",
    "parse_record",
    "load_record",
    "atomic_write_text",
    "fsync_dir",
]

CHECKSUM_KEY = "checksum"


def record_checksum(record: dict) -> str:
    """``crc32:<hex>`` of the canonical form of ``record`` (its checksum member left out)."""
    body = {k: v for k, v in record.items() if k != CHECKSUM_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"crc32:{zlib.crc32(text.encode('utf-8')):08x}"


def dump_record(record: dict, *, indent: int | None = 1) -> str:
    """``record`` as JSON text with its checksum (a trailing newline included)."""
    body = {k: v for k, v in record.items() if k != CHECKSUM_KEY}
    return json.dumps({**body, CHECKSUM_KEY: record_checksum(body)}, indent=indent,
                      sort_keys=True) + "\n"  # fmt: skip


def parse_record(text: str, where, error: type[SlkdError]) -> dict[str, Any]:
    """Parse and check a record; ``error`` (naming ``where``) when it is damaged."""
    try:
        record = json.loads(text)
    except ValueError as exc:
        raise error(f"{where}: damaged or truncated record ({exc}); rewrite or remove it") from exc
    if not isinstance(record, dict):
        raise error(f"{where}: not a JSON object; rewrite or remove it")
    have = record.get(CHECKSUM_KEY)
    if have is not None and have != record_checksum(record):
        raise error(
            f"{where}: checksum mismatch (the record says {have}, its content "
            f"{record_checksum(record)}): the file was damaged or edited; rewrite or remove it"
        )
    return record


def load_record(path, error: type[SlkdError]) -> dict[str, Any]:
    """Read and check the record at ``path`` (``FileNotFoundError`` passes through)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise error(f"{path}: unreadable ({exc})") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: damaged record (not UTF-8: {exc}); rewrite or remove it") from exc
    return parse_record(text, path, error)


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file, fsync and rename.

    The temporary name carries the process id, so concurrent writers of the
    same file (several ranks finishing a cache) never share a temporary.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # out of space, or interrupted: leave nothing half-written behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)
