"""Writing a cache to object storage: built in a local staging directory, published whole.

``build-cache``, ``merge-cache``, ``thin-cache`` and ``remap-cache`` given
``--output s3://BUCKET/PATH`` (or ``msc://PROFILE/PATH``) write their output
in a local staging directory (``--staging-dir``; default
``$SLKD_OBJECT_CACHE_DIR/staging/<hash of the URL>``) exactly as they would
write a local cache, and publish it:

- each finished shard as one object (an object store shows an object only
  once its upload is complete), then its sidecar ``<shard>.json``: a sidecar
  in the store means its shard is there in full;
- ``manifest.json`` last, once every shard it lists is published: a
  ``manifest.json`` in the store means the cache is complete.

A background thread publishes shards as they finish (every 10 s), and the
command publishes what is left when it ends, also when it stops on a signal
(status 75) or an error, so finished work is never kept only locally.
Resume works against the store: at start, every finished shard in the store
that the staging directory lacks is downloaded into it, and the command then
skips it as it skips its own finished shards (a run resumed on another node,
with an empty staging directory, downloads them once). Under ``mpirun`` or
``torchrun`` rank 0 publishes; the staging directory must then be one that
rank 0 sees (one node, or ``--staging-dir`` on a shared file system).
Every claim of an output in the staging directory is made in the store too
(:mod:`megatron_slkd.ownership`), so a second job writing the same shard or
manifest from another staging directory is refused before it starts work.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from megatron_slkd.ownership import claim_in_store
from megatron_slkd.records import parse_record
from megatron_slkd.storage import ObjectStore

__all__ = ["Publisher", "add_publish_argument", "mirror", "URL_OUTPUT_HELP"]

_log = logging.getLogger(__name__)
_INTERVAL_S = 10.0
MANIFEST_NAME = "manifest.json"  # as megatron_slkd.cache.manifest (kept light to import)


URL_OUTPUT_HELP = (
    "; or s3://BUCKET/PATH, msc://PROFILE/PATH: built in --staging-dir, each shard "
    "published whole, the manifest last"
)


def add_publish_argument(p) -> None:
    """``--staging-dir`` of a command that may write its output to object storage."""
    p.add_argument(
        "--staging-dir",
        default=None,
        help="with --output s3://... or msc://...: the local directory the output is built "
        "in before each shard is published (default: $SLKD_OBJECT_CACHE_DIR/staging/<hash>; "
        "kept, so a rerun resumes from it)",
    )


def _local_dir(kind: str, url: str) -> Path:
    """``$SLKD_OBJECT_CACHE_DIR/<kind>/<hash of the URL>``."""
    from megatron_slkd.cache.remote import default_cache_dir, url_key

    return Path(default_cache_dir()) / kind / url_key(url)


def _record_key(data: bytes) -> str | None:
    """The checksum member of a record (sidecar or manifest): equal records, equal keys."""
    try:
        return parse_record(data.decode("utf-8"), "record", ValueError).get("checksum")
    except (ValueError, UnicodeDecodeError):
        return None


class Publisher:
    """Publishes a staging directory's finished shards, then its manifest, to ``url``."""

    def __init__(self, url: str, staging=None):
        self.store = ObjectStore(url)
        self.url = self.store.url
        self.staging = Path(staging) if staging else _local_dir("staging", self.url)
        self.staging.mkdir(parents=True, exist_ok=True)
        # Jobs with other staging directories see this one's claims in the store.
        claim_in_store(self.staging, self.store)
        self._published: dict[str, str | None] = {}  # sidecar/manifest name -> record key
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def pull(self) -> list[str]:
        """Download the store's finished shards the staging directory lacks; their names."""
        records = {n: self.store.read(n) for n in self.store.list()
                   if n.endswith(".slkd.json") or n == MANIFEST_NAME}  # fmt: skip
        self._published.update({n: _record_key(data) for n, data in records.items()})
        got = []
        for sidecar, data in records.items():
            if not sidecar.endswith(".slkd.json"):
                continue
            shard = sidecar.removesuffix(".json")
            local = self.staging / sidecar
            if (
                local.exists()
                and (self.staging / shard).exists()
                and _record_key(local.read_bytes()) == self._published[sidecar]
            ):
                continue
            tmp = self.staging / f"{shard}.download-{os.getpid()}"
            self.store.download(shard, tmp)
            os.replace(tmp, self.staging / shard)
            local.write_bytes(data)
            got.append(shard)
        if got:
            _log.info("%s: %d finished shard(s) downloaded to %s to resume from",
                      self.url, len(got), self.staging)  # fmt: skip
        return got

    def push(self) -> list[str]:
        """Publish every finished shard not yet in the store (shard, then sidecar), then the
        manifest when every shard it lists is published; the names published."""
        with self._lock:
            done = []
            for sidecar in sorted(self.staging.glob("*.slkd.json")):
                shard = self.staging / sidecar.name.removesuffix(".json")
                data = sidecar.read_bytes()
                key = _record_key(data)
                if not shard.exists() or self._published.get(sidecar.name, "") == key:
                    continue
                self.store.upload(shard.name, shard)
                self.store.write(sidecar.name, data)
                self._published[sidecar.name] = key
                done.append(shard.name)
            manifest = self.staging / MANIFEST_NAME
            if manifest.exists():
                data = manifest.read_bytes()
                key = _record_key(data)
                if self._published.get(MANIFEST_NAME, "") != key:
                    record = parse_record(data.decode("utf-8"), manifest, ValueError)
                    for s in record.get("shards", []):  # a merge's shards have no sidecar here
                        if f"{s['file']}.json" not in self._published:
                            self.store.upload(s["file"], self.staging / s["file"])
                    self.store.write(MANIFEST_NAME, data)
                    self._published[MANIFEST_NAME] = key
                    done.append(MANIFEST_NAME)
            return done

    def start(self) -> None:
        """Publish finished shards in the background every 10 s until :meth:`stop`."""

        def loop():
            while not self._stop.wait(_INTERVAL_S):
                try:
                    self.push()
                except Exception as exc:  # retried at the next round, and at the end
                    _log.warning("%s: publishing failed (%s); retried later", self.url, exc)

        self._thread = threading.Thread(target=loop, name="slkd-publish", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def describe(self) -> str:
        return f"{self.url} (staged in {self.staging})"


def mirror(url: str, directory=None) -> Path:
    """A local copy of the cache or shard directory at ``url`` (an input of merge-cache,
    thin-cache or remap-cache), under ``directory`` (default
    ``$SLKD_OBJECT_CACHE_DIR/inputs/<hash of the URL>``). Records are fetched every time;
    a shard file already there is kept when its CRC is the one its record gives."""
    from megatron_slkd.cache.format import file_crc32

    store = ObjectStore(url)
    dest = Path(directory) if directory else _local_dir("inputs", store.url)
    dest.mkdir(parents=True, exist_ok=True)
    names = store.list()
    crcs: dict[str, int] = {}
    for name in names:
        if name == MANIFEST_NAME or name.endswith(".slkd.json"):
            data = store.read(name)
            (dest / name).write_bytes(data)
            record = parse_record(data.decode("utf-8", errors="replace"), f"{url}/{name}",
                                  ValueError)  # fmt: skip
            crcs.update({s["file"]: s["file_crc32"] for s in record.get("shards", [])})
    for name in names:
        if not name.endswith(".slkd"):
            continue
        local = dest / name
        if local.exists() and crcs.get(name) == file_crc32(local):
            continue
        tmp = dest / f".{name}.{os.getpid()}"
        store.download(name, tmp)
        os.replace(tmp, local)
    _log.info("%s: copied to %s", store.url, dest)
    return dest
