"""Content identities that a later run gets for the price of a ``stat``.

Two facts are expensive to establish and cheap to remember: the SHA-256 of a
teacher's weight files (every byte, gigabytes) and the verdict that a dataset's
tokens are those a cache was built on (every token, terabytes at scale). Both
are kept in small checksummed JSON records keyed by what identifies a file
without reading it: its resolved path, size, modification time (ns) and inode.
Any write to a file changes its modification time, so a record whose key still
matches describes the bytes there now.

A key is only trusted once the file has been still for :data:`SETTLE_S`
seconds before the read that the record describes began: a file rewritten in
the same clock tick as that read would keep its time stamp (git's "racily
clean" entries), so such a result is used but not recorded.

Where records live: a file's hash beside it (``.slkd-hashes.json`` in its
directory) where that directory is writable, else under the user's cache
directory (``$SLKD_CACHE_HOME``, else ``$XDG_CACHE_HOME/megatron-slkd``, else
``~/.cache/megatron-slkd``), as are verdicts.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from megatron_slkd.errors import DamagedRecordError
from megatron_slkd.records import atomic_write_text, dump_record, load_record

__all__ = [
    "HASH_RECORD_NAME",
    "SETTLE_S",
    "cache_home",
    "stat_key",
    "settled",
    "recordable",
    "dataset_key",
    "file_sha256",
    "tree_sha256",
    "recall",
    "remember",
]

HASH_RECORD_NAME = ".slkd-hashes.json"  # never part of a directory's own identity
SETTLE_S = 2.0
_BLOCK = 1 << 24


def cache_home() -> Path:
    """The user's megatron-slkd cache directory (records, converted GGUF files)."""
    if os.environ.get("SLKD_CACHE_HOME"):
        return Path(os.environ["SLKD_CACHE_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path("~/.cache").expanduser()) / "megatron-slkd"


def stat_key(path) -> dict:
    """What identifies the bytes of the file at ``path`` without reading them."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return {"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def settled(key: dict, since: float) -> bool:
    """Whether the file ``key`` describes was last written :data:`SETTLE_S` seconds or more
    before ``since`` (a ``time.time()`` taken before it was read)."""
    return key["mtime_ns"] <= (since - SETTLE_S) * 1e9


def recordable(key: dict, since: float) -> bool:
    """Whether a fact read from the file ``key`` describes, by a read begun at ``since``,
    may be remembered: the file had settled before the read and is unchanged since."""
    return settled(key, since) and stat_key(key["path"]) == key


def dataset_key(prefix: str) -> dict:
    """The stat keys of a Megatron dataset's ``.bin`` and ``.idx`` (OSError when one is
    missing)."""
    return {ext: stat_key(prefix + ext) for ext in (".bin", ".idx")}


def _load(path: Path) -> dict | None:
    try:
        return load_record(path, DamagedRecordError)
    except (OSError, DamagedRecordError):
        return None  # absent, unreadable or damaged: the fact is established again


def _store(path: Path, record: dict) -> bool:
    """Write ``record`` at ``path`` whole; False where that is impossible (a read-only
    place, a full disk): a record saves time, its absence costs only time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, dump_record(record, indent=None))
        return True
    except OSError:
        return False


def _name(key) -> str:
    text = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def recall(kind: str, key) -> dict | None:
    """The record of ``kind`` remembered under ``key`` (any JSON value), or None."""
    record = _load(cache_home() / kind / f"{_name(key)}.json")
    return record if record is not None and record.get("key") == key else None


def remember(kind: str, key, value: dict) -> bool:
    """Keep ``value`` under ``key`` in the user's cache directory; False where it cannot."""
    record = {"key": key, "value": value, "at": round(time.time(), 3)}
    return _store(cache_home() / kind / f"{_name(key)}.json", record)


def _hash_record_paths(directory: Path) -> list[Path]:
    """Where the hashes of a directory's files are kept: beside them, then the user's."""
    beside = directory / HASH_RECORD_NAME
    mine = cache_home() / "hashes" / f"{_name(str(directory))}.json"
    return [beside, mine] if os.access(directory, os.W_OK) else [mine]


def _sha256(path: str) -> str:
    h = hashlib.sha256()  # releases the GIL: a directory's files hash in parallel threads
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def _digests(files: list[Path]) -> dict[str, str]:
    """hex SHA-256 of each file (resolved path -> digest), from the records where their
    keys still hold, else read whole and recorded."""
    from concurrent.futures import ThreadPoolExecutor

    keys = {str(f): stat_key(f) for f in files}
    by_dir: dict[Path, list[str]] = {}
    for f, key in keys.items():
        by_dir.setdefault(Path(key["path"]).parent, []).append(f)
    out: dict[str, str] = {}
    todo: list[str] = []
    for directory, names in by_dir.items():
        records = [_load(p) or {} for p in _hash_record_paths(directory)]
        for f in names:
            key = keys[f]
            entry = next((r["files"][key["path"]] for r in records
                          if key["path"] in r.get("files", {})), None)  # fmt: skip
            if entry is not None and entry.get("key") == key:
                out[f] = entry["sha256"]
            else:
                todo.append(f)
    started = time.time()
    workers = max(1, min(len(todo), len(os.sched_getaffinity(0))))
    with ThreadPoolExecutor(workers) as pool:
        for f, digest in zip(todo, pool.map(lambda f: _sha256(keys[f]["path"]), todo),
                             strict=True):  # fmt: skip
            out[f] = digest
    fresh = [f for f in todo if recordable(keys[f], started)]
    for directory, names in by_dir.items():
        new = {keys[f]["path"]: {"key": keys[f], "sha256": out[f]} for f in names if f in fresh}
        if not new:
            continue
        for path in _hash_record_paths(directory):
            old = (_load(path) or {}).get("files", {})
            if _store(path, {"files": {**old, **new}}):
                break
    return out


def file_sha256(path) -> str:
    """``sha256:<hex>`` of every byte of the file at ``path``, read once per content
    (size, modification time, inode) and remembered."""
    return "sha256:" + _digests([Path(path)])[str(Path(path))]


def tree_sha256(directory) -> str:
    """``sha256-tree:<hex>`` of a directory: SHA-256 over its files in name order (all
    levels; the hash records themselves left out), each as its relative name, its size and
    the SHA-256 of every byte (:func:`file_sha256`'s, remembered the same way)."""
    root = Path(directory)
    files = sorted(f for f in root.rglob("*")
                   if f.is_file() and not f.name.startswith(HASH_RECORD_NAME))  # fmt: skip
    digests = _digests(files)
    h = hashlib.sha256()
    for f in files:
        size = os.stat(f).st_size
        h.update(f"{f.relative_to(root).as_posix()}\0{size}\0{digests[str(f)]}\n".encode())
    return "sha256-tree:" + h.hexdigest()
