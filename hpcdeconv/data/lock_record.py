"""The holder record of an output lock: who holds it, and whether that holder is gone.

A lock file (:class:`hpcdeconv.data.lock.OutputLock`) holds one JSON record naming its
holder: host, PID and the process's start time, boot of the host, SLURM job and restart
count, start time, verb. Others print it when refused (:func:`describe_holder`) and judge
from it whether the holder is known to be gone (:func:`stale_reason`): its process on this
host no longer runs (its PID does not exist, belongs to a later process, or the host
rebooted since), or it is an earlier attempt of this process's SLURM job (a requeued job).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["describe_holder", "holder_record", "parse_record", "read_record", "stale_reason"]


def _boot_id() -> str | None:
    """This boot of the host (Linux), so a record from before a reboot is seen as dead."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (Linux ``/proc/<pid>/stat``
    field 22), which tells a reused PID from the process that wrote a record."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its end.
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def _slurm_job() -> str | None:
    """The SLURM job this process belongs to: ``<array job>_<task>`` or ``<job id>``."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def _restart_count() -> int:
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def holder_record(verb: str, target: Path) -> dict[str, Any]:
    """What the lock file says about its holder: this process, now."""
    pid = os.getpid()
    return {
        "verb": verb,
        "target": str(target),
        "host": socket.gethostname(),
        "pid": pid,
        "process_start": _process_start(pid),
        "boot_id": _boot_id(),
        "slurm_job": _slurm_job(),
        "slurm_restart_count": _restart_count(),
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "token": uuid.uuid4().hex,
    }


def describe_holder(record: dict[str, Any] | None) -> str:
    """``hpcdeconv deconvolve (host n01, PID 1234, SLURM job 77, since ...)``."""
    if not record:
        return "another run (its record is unreadable)"
    parts = [f"host {record.get('host', '?')}", f"PID {record.get('pid', '?')}"]
    if record.get("slurm_job"):
        parts.append(f"SLURM job {record['slurm_job']}")
    if record.get("started"):
        parts.append(f"since {record['started']}")
    return f"hpcdeconv {record.get('verb', '?')} ({', '.join(parts)})"


def _pid_alive(record: dict[str, Any]) -> bool:
    """Whether the process of a record made on this host still runs."""
    boot = _boot_id()
    if boot is not None and record.get("boot_id") not in (None, boot):
        return False  # the host rebooted since
    try:
        pid = int(record["pid"])
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except (KeyError, TypeError, ValueError, OverflowError):
        return False
    started = record.get("process_start")
    now = _process_start(pid)
    return started is None or now is None or started == now


def stale_reason(record: dict[str, Any]) -> str | None:
    """Why a record's holder is known to be gone (None: it may still run).

    A holder on this host whose process is gone, or an earlier attempt (lower
    ``SLURM_RESTART_COUNT``) of this process's SLURM job, i.e. a requeued job.
    """
    if record.get("host") == socket.gethostname() and not _pid_alive(record):
        return f"its process {record.get('pid')} on this host is gone"
    job = _slurm_job()
    if job is not None and record.get("slurm_job") == job:
        try:
            earlier = int(record.get("slurm_restart_count") or 0) < _restart_count()
        except (TypeError, ValueError):
            earlier = False
        if earlier:
            return f"it is an earlier attempt of this SLURM job {job} (requeued)"
    return None


def parse_record(text: str) -> dict[str, Any] | None:
    """The record in the text of a lock file; None unless it is a JSON object."""
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def read_record(path: Path, attempts: int = 20) -> dict[str, Any] | None:
    """The holder record in a lock file; None if missing or unreadable.

    A holder writes its record just after taking the lock: an empty or partial record is
    read again for up to ``attempts`` × 25 ms.
    """
    for _ in range(attempts):
        try:
            record = parse_record(path.read_text())
        except FileNotFoundError:
            return None
        except OSError:
            record = None
        if record is not None:
            return record
        time.sleep(0.025)
    return None
