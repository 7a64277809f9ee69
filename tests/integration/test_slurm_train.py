"""``sbatch slurm/train_blind.sh`` on the dev SLURM: a 2-task DDP job trains to the end,
a job signalled with SIGUSR1 checkpoints, requeues itself and resumes without losing a step,
and the script refuses to run outside SLURM or with inconsistent requests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from hpcdeconv.training.checkpoint import list_checkpoints, load_checkpoint
from hpcdeconv.training.runlog import read_metrics
from tests.conftest import TINY_TRAINING
from tests.integration.conftest import run_sbatch

if TYPE_CHECKING:
    from conftest import SlurmCluster

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "train_blind.sh"
CONFIG = REPO / "configs" / "blind.yaml"
JOB_NAME = "hpcdeconv-blind"
# The header asks for 4 GPUs per node; the dev cluster is one 2-core CPU node.
CPU_NODE = ("--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10")
STEPS = 10
REQUEUE_STEPS = 16


def _overrides(data: Path, steps: int) -> list[str]:
    return [
        *TINY_TRAINING,
        f"data.path={data}",
        f"train.steps={steps}",
        "method.kernel.size=[7, 7, 7]",
        "strategy.name=ddp",
        # Only a stop and the final step write checkpoints, so each one is attributable.
        "train.ckpt_every=1000",
        "train.image_every=1000",
        "train.keep_checkpoints=10",
    ]


def _job_env(cluster: SlurmCluster, **extra: str) -> dict[str, str]:
    # The job's working directory has no .venv: name the interpreter's own.
    return cluster.env | {"HPCDECONV_VENV": str(Path(sys.executable).parents[1])} | extra


def _sbatch(
    env: dict[str, str], workdir: Path, *script_args: str, wait: bool, timeout: float = 240.0
) -> tuple[int, int]:
    """Submit the script on a CPU node from ``workdir``; return (job id, sbatch status)."""
    options = ["--parsable", *CPU_NODE, *(["--wait"] if wait else [])]
    proc = run_sbatch(["sbatch", *options, str(SCRIPT), *script_args], env, workdir, timeout)
    assert proc.stdout.strip(), f"sbatch printed no job id: {proc.stderr}"
    return int(proc.stdout.strip().split(";")[0]), proc.returncode


def _set_args(data: Path, steps: int, run: Path) -> list[str]:
    return [*(f"--set={item}" for item in _overrides(data, steps)), "--output", str(run)]


def _log(workdir: Path, job_id: int) -> str:
    path = workdir / f"{JOB_NAME}-{job_id}.out"
    return path.read_text() if path.exists() else f"(no job output at {path})"


def _train_steps(run: Path) -> list[int]:
    return [record["step"] for record in read_metrics(run, "train")]


def _sacct_runs(cluster: SlurmCluster, job_id: int, timeout: float = 30.0) -> list[str]:
    """States of every run of the job (``--duplicates``: a requeued job has several)."""
    deadline = time.monotonic() + timeout
    while True:
        out = cluster.run(
            "sacct", "-j", str(job_id), "--duplicates", "-n", "-P", "-o", "JobID,State"
        )
        states = [
            state.split()[0]
            for job, state in (line.split("|", 1) for line in out.splitlines() if "|" in line)
            if job == str(job_id)
        ]
        if (states and states[-1] not in ("PENDING", "RUNNING")) or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


@pytest.mark.slurm
@pytest.mark.distributed
def test_two_task_ddp_job_completes(
    slurm_cluster: SlurmCluster, tiny_dataset: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    job_id, status = _sbatch(
        _job_env(slurm_cluster),
        tmp_path,
        str(CONFIG),
        *_set_args(tiny_dataset, STEPS, run),
        wait=True,
    )
    log = _log(tmp_path, job_id)
    assert status == 0, log
    assert slurm_cluster.job_states(job_id) == {
        str(job_id): "COMPLETED",
        f"{job_id}.batch": "COMPLETED",
        f"{job_id}.0": "COMPLETED",
    }
    assert "rank 0/2 joined the gloo process group" in log, log
    assert "rank 1/2 joined the gloo process group" in log, log
    assert [p.name for p in list_checkpoints(run)] == [f"step_{STEPS:08d}.pt"]
    state = load_checkpoint(run)
    assert state["step"] == STEPS
    assert state["config"]["strategy"]["name"] == "ddp"
    assert _train_steps(run) == list(range(1, STEPS + 1))
    assert (run / "psf" / "psf_learned_smoothed.tif").is_file()


def _wait_for_step(run: Path, step: int, cluster: SlurmCluster, job_id: int) -> None:
    deadline = time.monotonic() + 180
    while not (run.is_dir() and _train_steps(run) and max(_train_steps(run)) >= step):
        state = cluster.run("squeue", "-h", "-j", str(job_id), "-o", "%T").strip()
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"job left the queue: {state!r}"
        assert time.monotonic() < deadline, f"step {step} not reached in time"
        time.sleep(0.1)


def _job_report(cluster: SlurmCluster, job_id: int) -> str:
    """sacct's account of every run of a job and the daemons' last log lines, for a failure."""
    runs = cluster.run(
        "sacct", "-j", str(job_id), "--duplicates", "-P",
        "-o", "JobID,State,ExitCode,DerivedExitCode,Reason,Start,End",
    )  # fmt: skip
    logs = [
        f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-25:])
        for path in sorted((cluster.state_dir / "log").glob("slurm*"))
    ]
    return "\n".join(["", "--- sacct", runs, *logs])


@pytest.mark.slurm
@pytest.mark.distributed
def test_usr1_checkpoints_requeues_and_resumes(
    slurm_cluster: SlurmCluster, tiny_dataset: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    # Configuration and overrides through the environment this time.
    items = [*_overrides(tiny_dataset, REQUEUE_STEPS), f"output={run}"]
    env = _job_env(
        slurm_cluster,
        HPCDECONV_CONFIG=str(CONFIG),
        # Whitespace separates the items: lists are written without spaces.
        HPCDECONV_OVERRIDES=" ".join(item.replace(" ", "") for item in items),
    )
    job_id, status = _sbatch(env, tmp_path, wait=False, timeout=30)
    assert status == 0
    _wait_for_step(run, 2, slurm_cluster, job_id)
    # What --signal=USR1@120 does: SIGUSR1 to the tasks of the job steps, not the batch shell.
    slurm_cluster.run("scancel", "--signal=USR1", str(job_id))
    slurm_cluster.wait_until_gone(job_id)
    log = _log(tmp_path, job_id)

    runs = _sacct_runs(slurm_cluster, job_id)
    assert runs == ["REQUEUED", "COMPLETED"], log + _job_report(slurm_cluster, job_id)
    checkpoints = [p.name for p in list_checkpoints(run)]
    assert len(checkpoints) == 2, (checkpoints, log)
    stopped = int(checkpoints[0].removeprefix("step_").removesuffix(".pt"))
    assert 2 <= stopped < REQUEUE_STEPS, log
    assert checkpoints[1] == f"step_{REQUEUE_STEPS:08d}.pt"
    assert load_checkpoint(run)["step"] == REQUEUE_STEPS
    # Every step trained exactly once: the second run started where the first one stopped.
    assert _train_steps(run) == list(range(1, REQUEUE_STEPS + 1)), log
    assert f"resumed {run}/checkpoints/step_{stopped:08d}.pt at step {stopped}" in log, log
    # --open-mode=append: both runs are in the one log.
    assert f"job {job_id} run 1 " in log and f"job {job_id} run 2 " in log, log
    assert (run / "psf" / "psf_learned_smoothed.tif").is_file()


@pytest.mark.slurm
@pytest.mark.distributed
def test_world_size_mismatch_reaches_the_job_log(
    slurm_cluster: SlurmCluster, tiny_dataset: Path, tmp_path: Path
) -> None:
    # sbatch passes the submitting shell's environment on, a stale WORLD_SIZE included.
    env = _job_env(slurm_cluster, WORLD_SIZE="3")
    args = _set_args(tiny_dataset, STEPS, tmp_path / "run")
    job_id, status = _sbatch(env, tmp_path, str(CONFIG), *args, wait=True, timeout=120)
    log = _log(tmp_path, job_id)
    assert status != 0, log
    assert "hpcdeconv train: error: WORLD_SIZE=3 contradicts SLURM_NTASKS, which gives 2" in log
    assert slurm_cluster.job_states(job_id)[str(job_id)] == "FAILED"


def _script_env(**extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HPCDECONV_"))}
    return clean | extra


def test_outside_slurm_explains_how_to_submit() -> None:
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(CONFIG)],
        env=_script_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "train_blind.sh: not inside a SLURM job; submit it with: "
        "sbatch slurm/train_blind.sh CONFIG [--set KEY=VALUE ...]"
    ]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], {}, "no configuration: pass CONFIG as the first argument or set HPCDECONV_CONFIG"),
        (["missing.yaml"], {}, "configuration missing.yaml not found"),
        (
            [str(CONFIG)],
            {"SLURM_GPUS_PER_NODE": "a100:2", "SLURM_NTASKS_PER_NODE": "4"},
            "--ntasks-per-node=4 but --gpus-per-node=a100:2: start one task per GPU",
        ),
        ([str(CONFIG)], {"HPCDECONV_VENV": "/nonexistent"}, "HPCDECONV_VENV=/nonexistent has no"),
    ],
)
def test_bad_request_fails_before_srun(
    args: list[str], env: dict[str, str], message: str, tmp_path: Path
) -> None:
    # A job id makes the script believe it runs in a job; every case fails before srun.
    proc = subprocess.run(
        ["bash", str(SCRIPT), *args],
        env=_script_env(SLURM_JOB_ID="1", **env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"train_blind.sh: error: {message}"), proc.stderr
    assert "srun" not in proc.stderr
