"""Object storage: ``s3://BUCKET/PATH`` and ``msc://PROFILE/PATH``.

Both go through NVIDIA's multi-storage-client (``pip install
'megatron-slkd[object]'``), the client megatron-core itself uses for datasets
on object storage, so a cluster that already reads its data that way needs no
new configuration. Credentials and endpoints come from those clients' own
configuration, never from the command line: for ``s3://`` the usual AWS
environment and files (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` or
``AWS_PROFILE``, ``AWS_ENDPOINT_URL`` for an S3-compatible store,
``~/.aws/``), for ``msc://`` the profile in the MSC config file
(``MSC_CONFIG``, ``~/.msc_config.yaml``). Nothing here logs them.

Every request is retried on failures that may pass (timeouts, refused or
reset connections, HTTP 429 and 5xx) with exponential backoff and jitter:
``SLKD_STORAGE_ATTEMPTS`` attempts (default 6), the first wait
``SLKD_STORAGE_BACKOFF`` seconds (default 0.25), doubling up to 8 s. The
client may retry inside each attempt as its own configuration says. Failures
are typed and name the URL: :class:`ObjectNotFoundError` (HTTP 404),
:class:`ObjectPermissionError` (HTTP 403), :class:`ObjectTimeoutError` (still
failing after every attempt), :class:`ObjectStoreError` otherwise.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time

from megatron_slkd.errors import (
    ConfigError,
    ObjectChangedError,
    ObjectNotFoundError,
    ObjectPermissionError,
    ObjectStoreError,
    ObjectTimeoutError,
)

__all__ = ["SCHEMES", "is_url", "is_object_url", "check_url", "ObjectStore", "join"]

SCHEMES = ("s3", "msc")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_MAX_WAIT = 8.0
_log = logging.getLogger(__name__)


def is_url(value) -> bool:
    """Whether ``value`` is a string that starts with a URL scheme (any scheme)."""
    return isinstance(value, str) and _URL.match(value) is not None


def is_object_url(value) -> bool:
    """Whether ``value`` is an ``s3://`` or ``msc://`` URL."""
    m = _URL.match(value) if isinstance(value, str) else None
    return m is not None and m.group(1).lower() in SCHEMES


def check_url(value: str, what: str = "") -> str:
    """``value`` if it is a local path or an object URL this package reads.

    Raises:
        ConfigError: another scheme (``gs://``, ``http://``, ...), or a URL without a
            bucket or profile; never taken for a local path.
    """
    m = _URL.match(value) if isinstance(value, str) else None
    if m is None:
        return value
    if m.group(1).lower() not in SCHEMES:
        raise ConfigError(
            f"{what}{value}: {m.group(1)}:// is not supported; use s3://BUCKET/PATH, "
            "msc://PROFILE/PATH or a local path (nothing was read or written)"
        )
    if not value[m.end() :].split("/", 1)[0]:
        raise ConfigError(f"{what}{value}: the URL names no bucket or profile")
    return value


def join(url: str, *names: str) -> str:
    """``url/name/...`` without doubled slashes."""
    return "/".join([url.rstrip("/"), *(n.strip("/") for n in names)])


def _import_msc():
    try:
        import multistorageclient as msc
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigError(
            "object-storage URLs need the multi-storage-client package: "
            "pip install 'megatron-slkd[object]'"
        ) from exc
    return msc


def _retryable(exc: BaseException) -> bool:
    """Whether another attempt may succeed."""
    name = type(exc).__name__
    if isinstance(exc, (TimeoutError, ConnectionError)) or name in (
        "RetryableError", "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
        "ConnectionClosedError", "IncompleteReadError", "ResponseStreamingError",
        "ProtocolError", "SSLError",
    ):  # fmt: skip
        return True
    return bool(re.search(r"status_code: (429|5\d\d)", str(exc)))


class ObjectStore:
    """The objects under one URL prefix (``s3://bucket/cache``, ``msc://profile/cache``).

    Names are relative to the prefix. Safe to use from threads and from forked
    DataLoader workers (the client is resolved again in a new process).
    """

    def __init__(self, url: str):
        check_url(url)
        if not is_object_url(url):
            raise ValueError(f"{url}: not an object-storage URL")
        self.url = url.rstrip("/")
        self._client = None
        self._base = ""
        self._pid = -1
        self.attempts = max(1, int(os.environ.get("SLKD_STORAGE_ATTEMPTS", "6")))
        self.backoff = float(os.environ.get("SLKD_STORAGE_BACKOFF", "0.25"))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None, "_pid": -1}

    def _resolve(self):
        if self._client is None or self._pid != os.getpid():
            msc = _import_msc()
            self._client, self._base = msc.resolve_storage_client(self.url)
            self._pid = os.getpid()
        return self._client

    def _key(self, name: str) -> str:
        self._resolve()  # the client's base path
        return "/".join(p for p in (self._base.strip("/"), name.strip("/")) if p)

    def _call(self, what: str, name: str, fn):
        url = join(self.url, name) if name else self.url
        for attempt in range(self.attempts):
            try:
                return fn(self._resolve())
            except FileNotFoundError as exc:
                raise ObjectNotFoundError(f"{url}: no such object ({what})") from exc
            except PermissionError as exc:
                raise ObjectPermissionError(
                    f"{url}: permission denied ({what}); check the credentials the client "
                    "is configured with and the bucket's policy"
                ) from exc
            except ObjectStoreError:
                raise
            except Exception as exc:  # the clients raise many types; sorted below
                if "NoCredentialsError" in f"{type(exc).__name__} {exc}":
                    raise ObjectPermissionError(
                        f"{url}: no credentials found ({what}); configure the client as usual "
                        "(AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws/, or "
                        "the msc profile in MSC_CONFIG)"
                    ) from exc
                if not _retryable(exc):
                    raise ObjectStoreError(
                        f"{url}: {what} failed: {type(exc).__name__}: {exc}"
                    ) from exc
                if attempt + 1 == self.attempts:
                    raise ObjectTimeoutError(
                        f"{url}: {what} still failing after {self.attempts} attempts "
                        f"({type(exc).__name__}: {str(exc)[:200]}); check the endpoint and "
                        "network, or raise SLKD_STORAGE_ATTEMPTS"
                    ) from exc
                wait = min(_MAX_WAIT, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)
                _log.warning("%s: %s failed (%s), retrying in %.2f s", url, what,
                             type(exc).__name__, wait)  # fmt: skip
                time.sleep(wait)
        raise AssertionError("unreachable")

    # -- requests ----------------------------------------------------------
    def read(self, name: str, offset: int | None = None, size: int | None = None) -> bytes:
        """The object's bytes, or ``size`` bytes from ``offset``."""

        def get(client):
            if offset is None:
                return client.read(self._key(name))
            rng = _import_msc().types.Range(offset=offset, size=size)
            data = client.read(self._key(name), byte_range=rng)
            if len(data) != size:
                raise ObjectStoreError(
                    f"{join(self.url, name)}: asked bytes {offset}..{offset + size - 1}, got "
                    f"{len(data)}; the object is shorter than its manifest says"
                )
            return data

        what = "read" if offset is None else f"read of bytes {offset}..{offset + size - 1}"
        return self._call(what, name, get)

    def size(self, name: str) -> int:
        """The object's size in bytes."""
        return int(self._call("size", name, lambda c: c.info(self._key(name)).content_length))

    def exists(self, name: str) -> bool:
        try:
            self.size(name)
        except ObjectNotFoundError:
            return False
        return True

    def list(self) -> list[str]:
        """Names of the objects directly under the prefix."""
        prefix = self._key("") + "/" if self._key("") else ""

        def names(client):
            out = []
            for obj in client.list(prefix):
                key = obj.key
                rel = key[len(prefix) :] if key.startswith(prefix) else key
                if rel and "/" not in rel.strip("/"):
                    out.append(rel.strip("/"))
            return sorted(out)

        return self._call("list", "", names)

    def download(self, name: str, local_path) -> None:
        """Copy the object to the local file ``local_path``."""
        self._call("download", name, lambda c: c.download_file(self._key(name), str(local_path)))

    def upload(self, name: str, local_path) -> None:
        """Publish a local file as one object (it appears under ``name`` only when complete)."""
        self._call("upload", name, lambda c: c.upload_file(self._key(name), str(local_path)))

    def write(self, name: str, data: bytes) -> None:
        """Publish ``data`` as one object."""
        self._call("write", name, lambda c: c.write(self._key(name), data))

    def delete(self, name: str) -> None:
        self._call("delete", name, lambda c: c.delete(self._key(name)))

    # -- conditional requests (S3's If-None-Match / If-Match) ----------------
    @staticmethod
    def _provider(client):
        """The provider under ``client``, for the conditions its public calls do not take;
        None where a request cannot carry them (a profile with a metadata provider maps
        names to other objects)."""
        if getattr(client, "_metadata_provider", None) is not None:
            return None
        provider = getattr(client, "_storage_provider", None)
        return provider if hasattr(provider, "put_object") else None

    def _conditional(self, what: str, name: str, request):
        """``request(provider, key)``; None when conditions cannot be sent (see :meth:`put`)."""
        from multistorageclient.types import PreconditionFailedError

        def call(client):
            provider = self._provider(client)
            if provider is None:
                return None
            try:
                request(provider, self._key(name))
            except NotImplementedError:
                return None
            except PreconditionFailedError as exc:
                raise ObjectChangedError(
                    f"{join(self.url, name)}: {what} refused: the object exists or changed "
                    "since it was read"
                ) from exc
            return True

        return self._call(what, name, call)

    def etag(self, name: str) -> str | None:
        """The object's ETag (None where the store gives none)."""
        return self._call("info", name, lambda c: c.info(self._key(name)).etag) or None

    def put(self, name: str, data: bytes, *, if_match: str | None = None) -> str | None:
        """Write ``data`` as one object only if no object has that name, or with ``if_match``
        only if the object's ETag is still that; returns the new object's ETag.

        Raises :class:`~megatron_slkd.errors.ObjectChangedError` when the condition does
        not hold. Where the client cannot send the condition (a metadata provider, a
        provider without it) the write is plain and None is returned. A store that
        ignores the condition (some S3-compatible services) writes whatever it finds.
        """
        conditions = {"if_match": if_match} if if_match else {"if_none_match": "*"}
        what = "conditional write" if if_match else "exclusive create"
        sent = self._conditional(what, name, lambda p, key: p.put_object(key, data, **conditions))
        if sent is None:
            self.write(name, data)
            return None
        return self.etag(name)

    def delete_if(self, name: str, etag: str | None) -> None:
        """Delete the object if its ETag is still ``etag`` (plainly where none is known or
        the client cannot send the condition)."""
        if etag is None or self._conditional(
            "conditional delete", name, lambda p, key: p.delete_object(key, if_match=etag)
        ) is None:
            self.delete(name)
