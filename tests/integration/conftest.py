"""Fixtures for integration tests: launcher-free environments, the all-reduce worker, and the
real single-node SLURM from ``slurm/dev``.

The ``slurm_cluster`` fixture starts the cluster once per session with ``slurm/dev/up.sh`` and
stops it with ``down.sh`` only if this session started it. It skips when the machine cannot
run it (not root, no apt-get and no SLURM, or ``up.sh`` failed); set
``HPCDECONV_REQUIRE_SLURM=1`` to turn such a skip into a failure, as CI should.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hpcdeconv.sweep.monitor import ENDED

REPO = Path(__file__).resolve().parents[2]
SLURM_DEV = REPO / "slurm" / "dev"
WORKER = Path(__file__).with_name("dist_worker.py")

# Variables through which a launcher tells a process its rank; a test that starts its own
# launcher must not pass on the ones of whatever launched pytest.
_LAUNCHER_VARIABLES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
_LAUNCHER_PREFIXES = ("SLURM_", "SLURMD_", "PMI_", "PMIX_", "OMPI_", "TORCHELASTIC_", "MPI_")
#: Seconds a requeued job stays held before a test moves its start to now.
REQUEUE_HOLD_S = 2.0
#: sacct states of a job that will not run again (the sweep monitor's list).
_TERMINAL_STATES = ENDED


def _without_launcher() -> dict[str, str]:
    return {
        name: value
        for name, value in os.environ.items()
        if name not in _LAUNCHER_VARIABLES and not name.startswith(_LAUNCHER_PREFIXES)
    }


def _launch_env() -> dict[str, str]:
    # Ranks share the machine's few cores with the rest of the test run.
    return _without_launcher() | {"OMP_NUM_THREADS": "1"}


@pytest.fixture
def launch_env() -> dict[str, str]:
    """The test process's environment without any launcher's rank variables."""
    return _launch_env()


@pytest.fixture(scope="session")
def dist_worker() -> list[str]:
    """Command that runs the all-reduce worker with this interpreter."""
    return [sys.executable, str(WORKER)]


def _allreduce_reports(output: str, world_size: int, launcher: str) -> list[dict]:
    reports = sorted(
        (json.loads(line) for line in output.splitlines() if line.startswith("{")),
        key=lambda report: report["rank"],
    )
    assert [r["rank"] for r in reports] == list(range(world_size)), output
    expected = [world_size * (world_size + 1) / 2 * i for i in range(4)]
    for report in reports:
        assert report["launcher"] == launcher
        assert report["world_size"] == world_size
        assert report["reduced"] == expected
        assert report["main"] == (report["rank"] == 0)
    rendezvous = {(r["master_addr"], r["master_port"]) for r in reports}
    assert len(rendezvous) == 1, rendezvous
    return reports


@pytest.fixture(scope="session")
def check_allreduce() -> Callable[[str, int, str], list[dict]]:
    """Checker of the worker's output: every rank present, same launcher and rendezvous, and
    each reduced vector equal to ``W (W + 1) / 2 * [0, 1, 2, 3]``. Returns the reports."""
    return _allreduce_reports


def run_sbatch(
    command: list[str], env: dict[str, str], cwd: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run an ``sbatch --parsable`` command; a job still running when ``timeout`` expires
    is cancelled before the test fails, so that it cannot hold the one dev node for every
    test after it (a hang in MPI_Init under srun once kept it for 20 minutes)."""
    try:
        return subprocess.run(
            command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        job = out.strip().split(";")[0]
        if job.isdigit():
            subprocess.run(["scancel", job], env=env, capture_output=True, timeout=30)
        raise


@dataclass(frozen=True)
class SlurmCluster:
    """Handle on the running dev cluster.

    Attributes
    ----------
    state_dir
        Where up.sh keeps configuration, logs and daemon state.
    env
        Environment for SLURM client commands (``SLURM_CONF`` set, no launcher variables).
    """

    state_dir: Path
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 60.0, cwd: Path | None = None) -> str:
        """Run a SLURM client command and return its stdout; fail the test on error."""
        proc = subprocess.run(
            args, env=self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout
        )
        assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}: {proc.stderr}"
        return proc.stdout

    def sbatch_wait(self, script: Path, timeout: float = 120.0) -> tuple[int, int]:
        """Submit ``script`` with ``sbatch --wait``; return (job id, sbatch exit status)."""
        command = ["sbatch", "--parsable", "--wait", str(script)]
        proc = run_sbatch(command, self.env, script.parent, timeout)
        job_id = int(proc.stdout.strip().splitlines()[0].split(";")[0])
        return job_id, proc.returncode

    def wait_until_gone(self, job_id: int | str, timeout: float = 240.0) -> None:
        """Wait for the job to finish, cutting the requeue hold short.

        SLURM 22.05 holds a requeued job with ``Reason=BeginTime`` for 120 s (measured here);
        on a real cluster that wait is harmless, in a test it is moved to now, but not at
        once: slurmd refuses a credential issued in the same second as the revocation of the
        previous run's ("Killing non-startable batch JobId=…: Job credential revoked"; seen
        when the start was moved 0.2 s after the requeue), so the job stays held for
        ``REQUEUE_HOLD_S`` first.
        """
        deadline = time.monotonic() + timeout
        held_since: float | None = None
        while True:
            out = self.run("squeue", "-h", "-j", str(job_id), "-o", "%T %r").split()
            if not out:
                return
            if out != ["PENDING", "BeginTime"]:
                held_since = None
            elif held_since is None:
                held_since = time.monotonic()
            elif time.monotonic() - held_since >= REQUEUE_HOLD_S:
                self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
            assert time.monotonic() < deadline, f"job {job_id} still queued: {out}"
            time.sleep(0.5)

    def restart(self) -> None:
        """Stop the cluster with ``down.sh`` and start a fresh one with ``up.sh``, as a new
        session would; the state directory and ``SLURM_CONF`` stay where they were."""
        for script in ("down.sh", "up.sh"):
            proc = subprocess.run(
                ["bash", str(SLURM_DEV / script)],
                env=_without_launcher(),
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert proc.returncode == 0, f"{script} exited {proc.returncode}: {proc.stderr}"

    def job_states(self, job_id: int, timeout: float = 30.0) -> dict[str, str]:
        """States of a job and its steps as accounting records them, keyed by sacct JobID.

        slurmctld reports to slurmdbd asynchronously, so this polls until the job's own record
        has reached a terminal state.
        """
        deadline = time.monotonic() + timeout
        while True:
            out = self.run("sacct", "-j", str(job_id), "-n", "-P", "-o", "JobID,State")
            states = dict(line.split("|", 1) for line in out.splitlines() if "|" in line)
            # "CANCELLED by 0" carries who cancelled; the first word is the state.
            states = {job: state.split()[0] for job, state in states.items()}
            if states.get(str(job_id)) in _TERMINAL_STATES or time.monotonic() > deadline:
                return states
            time.sleep(0.5)


def _start_failure(reason: str) -> None:
    if os.environ.get("HPCDECONV_REQUIRE_SLURM") == "1":
        pytest.fail(f"dev SLURM cluster required but unavailable: {reason}")
    pytest.skip(f"dev SLURM cluster unavailable: {reason}")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running single-node SLURM with accounting, started by ``slurm/dev/up.sh``."""
    if os.geteuid() != 0:
        _start_failure("slurm/dev/up.sh must run as root")
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        _start_failure("SLURM is not installed and apt-get is not available to install it")
    proc = subprocess.run(
        ["bash", str(SLURM_DEV / "up.sh")],
        env=_without_launcher(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        _start_failure(lines[-1])
    # sbatch passes its environment on to the job.
    env = _launch_env()
    for line in proc.stdout.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = value
    started_here = "already running" not in proc.stderr
    yield SlurmCluster(state_dir=Path(env["SLURM_CONF"]).parents[1], env=env)
    if started_here:
        subprocess.run(
            ["bash", str(SLURM_DEV / "down.sh")], env=env, capture_output=True, timeout=120
        )


@pytest.fixture
def restored_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Let ``init_process_group`` export its variables; put the old values back afterwards."""
    from hpcdeconv.training import dist

    for key in _LAUNCHER_VARIABLES:
        monkeypatch.setenv(key, "unset-by-test")
    yield
    dist.destroy()
