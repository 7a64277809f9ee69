"""One writer per output: an exclusive lock on an output path, held for the life of a run.

A run that writes an output (a zarr store, a TIFF, a training run directory) first takes
:class:`OutputLock` on it; a second run on the same output is refused with one line naming
the holder (host, PID, SLURM job, start time, verb) before it reads, deletes or prepares
anything there.

Where the lock lives
--------------------
``<parent>/.<name>.hpcdeconv-lock`` beside the output, with the output's path resolved
(symbolic links followed), so every name of one output locks the same file. A sibling rather
than a file inside the output because ``--overwrite`` empties or deletes the output (a lock
inside would be deleted by the very run it protects, and a run directory or zarr store must
hold only what hpcdeconv writes there); and never inside an input, since a command checks
that its output is not, does not contain and does not lie inside an input *before* it
locks, and the output's parent then lies inside no input either. The file is removed
when the lock is released; a killed holder leaves it behind, and the next run takes it over.

How it works, and what is guaranteed
------------------------------------
``flock`` (the default): the lock file is created if needed and ``fcntl.flock(LOCK_EX |
LOCK_NB)`` is taken on it; the holder's record (JSON: host, PID, SLURM job, start time,
verb; :mod:`hpcdeconv.data.lock_record`) is written into it for the message others
print. The kernel drops a ``flock`` when its holder exits in any way (SIGKILL, out of
memory), so a dead holder never blocks; a record left behind by one is taken over with a
warning.

- Local disks: exclusive among all processes of the host.
- NFS (Linux clients since 2.6.12 map ``flock`` to NFS byte-range locks) and Lustre mounted
  with ``-o flock``: exclusive among all hosts that mount it. A host that dies holding the
  lock keeps it until the server reclaims it (the NFSv4 lease, 90 s by default; Lustre's
  client eviction); a run started meanwhile, even a requeued attempt of the same SLURM job,
  is refused, since a lock the server still grants may have a live writer behind it (SLURM
  declares a silent node down only after ``SlurmdTimeout``, 300 s by default).
- Not guaranteed: file systems whose ``flock`` is local to each host (Lustre ``-o
  localflock``, NFS mounted with ``local_lock=flock`` or ``nolock``, some FUSE mounts). There
  two hosts each get "their" lock on one output. Set ``HPCDECONV_LOCK=record`` on such
  mounts.

``record`` (``HPCDECONV_LOCK=record``, and automatically where ``flock`` fails with ENOLCK,
EOPNOTSUPP or ENOSYS, e.g. Lustre mounted with ``noflock``): the record file itself is the
lock, created with ``O_CREAT | O_EXCL`` (atomic on local disks, NFSv3+ and Lustre, on every
host). Nothing releases it when its holder dies, so a record is judged stale when

- its holder ran on this host and its process is gone (its PID does not exist, or belongs
  to a later process, or the host rebooted since), or
- its holder is an earlier attempt of this SLURM job (same job id, or array job and task,
  with a lower ``SLURM_RESTART_COUNT``: a requeued job).

A stale record is taken over with a warning; any other record refuses the run, naming the
file to delete if its holder is known to be gone (a holder on another host cannot be seen
from here). Two runs taking over one stale record at the same instant are resolved by an
atomic rename, except in a window of microseconds.

Runs of the two mechanisms on one output exclude each other too: a ``record`` run sees a
``flock`` holder's record, and a ``flock`` run that gets the flock over a live ``record``
holder's record is refused by the record rules.

The same SLURM job id alone does not make a record stale: the tasks of one ``srun -n 2``
share it and are exactly the concurrent writers this lock keeps apart.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from hpcdeconv.data.lock_record import (
    describe_holder,
    holder_record,
    parse_record,
    read_record,
    stale_reason,
)
from hpcdeconv.errors import OutputLockedError

logger = logging.getLogger(__name__)

#: Suffix of the lock file beside an output (``.<name>.hpcdeconv-lock``).
LOCK_SUFFIX = ".hpcdeconv-lock"
#: Environment variable choosing the mechanism: ``flock`` (default) or ``record``.
MECHANISM_ENV = "HPCDECONV_LOCK"

Mechanism = Literal["flock", "record"]

#: ``flock`` errors meaning "this file system does not do locks", not "someone holds it".
_UNSUPPORTED = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})


def lock_path(target: str | Path) -> Path:
    """Where the lock of ``target`` lives: ``.<name>.hpcdeconv-lock`` in its parent.

    The target is resolved first (links followed, ``~`` expanded), so two names of one
    output share one lock.
    """
    resolved = Path(target).expanduser().resolve()
    return resolved.parent / f".{resolved.name}{LOCK_SUFFIX}"


def _mechanism() -> Mechanism:
    value = os.environ.get(MECHANISM_ENV, "flock").strip().lower() or "flock"
    if value not in ("flock", "record"):
        raise OutputLockedError(f"{MECHANISM_ENV}={value!r}: must be 'flock' or 'record'")
    return value  # type: ignore[return-value]


class _FlockUnsupportedError(Exception):
    """``flock`` is not available on this file system."""


class OutputLock:
    """An exclusive writer lock on one output path, for the life of a run.

    Parameters
    ----------
    target
        The output (zarr store, file or run directory); it need not exist. Its parent
        directory is created if missing (the output would be created there anyway).
    verb
        The command that writes it (``"deconvolve"``, ``"train"``), named to others.

    Use as a context manager, or call :meth:`acquire` and :meth:`release`.

    Raises
    ------
    OutputLockedError
        From :meth:`acquire`: another live run holds the lock (the message names it), or
        the lock file cannot be created.
    """

    def __init__(self, target: str | Path, verb: str) -> None:
        self.target = Path(target)
        self.verb = verb
        self.path = lock_path(target)
        self.mechanism: Mechanism | None = None
        self._fd: int | None = None
        self._token: str | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self.mechanism is not None

    # -- public ------------------------------------------------------------------------

    def acquire(self) -> OutputLock:
        """Take the lock, or raise :class:`OutputLockedError` naming its holder."""
        if self.held:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._cannot(exc) from None
        record = holder_record(self.verb, self.target)
        if _mechanism() == "flock":
            try:
                self._acquire_flock(record)
                return self
            except _FlockUnsupportedError:
                logger.warning(
                    "%s: the file system does not support flock; locking %s by an "
                    "exclusively created record instead",
                    self.path.parent,
                    self.target,
                )
        self._acquire_record(record)
        return self

    def release(self) -> None:
        """Give the lock up and remove its file (idempotent)."""
        if self.mechanism == "flock" and self._fd is not None:
            # Unlinked while still locked: a run that opened the old file meanwhile sees,
            # once it gets the lock, that the path no longer leads to it, and starts over.
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                    os.unlink(self.path)
            os.close(self._fd)
        elif self.mechanism == "record":
            record = read_record(self.path, attempts=1)
            if record is not None and record.get("token") == self._token:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
        self._fd = None
        self.mechanism = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    # -- messages ----------------------------------------------------------------------

    def _refused(self, record: dict[str, Any] | None, hint: str = "") -> OutputLockedError:
        return OutputLockedError(
            f"{self.target} is being written by {describe_holder(record)}; "
            f"wait for it or stop it{hint}"
        )

    def _cannot(self, exc: OSError) -> OutputLockedError:
        why = exc.strerror or str(exc)
        return OutputLockedError(f"cannot lock {self.target}: {self.path}: {why}")

    def _take_over_warning(self, record: dict[str, Any], why: str) -> None:
        logger.warning(
            "%s: taking over the lock of %s; %s", self.target, describe_holder(record), why
        )

    # -- flock -------------------------------------------------------------------------

    def _acquire_flock(self, record: dict[str, Any]) -> None:
        import fcntl

        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise self._cannot(exc) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = read_record(self.path)
                if holder is None and not self.path.exists():
                    continue  # released meanwhile
                raise self._refused(holder) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in _UNSUPPORTED:
                    raise _FlockUnsupportedError from None
                raise self._cannot(exc) from None
            # The holder before us may have removed the file between our open and flock.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        left = parse_record(os.pread(fd, 1 << 16, 0).decode(errors="replace"))
        if left is not None:
            # A record-mechanism holder (HPCDECONV_LOCK=record elsewhere) holds no flock: it
            # is judged by the record rules; a flock holder that let its flock go is gone.
            why = "it is no longer running"
            if left.get("mechanism") == "record":
                why = stale_reason(left)
                if why is None:
                    os.close(fd)
                    raise self._refused(left, f" (if it no longer runs, delete {self.path})")
            self._take_over_warning(left, why)
        record = {**record, "mechanism": "flock"}
        data = json.dumps(record).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self._fd, self._token, self.mechanism = fd, record["token"], "flock"

    # -- O_EXCL record ------------------------------------------------------------------

    def _acquire_record(self, record: dict[str, Any]) -> None:
        data = json.dumps({**record, "mechanism": "record"}).encode()
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._take_over_stale()
                continue
            except OSError as exc:
                raise self._cannot(exc) from None
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._token, self.mechanism = record["token"], "record"
            return
        raise self._refused(read_record(self.path))

    def _take_over_stale(self) -> None:
        """Move a stale record out of the way, or raise naming its live holder."""
        old = read_record(self.path)
        if old is None:
            if not self.path.exists():
                return  # released meanwhile: try again
            old = {}
        why = stale_reason(old) if old else None
        if why is None:
            hint = f" (if it no longer runs, delete {self.path})"
            raise self._refused(old or None, hint)
        # Renaming is atomic: of several runs taking over one stale record, one succeeds.
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = read_record(aside, attempts=1)
        if moved is not None and moved.get("token") != old.get("token"):
            # We moved a record written after ours was read: put it back (link fails if a
            # third run took the path meanwhile; that run then holds the lock).
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            os.unlink(aside)
            raise self._refused(moved)
        os.unlink(aside)
        self._take_over_warning(old, why)
