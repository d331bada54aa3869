"""Typed errors raised by megatron-slkd: every error type of the package is here.

The rule: what a user can cause (a file, a flag, a dataset, a teacher, the
storage, another process of the job) raises a subclass of :class:`SlkdError`
whose message names the file, the document or token range involved, what
differs, and what to do about it; the CLI turns them into one-line reports and
a non-zero exit status instead of tracebacks. A caller's bug (a wrong argument
to a library function) raises ``ValueError`` or ``TypeError``. Callers may
catch :class:`SlkdError` to handle all of the first kind at once.
"""

from __future__ import annotations

import errno

__all__ = [
    "SlkdError",
    "CacheFormatError",
    "CacheMismatchError",
    "CacheCoverageError",
    "CacheCapacityError",
    "DataPreparationError",
    "DataMismatchError",
    "DataFormatError",
    "ConfigError",
    "PeerFailedError",
    "LoaderFailedError",
    "StorageError",
    "ObjectStoreError",
    "ObjectNotFoundError",
    "ObjectChangedError",
    "ObjectPermissionError",
    "ObjectTimeoutError",
    "TeacherError",
    "CheckpointError",
    "OwnershipError",
    "Preempted",
    "EXIT_PREEMPTED",
    "MegatronVersionError",
    "DamagedRecordError",
    "as_reported",
    "first_line",
    "one_line",
]


class SlkdError(Exception):
    """Base class of every error this package raises on bad input."""


class CacheFormatError(SlkdError):
    """A cache file is corrupt, truncated, missing, or of an unknown format or version."""


class CacheMismatchError(SlkdError):
    """A cache does not describe the dataset, tokenizer or parameters it is used with."""


class CacheCoverageError(SlkdError):
    """Cache shards leave documents uncovered or cover some twice."""


class CacheCapacityError(SlkdError):
    """A value does not fit the cache's bit packing (vocabulary or sample count too large)."""


class DataPreparationError(SlkdError):
    """Input text, tokenizer or output prefix given to ``prepare-data`` is unusable."""


class DataMismatchError(SlkdError):
    """A dataset does not fit its tokenizer, the teacher, or the split asked of it."""


class DataFormatError(DataMismatchError):
    """A dataset's ``.bin``/``.idx`` pair is missing, truncated, not a Megatron
    IndexedDataset, or its two files disagree (an interrupted copy, or the index of
    another data file)."""


class ConfigError(SlkdError):
    """An option value cannot work with the data or the launch (say which and why)."""


class TeacherError(SlkdError):
    """The teacher cannot be loaded or does not fit the dataset."""


class CheckpointError(SlkdError):
    """A checkpoint that cannot be resumed by this run."""


class OwnershipError(SlkdError):
    """Another live process writes this output, or this process lost its ownership."""


EXIT_PREEMPTED = 75
"""Exit status of a command stopped by a preemption signal with its progress durable
(EX_TEMPFAIL: Slurm's requeue and job arrays take it as "run again")."""


class Preempted(SlkdError):
    """The command stopped on a preemption signal with its progress durable."""

    exit_status = EXIT_PREEMPTED


class MegatronVersionError(ConfigError):
    """The installed megatron-core is outside the supported releases."""


class DamagedRecordError(SlkdError):
    """A record of what is already known (a remembered hash, scan or verdict) is damaged:
    it is treated as absent and established again."""


class PeerFailedError(SlkdError):
    """Another process of this model-parallel group failed, so this one stops with it.

    The message quotes the other process's error; the exit status is its status.
    """

    def __init__(self, message: str, exit_status: int = 2):
        super().__init__(message)
        self.exit_status = exit_status


class LoaderFailedError(SlkdError):
    """A data loader worker process died (the out-of-memory killer, shared memory run out):
    training stops, keeping its checkpoints; exit status 1."""

    exit_status = 1


class StorageError(SlkdError):
    """The file system refused a read or write: out of space, read-only, no permission.

    The commands write so that whatever was committed before the failure stays usable:
    free space (or fix the mount) and rerun the same command to go on from there.
    """

    _HINTS = {
        errno.ENOSPC: "free space or write elsewhere",
        errno.EDQUOT: "free space under your quota or write elsewhere",
        errno.EROFS: "the file system is mounted read-only; write elsewhere",
        errno.EACCES: "check the permissions, or write elsewhere",
        errno.EPERM: "check the permissions, or write elsewhere",
    }

    @classmethod
    def from_os_error(cls, exc: OSError, output: str | None = None) -> StorageError:
        """From ``exc``; ``output`` names the place when the error does not (a write)."""
        where = exc.filename or (f"writing under {output}" if output else "?")
        if exc.filename2:
            where = f"{where} -> {exc.filename2}"
        what = exc.strerror or str(exc)
        hint = cls._HINTS.get(exc.errno, "fix the storage")
        return cls(
            f"{where}: {what} (errno {exc.errno}); {hint}, then rerun the same command "
            "(work committed before the failure is kept)"
        )


class ObjectStoreError(StorageError):
    """An object-storage request (``s3://``, ``msc://``) failed; the message names the URL."""


class ObjectNotFoundError(ObjectStoreError):
    """No object at the URL (a cache not there, or not finished: its manifest is written last)."""


class ObjectChangedError(ObjectStoreError):
    """A conditional request failed: the object exists, or changed since it was read."""


class ObjectPermissionError(ObjectStoreError):
    """The store refused the request (HTTP 403): check the credentials and bucket policy."""


class ObjectTimeoutError(ObjectStoreError):
    """The store did not answer, or answered with retryable errors, after every retry."""


def as_reported(exc: SlkdError | OSError, output: str | None = None) -> tuple[int, SlkdError]:
    """(exit status, typed error) of ``exc`` as a command reports it: an ``OSError`` (disk
    full, read-only, permissions) becomes a :class:`StorageError` naming ``output`` when it
    names no file; the status is the error's ``exit_status`` (75: preempted, progress
    durable), else 2."""
    if isinstance(exc, OSError):
        exc = StorageError.from_os_error(exc, output)
    return getattr(exc, "exit_status", 2), exc


def first_line(exc: BaseException, default: str = "") -> str:
    """The first line of ``exc``'s message (``default`` when it has none): what a one-line
    report quotes of an error whose message may run to a traceback."""
    return (str(exc).splitlines() or [default])[0]


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line: a typed error may quote a library's message that
    spans lines (transformers' "couldn't connect ... Check your internet connection"),
    and a report of one error is one line, also in a job log shared by many ranks."""
    return " ".join(part.strip() for part in str(exc).splitlines() if part.strip())


def quoted(exc: BaseException, limit: int = 300) -> str:
    """A library's message in ``exc`` as one of ours quotes it: on one line and cut at
    ``limit`` characters (transformers lists some 400 model types when a directory holds no
    model; the line that says what to do must stay readable after it)."""
    text = one_line(exc)
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."
