"""One writer per output: owner files with a heartbeat, safe on NFS and Lustre.

A shard under construction, the output of ``merge-cache``, ``thin-cache`` and
``remap-cache``, a dataset prefix being prepared and a training run directory
each have exactly one writer.
``flock`` is unreliable on shared file systems, so ownership is a file:

- *Claim*: create ``<target>.owner`` with ``O_CREAT | O_EXCL`` (atomic on
  local file systems and on NFS v3+ and Lustre) and write a checksummed record
  (:mod:`megatron_slkd.records`): host, pid, Slurm job and array task, start
  time, and a random token.
- *Heartbeat*: while working, the owner touches the file's modification time
  every ``timeout / 4`` seconds (a daemon thread), and checks that the file still
  holds its token; if it does not, the owner was taken over and stops at its
  next commit (:meth:`OwnerLock.check`).
- *Takeover*: a claim that finds an owner file takes it over when the owner is
  gone: on the same host when its pid no longer runs, on any host when the
  heartbeat is older than the timeout (clocks are assumed synchronized, as NTP
  keeps them on clusters). The stale file is first renamed to a unique name
  (atomic: of two processes taking over, one rename succeeds), then claimed as
  above; the takeover is logged. A file that cannot be parsed (a crash between
  create and write) counts as stale once older than the timeout.
- Otherwise the claim fails with :class:`OwnershipError` naming the owner and
  what to do; commands exit with status 2 before loading any model.

An output published to object storage (:mod:`megatron_slkd.publish`) is built
in a local staging directory, and two jobs given different staging
directories would not see each other's owner files. So every claim under a
staging directory is also made in the store, as the object ``<name>.owner``
beside the output's objects: a live owner there (heartbeat in the record
younger than the timeout, or a live pid on this host) refuses the claim as a
local one does; a dead one is taken over. The writes are conditional (S3's
``If-None-Match: *`` to create, ``If-Match: ETAG`` to take over, renew and
delete), so of two claims made in the same instant exactly one lands and the
other process looks again and is refused. The heartbeat rewrites the object
with a fresh time, only over the one this process wrote last; releasing
deletes it. Where the client cannot send the conditions (an MSC profile with
a metadata provider) or the store ignores them, the last claim written wins
and the other process sees the foreign token at its next heartbeat and stops
at its next commit, having published nothing of that output.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from megatron_slkd.errors import ConfigError, OwnershipError
from megatron_slkd.records import dump_record, parse_record

__all__ = [
    "check_output_dir",
    "OwnershipError",
    "OwnerLock",
    "claim",
    "claim_in_store",
    "add_lock_argument",
    "DEFAULT_TIMEOUT_S",
]

DEFAULT_TIMEOUT_S = 300.0
_log = logging.getLogger(__name__)
_STORES: list[tuple[Path, object]] = []  # (staging directory, ObjectStore): claimed in both


def check_output_dir(directory, what: str) -> None:
    """Refuse a ``directory`` to write the ``what`` in where a file stands on its path (an
    ``--output`` naming a data file): mkdir's "File exists" read as a storage fault, and a
    rerun of the same command failed the same way."""
    d = Path(directory)
    for p in (d, *d.parents):
        if os.path.lexists(p):
            if not p.is_dir():
                raise ConfigError(
                    f"{p}: a file, where the {what}'s directory{'' if p == d else f' {d}'} "
                    f"should be; give a directory that does not exist yet (or holds the "
                    f"{what}), or move the file"
                )
            return


def claim_in_store(staging, store) -> None:
    """Make every later claim of a path directly under ``staging`` in ``store`` as well
    (``store``: the :class:`~megatron_slkd.storage.ObjectStore` that directory is published
    to)."""
    _STORES.append((Path(staging).resolve(), store))


def _identity() -> dict:
    env = os.environ
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job": env.get("SLURM_ARRAY_JOB_ID") or env.get("SLURM_JOB_ID"),
        "slurm_array_task": env.get("SLURM_ARRAY_TASK_ID"),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "token": uuid.uuid4().hex,
    }


def _describe(owner: dict) -> str:
    who = f"host {owner.get('host')} pid {owner.get('pid')}"
    if owner.get("slurm_job"):
        who += f", Slurm job {owner['slurm_job']}"
        if owner.get("slurm_array_task") is not None:
            who += f" array task {owner['slurm_array_task']}"
    return f"{who}, since {owner.get('since')}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OwnerLock:
    """Ownership of ``target`` (a path) through ``<target>.owner``; see the module docstring.

    Use :func:`claim` (or ``with OwnerLock(...):``). :meth:`check` raises once the
    ownership was lost; :meth:`release` removes the file if it is still ours.
    """

    def __init__(self, target, *, what: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.target = Path(target)
        self.path = self.target.with_name(self.target.name + ".owner")
        self.what = what
        self.timeout_s = float(timeout_s)
        self.me = _identity()
        self._stop = threading.Event()
        self._lost: str | None = None
        self._thread: threading.Thread | None = None
        here = self.target.parent.resolve()
        self.store = next((st for root, st in _STORES if root == here), None)
        self.store_name = self.path.name
        self._store_etag: str | None = None  # of the claim this process wrote last

    # -- claiming ---------------------------------------------------------
    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(dump_record(self.me))
            f.flush()
            os.fsync(f.fileno())
        return True

    def _stale(self) -> tuple[bool, str]:
        """Whether the current owner file may be taken over, and why (or who holds it)."""
        try:
            text = self.path.read_text()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True, "gone"
        try:
            owner = parse_record(text, self.path, OwnershipError)
        except OwnershipError:
            owner = None
        if owner is None or "pid" not in owner:
            if age > self.timeout_s:
                return True, f"an unreadable owner file {age:.0f} s old"
            return False, f"an owner file being written ({age:.0f} s old)"
        return self._judge(owner, age)

    def _judge(self, owner: dict, age: float) -> tuple[bool, str]:
        """Whether ``owner``, heard from ``age`` seconds ago, may be taken over, and why."""
        if owner.get("host") == self.me["host"] and not _pid_alive(int(owner["pid"])):
            return True, f"{_describe(owner)}: that process has exited"
        if age > self.timeout_s:
            return True, f"{_describe(owner)}: no heartbeat for {age:.0f} s"
        return False, f"{_describe(owner)} (heartbeat {age:.0f} s ago)"

    # -- the same claim in an object store ----------------------------------
    def _store_owner(self) -> tuple[dict | None, str | None]:
        """The owner record in the store (None: no object; {}: an unreadable one) and the
        ETag it was read under (asked first: a change after it fails the next If-Match)."""
        from megatron_slkd.errors import ObjectNotFoundError

        try:
            etag = self.store.etag(self.store_name)
            data = self.store.read(self.store_name)
        except ObjectNotFoundError:
            return None, None
        try:
            owner = parse_record(data.decode("utf-8"), self.store_name, OwnershipError)
        except (OwnershipError, UnicodeDecodeError):
            return {}, etag  # objects appear whole: this one was damaged, not half-written
        return (owner if "pid" in owner and "beat" in owner else {}), etag

    def _put_store_owner(self, if_match: str | None, *, renew: bool = False) -> None:
        """Write the claim: created only where no object is (``if_match`` None), else only
        over the object read under that ETag. A renewal where the claim was written without
        conditions (the client cannot send them) is a plain write, as that claim was."""
        record = dump_record({**self.me, "beat": time.time()}).encode()
        if renew and if_match is None:
            self.store.write(self.store_name, record)
            return
        self._store_etag = self.store.put(self.store_name, record, if_match=if_match)

    def _claim_store(self) -> None:
        from megatron_slkd.errors import ObjectChangedError, ObjectNotFoundError

        where = f"{self.store.url}/{self.target.name}"
        for _ in range(8):  # a few rounds: another claim may land between a read and a write
            owner, etag = self._store_owner()
            if owner and owner.get("token") == self.me["token"]:
                self._store_etag = etag  # a retried create that had landed: ours
                return
            if owner:
                stale, why = self._judge(owner, time.time() - float(owner["beat"]))
                if not stale:
                    raise OwnershipError(
                        f"{where}: {self.what} is being written by {why}, from another "
                        "staging directory; wait for it to finish, or stop it (a dead owner "
                        f"is taken over after --lock-timeout {self.timeout_s:.0f} s without "
                        "heartbeat)"
                    )
                _log.warning("taking over %s (%s): owner was %s", where, self.what, why)
            elif owner == {}:
                _log.warning("taking over %s (%s): its owner object is unreadable", where,
                             self.what)  # fmt: skip
            try:
                self._put_store_owner(None if owner is None else etag)
                return
            except (ObjectChangedError, ObjectNotFoundError):
                continue  # another claim came first, or the object went: look again
        raise OwnershipError(f"{where}: could not claim {self.store_name}; too much contention")

    def _beat_store(self) -> None:
        """Check that the store's claim is still ours, then renew its time (only over the
        object this process wrote last: a claim written over it in between is not lost)."""
        from megatron_slkd.errors import ObjectChangedError, ObjectNotFoundError, ObjectStoreError

        where = self.store.url
        try:
            owner, _ = self._store_owner()
            if owner is not None and owner.get("token") != self.me["token"]:
                self._lost = (f"taken over in {where} by {_describe(owner)}" if owner
                              else f"owner object in {where} damaged")  # fmt: skip
                return
            self._put_store_owner(self._store_etag, renew=True)
        except (ObjectChangedError, ObjectNotFoundError):
            try:
                owner, etag = self._store_owner()
            except ObjectStoreError as exc:  # undecided: the next beat looks again
                _log.warning("%s: renewing the claim failed (%s)", where, exc)
                return
            if owner and owner.get("token") == self.me["token"]:
                self._store_etag = etag  # a retried renewal that had landed: still ours
                return
            self._lost = (f"taken over in {where} by {_describe(owner)}" if owner
                          else f"owner object in {where} replaced or removed")  # fmt: skip
        except ObjectStoreError as exc:  # retried already; the next beat tries again
            _log.warning("%s: renewing the claim failed (%s)", where, exc)

    def acquire(self) -> OwnerLock:
        check_output_dir(self.path.parent, self.what)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(8):  # a few rounds: another process may take over at the same moment
            if self._create():
                if self.store is not None:
                    try:
                        self._claim_store()
                    except BaseException:
                        self.path.unlink(missing_ok=True)
                        raise
                self._start_heartbeat()
                return self
            stale, why = self._stale()
            if not stale:
                raise OwnershipError(
                    f"{self.target}: {self.what} is being written by {why}; wait for it to "
                    f"finish, or stop it (a dead owner on another host is taken over after "
                    f"--lock-timeout {self.timeout_s:.0f} s without heartbeat)"
                )
            aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue  # another process moved it first; try to create again
            _log.warning("taking over %s (%s): owner was %s", self.target, self.what, why)
            aside.unlink(missing_ok=True)
        raise OwnershipError(f"{self.target}: could not claim {self.path}; too much contention")

    # -- holding ----------------------------------------------------------
    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="slkd-owner-heartbeat",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def _read_owner(self, tries: int = 5) -> dict:
        """The owner record; a file that is missing or unreadable is read again a few times
        0.1 s apart first (a takeover moves the file aside, then creates and writes it)."""
        for _ in range(tries - 1):
            try:
                return parse_record(self.path.read_text(), self.path, OwnershipError)
            except (OSError, OwnershipError):
                time.sleep(0.1)
        return parse_record(self.path.read_text(), self.path, OwnershipError)

    def _beat(self) -> None:
        while not self._stop.wait(max(self.timeout_s / 4, 0.05)):
            try:
                owner = self._read_owner()
                if owner.get("token") != self.me["token"]:
                    self._lost = f"taken over by {_describe(owner)}"
                    return
                os.utime(self.path)
            except (OSError, OwnershipError) as exc:
                self._lost = f"owner file gone or damaged ({exc})"
                return
            if self.store is not None:
                self._beat_store()
                if self._lost is not None:
                    return

    def check(self) -> None:
        """Raise :class:`OwnershipError` if another process took this output over."""
        if self._lost is not None:
            raise OwnershipError(
                f"{self.target}: {self.what}: this process lost its ownership "
                f"({self._lost}); stopping without writing more"
            )

    def release(self) -> None:
        """Stop the heartbeat and remove the owner file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            owner = parse_record(self.path.read_text(), self.path, OwnershipError)
            if owner.get("token") == self.me["token"]:
                self.path.unlink()
        except (OSError, OwnershipError):
            pass
        if self.store is not None and self._lost is None:
            from megatron_slkd.errors import ObjectNotFoundError, ObjectStoreError

            try:
                owner, etag = self._store_owner()
                if (owner or {}).get("token") == self.me["token"]:
                    self.store.delete_if(self.store_name, etag)
            except ObjectNotFoundError:
                pass  # gone: a retried delete that had landed
            except ObjectStoreError as exc:  # left behind: taken over once its beat is old
                _log.warning("%s: removing the claim failed (%s)", self.store.url, exc)

    def __enter__(self) -> OwnerLock:
        return self.acquire() if self._thread is None else self

    def __exit__(self, *exc) -> None:
        self.release()


def clear_dead_owner(target, *, what: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Remove the owner file a dead writer left on ``target`` (finished, so nobody claims it
    again); a live owner's file stays."""
    lock = OwnerLock(target, what=what, timeout_s=timeout_s)
    if not lock.path.exists():
        return
    try:
        lock.acquire()  # takes over a dead owner only
    except OwnershipError:
        return  # a live one: its file stays
    lock.release()


def claim(target, *, what: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> OwnerLock:
    """Claim ``target``; raises :class:`OwnershipError` naming a live owner."""
    return OwnerLock(target, what=what, timeout_s=timeout_s).acquire()


def add_lock_argument(p) -> None:
    """``--lock-timeout`` of a command that writes an output with one owner."""
    p.add_argument(
        "--lock-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds without heartbeat after which another host's claim on the output is "
        "taken over (a dead owner on this host is taken over at once)",
    )
