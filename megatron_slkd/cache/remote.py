"""Shards on object storage: chunk byte ranges, a bounded local cache, read-ahead.

A shard at ``s3://...`` or ``msc://...`` is read in chunks, the unit each
chunk CRC covers (``chunk_tokens`` tokens: their count bytes and their entry
bytes). Opening fetches each shard's header and index (ranged requests,
shards in parallel) and checks them as a local file's are. A read fetches the
chunks its spans touch that the local cache lacks (a run of consecutive
chunks in two ranged requests: their count bytes, their entry bytes), checks
every fetched chunk's CRC before keeping it, and decodes from a compact copy
of just those chunks. :meth:`RemoteShard.prefetch` starts the same fetches in
background threads and returns at once; the dataset calls it with the spans
of the samples its DataLoader worker will be asked for next.

The local cache is a directory shared by every process of a node
(``SLKD_OBJECT_CACHE_DIR``, default ``~/.cache/megatron-slkd/objects``; chunks
under its ``chunks/``, beside the writers' ``staging/`` and ``inputs/``, which
are never evicted): one file per verified chunk, written under a temporary name and renamed,
touched on every use, and trimmed oldest-first to 80% of its bound
(``SLKD_OBJECT_CACHE_BYTES``, default 16 GiB) when a process has added an
eighth of the bound since it last looked. Files are keyed by the shard's URL
and file CRC, so a shard replaced under the same name is never read from an
older copy.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from megatron_slkd.cache.format import (
    HEADER_SIZE,
    check_header,
    check_index,
    chunk_count_range,
    crc32,
    section_offsets,
)
from megatron_slkd.cache.manifest import Manifest
from megatron_slkd.errors import CacheFormatError
from megatron_slkd.storage import ObjectStore, join

__all__ = ["LocalChunkCache", "RemoteShard", "default_cache_dir", "default_cache_bytes", "url_key"]

_RUN = 64  # most chunks fetched by one pair of requests
_THREADS = 16


def default_cache_dir() -> str:
    return os.environ.get(
        "SLKD_OBJECT_CACHE_DIR", str(Path.home() / ".cache" / "megatron-slkd" / "objects")
    )


def url_key(url: str) -> str:
    """A short file-name-safe key of a URL (its local chunks, staging and input copies)."""
    return hashlib.sha1(url.encode()).hexdigest()[:16]


def default_cache_bytes() -> int:
    return int(os.environ.get("SLKD_OBJECT_CACHE_BYTES", str(16 << 30)))


class LocalChunkCache:
    """A directory of verified chunks, bounded to ``max_bytes`` (least recently used go)."""

    def __init__(self, root, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self._added = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"root": self.root, "max_bytes": self.max_bytes, "_added": 0}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def folder(self, url: str, file_crc: int) -> Path:
        return self.root / "chunks" / f"{url_key(url)}-{file_crc:08x}"

    def get(self, folder: Path, name: str) -> bytes | None:
        path = folder / name
        try:
            data = path.read_bytes()
            os.utime(path)
        except FileNotFoundError:  # never fetched, or evicted by another process
            return None
        return data

    def put(self, folder: Path, name: str, data: bytes) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.{os.getpid()}.{threading.get_ident()}"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, folder / name)
        except OSError:  # a full or read-only local disk: read on without keeping it
            tmp.unlink(missing_ok=True)
            return
        with self._lock:
            self._added += len(data)
            due = self._added > self.max_bytes // 8
            if due:
                self._added = 0
        if due:
            self.trim()

    def trim(self) -> int:
        """Delete least recently used files until the cache holds at most 80% of its
        bound; returns the bytes it holds then."""
        files = []
        for f in (self.root / "chunks").glob("*/*"):  # never staging/ or inputs/ beside it
            try:
                st = f.stat()
            except FileNotFoundError:
                continue
            if f.is_file():
                files.append((st.st_mtime, st.st_size, f))
        total = sum(size for _, size, _ in files)
        if total <= self.max_bytes:
            return total
        files.sort()
        for _, size, f in files:
            if total <= 0.8 * self.max_bytes:
                break
            f.unlink(missing_ok=True)
            total -= size
        return total


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool() -> ThreadPoolExecutor:
    """This process's fetch threads (a forked DataLoader worker makes its own)."""
    pid = os.getpid()
    if pid not in _POOLS:
        _POOLS[pid] = ThreadPoolExecutor(_THREADS, thread_name_prefix="slkd-fetch")
    return _POOLS[pid]


class RemoteShard:
    """A shard on object storage, read by chunks through a :class:`LocalChunkCache`."""

    def __init__(self, store: ObjectStore, record: dict, manifest: Manifest,
                 local: LocalChunkCache):  # fmt: skip

        self.store, self.name, self.local = store, record["file"], local
        self.path = join(store.url, record["file"])
        self._folder = local.folder(self.path, int(record["file_crc32"]))
        head = local.get(self._folder, "head")
        size = record["size_bytes"]
        if head is None:
            size = store.size(self.name)
            raw = store.read(self.name, 0, min(HEADER_SIZE, size))
        else:
            raw = head[:HEADER_SIZE]
        self.header = h = check_header(self.path, raw, size, record, manifest)
        off = section_offsets(h)
        if head is None:
            head = raw + store.read(self.name, off["doc_offsets"], off["counts"] - HEADER_SIZE)
        index = np.frombuffer(head, np.uint8)[off["doc_offsets"] : off["counts"]]
        self.doc_offsets, self.chunk_offsets, self.chunk_crcs = check_index(
            self.path, h, index, record
        )
        local.put(self._folder, "head", head)
        self._off = off
        self._state_pid = -1

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_state_pid": -1, "_lock": None, "_inflight": None}

    def _state(self):
        """The lock and in-flight fetches of this process."""
        if self._state_pid != os.getpid():
            self._lock, self._inflight = threading.Lock(), {}
            self._state_pid = os.getpid()
        return self._lock, self._inflight

    def download(self, directory, block: int = 1 << 26) -> int:
        """Copy the shard object to ``directory`` under its name, in ranged reads of
        ``block`` bytes; returns the CRC-32 of the bytes copied."""
        size, value = self._off["end"], 0
        with open(Path(directory) / self.name, "wb") as f:
            for at in range(0, size, block):
                data = self.store.read(self.name, at, min(block, size - at))
                value = crc32(data, value)
                f.write(data)
        return value

    def counts_section(self) -> np.ndarray:
        """The packed per-token entry counts of the whole shard (one ranged read)."""
        a, b = self._off["counts"], self._off["entries"]
        return np.frombuffer(self.store.read(self.name, a, b - a), np.uint8)

    # -- chunk bytes -------------------------------------------------------
    def _count_range(self, c0: int, c1: int) -> tuple[int, int]:
        """Bytes of the counts section holding chunks ``c0..c1 - 1``."""
        h = self.header
        return chunk_count_range(c0, c1, h.num_chunks, h.chunk_tokens, h.encoding.count_bits,
                                 self._off["entries"] - self._off["counts"])  # fmt: skip

    def _fetch(self, c0: int, c1: int) -> dict[int, bytes]:
        """Chunks ``c0..c1 - 1`` from the store, each checked against its CRC and kept."""
        eb = self.header.encoding.entry_bytes
        a, b = self._count_range(c0, c1)
        counts = self.store.read(self.name, self._off["counts"] + a, b - a)
        e0, e1 = int(self.chunk_offsets[c0]) * eb, int(self.chunk_offsets[c1]) * eb
        entries = self.store.read(self.name, self._off["entries"] + e0, e1 - e0) if e1 > e0 else b""
        out = {}
        for i in range(c0, c1):
            ca, cb = (x - a for x in self._count_range(i, i + 1))
            ea, eb_ = (int(self.chunk_offsets[j]) * eb - e0 for j in (i, i + 1))
            data = counts[ca:cb] + entries[ea:eb_]
            if crc32(data) != int(self.chunk_crcs[i]):
                raise CacheFormatError(
                    f"{self.path}: CRC mismatch in chunk {i} as fetched (shard tokens "
                    f"{i * self.header.chunk_tokens}..); the object is corrupt or was replaced"
                )
            self.local.put(self._folder, str(i), data)
            out[i] = data
        return out

    def _kept(self, i: int) -> bytes | None:
        """Chunk ``i`` from the local cache, checked again (a damaged copy is dropped)."""
        data = self.local.get(self._folder, str(i))
        if data is not None and crc32(data) != int(self.chunk_crcs[i]):
            (self._folder / str(i)).unlink(missing_ok=True)
            return None
        return data

    def _schedule(self, chunks: list[int]) -> dict[int, Future]:
        """Futures of ``chunks``: already in flight, or fetched in runs from now."""
        lock, inflight = self._state()
        futures, missing = {}, []
        with lock:
            for i in chunks:
                if i in inflight:
                    futures[i] = inflight[i]
                else:
                    missing.append(i)
            runs: list[list[int]] = []
            for i in missing:
                if runs and i == runs[-1][-1] + 1 and len(runs[-1]) < _RUN:
                    runs[-1].append(i)
                else:
                    runs.append([i])
            for run in runs:
                fut = _pool().submit(self._fetch, run[0], run[-1] + 1)
                for i in run:
                    inflight[i] = futures[i] = fut
                fut.add_done_callback(lambda _f, run=run: self._forget(run))
        return futures

    def _forget(self, run: list[int]) -> None:
        lock, inflight = self._state()
        with lock:
            for i in run:
                inflight.pop(i, None)

    def _missing(self, chunks) -> list[int]:
        return [i for i in chunks if not (self._folder / str(i)).exists()]

    def prefetch(self, starts, lengths) -> None:
        """Start fetching the chunks of these spans that are not here; returns at once."""
        self._schedule(self._missing(self._chunks(starts, lengths)))

    def _chunks(self, starts, lengths) -> list[int]:
        c = self.header.chunk_tokens
        out: set[int] = set()
        for t, n in zip(np.asarray(starts).tolist(), np.asarray(lengths).tolist(), strict=True):
            if n > 0:
                out.update(range(t // c, (t + n - 1) // c + 1))
        return sorted(out)

    def window(self, starts: np.ndarray, lengths: np.ndarray, verify: bool):
        """(counts, entries, chunk entry offsets, starts) of a compact copy of the chunks the
        spans touch, the starts moved to it (every chunk is checked when fetched)."""
        del verify  # fetched chunks are always checked
        c = self.header.chunk_tokens
        chunks = self._chunks(starts, lengths)
        have = {i: self._kept(i) for i in chunks}
        futures = self._schedule([i for i, d in have.items() if d is None])
        for i, fut in futures.items():
            got = fut.result()
            have[i] = got.get(i) if i in got else self._kept(i)
            if have[i] is None:  # fetched by another thread and already evicted
                have[i] = self._fetch(i, i + 1)[i]
        slot = {i: k for k, i in enumerate(chunks)}
        eb = self.header.encoding.entry_bytes
        counts, entries, offsets = [], [], [0]
        for i in chunks:
            n = self._count_range(i, i + 1)
            split = n[1] - n[0]
            counts.append(have[i][:split])
            entries.append(have[i][split:])
            offsets.append(offsets[-1] + (len(have[i]) - split) // eb)
        counts.append(b"\0")  # room for the decoder's two-byte count reads
        local = np.array(
            [slot[t // c] * c + t % c for t in np.asarray(starts).tolist()], dtype=np.int64
        )
        return (
            np.frombuffer(b"".join(counts), np.uint8),
            np.frombuffer(b"".join(entries), np.uint8),
            np.array(offsets, dtype="<u8"),
            local,
        )
