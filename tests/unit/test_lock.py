"""The writer lock on an output, between real processes: one holder, the second refused with
the holder named, dead holders (exited, SIGKILLed, an earlier attempt of a requeued SLURM
job) taken over, under both mechanisms (``flock`` and the exclusively created record)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpcdeconv.data.lock import MECHANISM_ENV, OutputLock, lock_path
from hpcdeconv.data.lock_record import holder_record
from hpcdeconv.errors import OutputLockedError

REPO = Path(__file__).resolve().parents[2]

#: Takes the lock on argv[1] as verb argv[2], says "held", holds it until stdin closes.
HOLDER = """
import sys
from hpcdeconv.data.lock import OutputLock
lock = OutputLock(sys.argv[1], sys.argv[2]).acquire()
print("held", lock.mechanism, flush=True)
sys.stdin.read()
lock.release()
"""

SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT")


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run outside any SLURM job unless they say otherwise."""
    for name in (*SLURM_VARS, MECHANISM_ENV):
        monkeypatch.delenv(name, raising=False)


def start_holder(target: Path, verb: str = "deconvolve", **env: str) -> subprocess.Popen:
    """A separate Python process that holds the lock on ``target``."""
    environ = {k: v for k, v in os.environ.items() if k not in SLURM_VARS}
    environ.update(PYTHONPATH=str(REPO), **env)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(target), verb],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environ,
    )
    line = proc.stdout.readline()
    assert line.startswith("held"), proc.stderr.read()
    return proc


@pytest.fixture
def holders() -> Iterator[list[subprocess.Popen]]:
    """Holder processes, ended by the test or here."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def exited_pid() -> int:
    """The PID of a process that has exited (and was reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_record(target: Path, **fields: object) -> Path:
    """A lock file holding a record as another run would have written it."""
    record = holder_record("deconvolve", target)
    record.update(fields)
    path = lock_path(target)
    path.write_text(json.dumps(record))
    return path


def test_lock_path_is_a_hidden_sibling_shared_by_every_name(tmp_path: Path) -> None:
    (tmp_path / "scratch").mkdir()
    (tmp_path / "link.zarr").symlink_to(tmp_path / "scratch")
    assert lock_path(tmp_path / "out.zarr") == tmp_path / ".out.zarr.hpcdeconv-lock"
    assert lock_path(tmp_path / "link.zarr") == lock_path(tmp_path / "scratch")


@pytest.mark.parametrize("mechanism", ["flock", "record"])
def test_acquire_release_and_acquire_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mechanism: str
) -> None:
    monkeypatch.setenv(MECHANISM_ENV, mechanism)
    target = tmp_path / "sub" / "out.zarr"
    with OutputLock(target, "deconvolve") as lock:
        assert lock.mechanism == mechanism
        record = json.loads(lock_path(target).read_text())
        assert record["pid"] == os.getpid()
        assert record["host"] == socket.gethostname()
        assert record["verb"] == "deconvolve"
    assert not lock.held
    assert not lock_path(target).exists()
    assert not target.exists()  # the lock never creates the output itself
    OutputLock(target, "deconvolve").acquire().release()


@pytest.mark.parametrize("mechanism", ["flock", "record"])
def test_second_writer_refused_naming_the_holder(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    holders: list[subprocess.Popen],
    mechanism: str,
) -> None:
    monkeypatch.setenv(MECHANISM_ENV, mechanism)
    target = tmp_path / "out.zarr"
    holder = start_holder(target, SLURM_JOB_ID="77", **{MECHANISM_ENV: mechanism})
    holders.append(holder)
    with pytest.raises(OutputLockedError) as info:
        OutputLock(target, "rl").acquire()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{target} is being written by hpcdeconv deconvolve (")
    assert f"host {socket.gethostname()}, PID {holder.pid}, SLURM job 77, since " in message
    assert "UTC); wait for it or stop it" in message
    # The holder is unharmed and still holds it; once it ends the output is free.
    holder.stdin.close()
    assert holder.wait(timeout=10) == 0
    OutputLock(target, "rl").acquire().release()


@pytest.mark.parametrize(
    ("holder_mechanism", "our_mechanism"), [("record", "flock"), ("flock", "record")]
)
def test_a_holder_of_the_other_mechanism_is_respected(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    holders: list[subprocess.Popen],
    holder_mechanism: str,
    our_mechanism: str,
) -> None:
    """``HPCDECONV_LOCK=record`` set for some runs only: the two kinds still exclude."""
    target = tmp_path / "out.zarr"
    holder = start_holder(target, **{MECHANISM_ENV: holder_mechanism})
    holders.append(holder)
    monkeypatch.setenv(MECHANISM_ENV, our_mechanism)
    with pytest.raises(OutputLockedError, match=f"PID {holder.pid}"):
        OutputLock(target, "deconvolve").acquire()
    holder.stdin.close()
    assert holder.wait(timeout=10) == 0
    OutputLock(target, "deconvolve").acquire().release()


def test_symlinked_name_is_refused_too(tmp_path: Path, holders: list[subprocess.Popen]) -> None:
    (tmp_path / "scratch.zarr").mkdir()
    (tmp_path / "link.zarr").symlink_to(tmp_path / "scratch.zarr")
    holders.append(start_holder(tmp_path / "scratch.zarr"))
    with pytest.raises(OutputLockedError, match="being written by"):
        OutputLock(tmp_path / "link.zarr", "deconvolve").acquire()


@pytest.mark.parametrize("mechanism", ["flock", "record"])
def test_sigkilled_holder_never_blocks(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    holders: list[subprocess.Popen],
    caplog: pytest.LogCaptureFixture,
    mechanism: str,
) -> None:
    monkeypatch.setenv(MECHANISM_ENV, mechanism)
    target = tmp_path / "out.zarr"
    holder = start_holder(target, **{MECHANISM_ENV: mechanism})
    holders.append(holder)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock_path(target).exists()  # left behind by the killed holder
    with caplog.at_level(logging.WARNING), OutputLock(target, "deconvolve") as lock:
        assert lock.held
        assert json.loads(lock_path(target).read_text())["pid"] == os.getpid()
    assert f"PID {holder.pid}" in caplog.text
    assert "taking over the lock" in caplog.text


@pytest.mark.parametrize("mechanism", ["flock", "record"])
def test_record_of_a_dead_pid_on_this_host_is_taken_over(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    mechanism: str,
) -> None:
    monkeypatch.setenv(MECHANISM_ENV, mechanism)
    target = tmp_path / "out.zarr"
    dead = exited_pid()
    write_record(target, pid=dead, process_start=None)
    with caplog.at_level(logging.WARNING), OutputLock(target, "deconvolve") as lock:
        assert lock.held
    assert f"PID {dead}" in caplog.text


def test_record_of_a_live_pid_is_refused_and_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MECHANISM_ENV, "record")
    target = tmp_path / "out.zarr"
    with subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                          stdin=subprocess.PIPE) as live:  # fmt: skip
        # The record of a live process, as that process would have written it.
        write_record(target, pid=live.pid, process_start=_start_ticks(live.pid))
        with pytest.raises(OutputLockedError) as info:
            OutputLock(target, "deconvolve").acquire()
        live.stdin.close()
    assert f"PID {live.pid}" in str(info.value)
    assert f"delete {lock_path(target)}" in str(info.value)


def _start_ticks(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def test_reused_pid_is_seen_as_dead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A record whose PID now belongs to a later process (another start time) is stale."""
    monkeypatch.setenv(MECHANISM_ENV, "record")
    target = tmp_path / "out.zarr"
    write_record(target, pid=os.getpid(), process_start=_start_ticks(os.getpid()) - 1)
    OutputLock(target, "deconvolve").acquire().release()


def test_record_from_before_a_reboot_is_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MECHANISM_ENV, "record")
    target = tmp_path / "out.zarr"
    write_record(target, pid=1, boot_id="a-previous-boot")
    OutputLock(target, "deconvolve").acquire().release()


def test_earlier_attempt_of_a_requeued_slurm_job_is_taken_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On another host (its PID cannot be checked from here) only the job id tells."""
    monkeypatch.setenv(MECHANISM_ENV, "record")
    target = tmp_path / "out.zarr"
    other = {"host": "n01", "pid": 1234, "slurm_job": "77", "slurm_restart_count": 0}
    write_record(target, **other)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with caplog.at_level(logging.WARNING), OutputLock(target, "deconvolve") as lock:
        assert lock.held
        assert json.loads(lock_path(target).read_text())["slurm_restart_count"] == 1
    assert "earlier attempt of this SLURM job 77" in caplog.text


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        ({"SLURM_JOB_ID": "78", "SLURM_RESTART_COUNT": "1"}, {"slurm_job": "77"}),
        # Same job, same attempt: another task of one ``srun -n 2``, a concurrent writer.
        ({"SLURM_JOB_ID": "77"}, {"slurm_job": "77"}),
        # The same array job, another task: another job.
        (
            {"SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "2", "SLURM_RESTART_COUNT": "1"},
            {"slurm_job": "70_1"},
        ),
        ({}, {"slurm_job": None}),
    ],
)
def test_record_on_another_host_of_another_job_is_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    ours: dict[str, str],
    theirs: dict[str, object],
) -> None:
    monkeypatch.setenv(MECHANISM_ENV, "record")
    target = tmp_path / "out.zarr"
    write_record(target, host="n01", pid=1234, slurm_restart_count=0, **theirs)
    for name, value in ours.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(OutputLockedError, match=r"\(host n01, PID 1234"):
        OutputLock(target, "deconvolve").acquire()
    assert json.loads(lock_path(target).read_text())["host"] == "n01"  # left as it was


def _try_lock(target: str, queue: multiprocessing.Queue) -> None:
    try:
        with OutputLock(target, "predict"):
            queue.put("acquired")
    except OutputLockedError as exc:
        queue.put(str(exc))


def test_child_process_refused_while_the_parent_holds(tmp_path: Path) -> None:
    target = tmp_path / "out.tif"
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    with OutputLock(target, "predict"):
        child = context.Process(target=_try_lock, args=(str(target), queue))
        child.start()
        refused = queue.get(timeout=30)
        child.join()
    assert f"PID {os.getpid()}" in refused
    child = context.Process(target=_try_lock, args=(str(target), queue))
    child.start()
    assert queue.get(timeout=30) == "acquired"
    child.join()


def test_unknown_mechanism_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MECHANISM_ENV, "nfs")
    with pytest.raises(OutputLockedError, match="HPCDECONV_LOCK='nfs'"):
        OutputLock(tmp_path / "out.zarr", "deconvolve").acquire()
