"""The cache manifest (``manifest.json``) and the per-shard records it lists.

A shard that is finished but not yet merged has a sidecar ``<shard>.json``
holding a manifest with that one shard; ``merge-cache`` combines sidecars (or
manifests) into the ``manifest.json`` of a complete cache.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from megatron_slkd.cache.format import TOKEN_HASH_NAME, Encoding
from megatron_slkd.errors import CacheFormatError
from megatron_slkd.records import dump_record, load_record, parse_record

__all__ = ["Manifest", "FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_NAME"]

FORMAT_NAME = "megatron-slkd-cache"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)  # version 1: shards record CRC-32 token checksums only
MANIFEST_NAME = "manifest.json"

_SHARD_KEYS = {
    "file": str,
    "doc_start": int,
    "doc_end": int,
    "num_tokens": int,
    "num_entries": int,
    "size_bytes": int,
    "token_crc32": int,
    "index_crc32": int,
    "file_crc32": int,
}


@dataclasses.dataclass
class Manifest:
    """Everything a reader needs to trust a cache directory.

    Attributes:
        dataset: ``prefix``, ``num_documents`` and ``num_tokens`` of the
            IndexedDataset the cache describes.
        tokenizer: ``fingerprint`` and ``vocab_size`` (plus how to load it).
        teacher: free-form description of the teacher (name, checkpoint hash).
        sampling: ``method``, ``num_samples``, ``k``, ``temperature``, ``seed``.
        encoding: entry packing (:class:`~megatron_slkd.cache.format.Encoding`).
        shards: per-shard records, sorted by ``doc_start``: ``file``,
            ``doc_start``, ``doc_end`` (exclusive), ``num_tokens``,
            ``num_entries``, ``size_bytes``, ``token_crc32`` and ``token_xxh128``
            (of the dataset tokens it covers; the latter absent in caches written
            before format version 2), ``index_crc32``, ``file_crc32``.
        extra: anything else (for example what a thinned cache derives from).
    """

    dataset: dict[str, Any]
    tokenizer: dict[str, Any]
    teacher: dict[str, Any]
    sampling: dict[str, Any]
    encoding: Encoding
    shards: list[dict[str, Any]]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        d = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "dataset": self.dataset,
            "tokenizer": self.tokenizer,
            "teacher": self.teacher,
            "sampling": self.sampling,
            "encoding": self.encoding.to_json(),
            "shards": self.shards,
            "extra": self.extra,
        }
        return dump_record(d)

    def unproven_shards(self) -> list[str]:
        """The shards whose dataset tokens are recorded by CRC-32 only (written before
        format version 2): a dataset whose tokens differ but collide in CRC-32 passes
        their check."""
        return [s["file"] for s in self.shards if not s.get(TOKEN_HASH_NAME)]

    def teacher_figures(self) -> dict[str, float] | None:
        """The teacher's mean figures recorded at build, over a sample of positions
        (every 8th): ``nll`` of the next token, ``entropy``, ``sample_kl`` (the floor
        of the KL to this cache: a student equal to the teacher scores it) and
        ``positions``. None when a shard has no record of them (a cache thinned,
        remapped or written by an older version)."""
        totals: dict[str, float] = {}
        for rec in self.shards:
            st = rec.get("teacher_stats")
            if not isinstance(st, dict) or "positions" not in st:
                return None
            for k, v in st.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        n = totals.pop("positions", 0.0)
        if not n:
            return None
        return {"positions": int(n), **{k: v / n for k, v in totals.items()}}

    def compatibility_key(self) -> dict[str, Any]:
        """What two shards must share to belong to one cache: everything but where files
        were (paths differ between machines, clones and moved directories; hashes and
        fingerprints identify the content)."""

        def located(d: dict) -> dict:
            return {k: v for k, v in d.items() if k not in ("path", "prefix")}

        return {  # the settings a user changes first come first in messages
            "sampling": self.sampling,
            "teacher": located(self.teacher),
            "dataset": located(self.dataset),
            "tokenizer": located(self.tokenizer),
            "encoding": self.encoding.to_json(),
        }

    @classmethod
    def load(cls, path) -> Manifest:
        """Read and validate a manifest or shard sidecar.

        Raises:
            CacheFormatError: missing, unparsable, wrong format or version, or a
                field of the wrong type.
        """
        path = Path(path)
        try:
            d = load_record(path, CacheFormatError)
        except FileNotFoundError as exc:
            raise CacheFormatError(
                f"{path}: no manifest; a cache directory needs {MANIFEST_NAME} "
                "(run `slkd merge-cache` over the shard directories to write it)"
            ) from exc
        return cls.from_record(d, path)

    @classmethod
    def read(cls, cache) -> Manifest:
        """The manifest of the cache at ``cache``: a directory or an ``s3://``/``msc://`` URL.

        Raises:
            CacheFormatError: as :meth:`load`.
            ObjectNotFoundError: no manifest at the URL (not a cache, or not finished).
        """
        from megatron_slkd.storage import ObjectStore, is_object_url, join

        if not is_object_url(str(cache)):
            return cls.load(Path(cache) / MANIFEST_NAME)
        from megatron_slkd.errors import ObjectNotFoundError

        store = ObjectStore(str(cache))
        where = join(store.url, MANIFEST_NAME)
        try:
            text = store.read(MANIFEST_NAME).decode("utf-8", errors="replace")
        except ObjectNotFoundError as exc:
            raise ObjectNotFoundError(
                f"{where}: no manifest; not a cache, or one still being written (its manifest "
                "is published last)"
            ) from exc
        return cls.parse(text, where)

    @classmethod
    def parse(cls, text: str, where) -> Manifest:
        """:meth:`load` from the record's text (read from object storage); ``where`` names it."""
        return cls.from_record(parse_record(text, where, CacheFormatError), where)

    @classmethod
    def from_record(cls, d: dict, path) -> Manifest:
        """A manifest from its parsed record; ``path`` names it in errors."""
        try:
            if d.get("format") != FORMAT_NAME:
                raise CacheFormatError(f"{path}: not a {FORMAT_NAME} manifest")
            if d.get("format_version") not in READ_VERSIONS:
                raise CacheFormatError(
                    f"{path}: manifest version {d.get('format_version')}, this reader knows "
                    f"{', '.join(map(str, READ_VERSIONS))}; use a megatron-slkd release that "
                    "matches the cache"
                )
            m = cls(
                dataset=dict(d["dataset"]),
                tokenizer=dict(d["tokenizer"]),
                teacher=dict(d["teacher"]),
                sampling=dict(d["sampling"]),
                encoding=Encoding.from_json(d["encoding"]),
                shards=[dict(s) for s in d["shards"]],
                extra=dict(d.get("extra", {})),
            )
            for key in ("num_documents", "num_tokens"):
                if not isinstance(m.dataset.get(key), int) or m.dataset[key] < 0:
                    raise CacheFormatError(f"{path}: dataset.{key} must be a non-negative integer")
            if not isinstance(m.tokenizer.get("vocab_size"), int):
                raise CacheFormatError(f"{path}: tokenizer.vocab_size must be an integer")
            for i, s in enumerate(m.shards):
                for key, typ in _SHARD_KEYS.items():
                    if not isinstance(s.get(key), typ) or isinstance(s.get(key), bool):
                        raise CacheFormatError(
                            f"{path}: shards[{i}].{key} missing or not {typ.__name__}"
                        )
                xxh = s.get(TOKEN_HASH_NAME)
                if xxh is not None and not _is_hex128(xxh):
                    raise CacheFormatError(
                        f"{path}: shards[{i}].{TOKEN_HASH_NAME} must be 32 hex digits"
                    )
                if "/" in s["file"] or s["file"].startswith("."):
                    raise CacheFormatError(f"{path}: shards[{i}].file must be a plain file name")
                if not 0 <= s["doc_start"] <= s["doc_end"]:
                    raise CacheFormatError(f"{path}: shards[{i}] has an empty or negative range")
        except CacheFormatError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CacheFormatError(
                f"{path}: malformed manifest ({type(exc).__name__}: {exc})"
            ) from exc
        m.shards.sort(key=lambda s: s["doc_start"])
        return m


def _is_hex128(value) -> bool:
    return (
        isinstance(value, str)
        and len(value) == 32
        and all(c in "0123456789abcdef" for c in value)
    )
