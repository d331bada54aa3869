"""Merge shard directories into one cache (``slkd merge-cache``).

Inputs are directories holding finished shards with their ``<shard>.json``
sidecars, or whole caches with a ``manifest.json``. Every shard must share the
dataset, tokenizer, teacher, sampling parameters and encoding; together they
must cover every document of the dataset exactly once. Shard files are
hard-linked into the output directory (copied across file systems), and the
manifest is written last, atomically: an output with a ``manifest.json`` is
complete.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from megatron_slkd.cache.format import TOKEN_HASH_NAME
from megatron_slkd.cache.manifest import MANIFEST_NAME, Manifest
from megatron_slkd.cache.reader import ShardFile
from megatron_slkd.errors import CacheCoverageError, CacheFormatError, CacheMismatchError
from megatron_slkd.records import atomic_write_text

__all__ = ["merge_cache", "collect_shards", "coverage_problems"]


def collect_shards(inputs: list) -> tuple[Manifest, list[tuple[Path, dict]]]:
    """The common manifest of ``inputs`` and every (directory, shard record) found.

    Raises:
        CacheFormatError: an input holds no shard record.
        CacheMismatchError: two shards were built with different parameters.
    """
    found: list[tuple[Path, Manifest, Path]] = []
    for item in inputs:
        d = Path(item)
        if not d.is_dir():
            raise CacheFormatError(f"{d}: not a directory")
        sources = [d / MANIFEST_NAME] if (d / MANIFEST_NAME).exists() else []
        sources += sorted(d.glob("*.slkd.json"))
        if not sources:
            raise CacheFormatError(f"{d}: no {MANIFEST_NAME} and no shard sidecars (*.slkd.json)")
        found += [(d, Manifest.load(s), s) for s in sources]
    base_dir, base, base_src = found[0]
    key = base.compatibility_key()
    for _, m, src in found[1:]:
        other = m.compatibility_key()
        for field in key:
            if other[field] != key[field]:
                raise CacheMismatchError(
                    f"{src} and {base_src} differ in {field}: {other[field]} vs {key[field]}; "
                    "only shards of one teacher run over one dataset can be merged"
                )
    shards: dict[tuple, tuple[Path, dict]] = {}
    for d, m, _ in found:
        for s in m.shards:
            # The same shard reached twice (a sidecar next to a manifest) counts once.
            same = (s["doc_start"], s["doc_end"], s["file_crc32"], s.get(TOKEN_HASH_NAME))
            shards.setdefault(same, (d, s))
    return base, sorted(shards.values(), key=lambda x: (x[1]["doc_start"], x[1]["doc_end"]))


def coverage_problems(records: list[dict], num_documents: int) -> list[str]:
    """Gaps and overlaps of sorted shard records over ``[0, num_documents)``."""
    problems, covered = [], 0
    for s in records:
        a, b = s["doc_start"], s["doc_end"]
        if a > covered:
            problems.append(f"gap: documents {covered}..{a - 1} are in no shard")
        elif a < covered:
            problems.append(
                f"overlap: documents {a}..{min(b, covered) - 1} are in two shards "
                f"(the second is {s['file']})"
            )
        covered = max(covered, b)
    if covered < num_documents:
        problems.append(f"gap: documents {covered}..{num_documents - 1} are in no shard")
    return problems


def merge_cache(inputs: list, output) -> dict:
    """Merge ``inputs`` into the cache directory ``output``; returns a report.

    Raises:
        CacheCoverageError: gaps or overlaps (all of them are listed).
        CacheMismatchError, CacheFormatError: see :func:`collect_shards`.
    """
    base, found = collect_shards(inputs)
    records = [s for _, s in found]
    problems = coverage_problems(records, base.dataset["num_documents"])
    if problems:
        raise CacheCoverageError("cannot merge: " + "; ".join(problems))
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    names = [s["file"] for s in records]
    if len(set(names)) != len(names):
        raise CacheMismatchError(f"two different shards share a file name among {names}")
    linked = copied = 0
    for d, s in found:
        ShardFile(d, s, base)  # header, size and index are checked before linking
        src, dst = d / s["file"], out / s["file"]
        if dst.exists() and (os.path.samefile(src, dst) or _same_bytes(src, dst)):
            continue  # linked or copied by an earlier, interrupted merge
        if dst.exists():
            raise CacheMismatchError(f"{dst}: a different file of that name is already there")
        try:
            os.link(src, dst)
            linked += 1
        except OSError:
            _copy(src, dst)
            copied += 1
    manifest = dataclasses.replace(base, shards=records)
    atomic_write_text(out / MANIFEST_NAME, manifest.to_json())
    return {
        "output": str(out),
        "shards": len(records),
        "documents": base.dataset["num_documents"],
        "tokens": sum(s["num_tokens"] for s in records),
        "bytes": sum(s["size_bytes"] for s in records),
        "linked": linked,
        "copied": copied,
    }


def _copy(src: Path, dst: Path) -> None:
    """Copy under a temporary name, then rename: a shard file is whole or absent. (One
    name: the output has one owner, and a retry overwrites what a killed one left.)"""
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        shutil.copy2(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dst)


def _same_bytes(a: Path, b: Path, block: int = 1 << 24) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x = fa.read(block)
            if x != fb.read(block):
                return False
            if not x:
                return True
