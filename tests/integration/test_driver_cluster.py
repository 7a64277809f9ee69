"""``hpcdeconv deconvolve`` on real clusters: the default local cluster of worker processes,
dask-mpi under ``launch/mpirun.sh``, and ``slurm/deconvolve.sh`` on the dev SLURM both with
dask-jobqueue worker jobs and with dask-mpi under ``srun --mpi=pmi2``. Each run's output is
compared with whole-volume inference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
import zarr

from hpcdeconv.config import ExperimentConfig, load_config
from hpcdeconv.data.zarr_io import create_dataset, write_volume
from hpcdeconv.inference.model import load_model
from hpcdeconv.training.engine import train
from tests.conftest import TINY_TRAINING
from tests.integration.conftest import run_sbatch

if TYPE_CHECKING:
    from conftest import SlurmCluster

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "deconvolve.sh"
HALO = 9  # receptive-field radius of a depth-1 U-Net
# One tile per block (the run validated with smaller ones) and no blending, so outputs equal
# whole-volume inference.
EXACT = ["--block", "24", "--set", "chunks=[8, 8, 8]", "--set", "blend=constant"]
EXACT += ["--set", "overlap=0", "--set", "tile=[64, 64, 64]"]
EXACT += ["--set", "cluster.memory_per_worker=1GiB"]


def hpcdeconv() -> list[str]:
    script = Path(sys.executable).with_name("hpcdeconv")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "hpcdeconv.cli"]


@pytest.fixture(scope="module")
def job(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A norm-free depth-1 checkpoint, a 2 x 2 x 2 block input, and the expected output."""
    root = tmp_path_factory.mktemp("cluster")
    run = root / "run"
    overrides = [
        *TINY_TRAINING,
        f"data.path={tiny_dataset}",
        f"output={run}",
        "method.name=supervised",
        "train.steps=2",
        "method.generator.norm=none",
        "method.generator.depth=1",
    ]
    train(load_config(ExperimentConfig, None, overrides), progress=False)
    volume = np.random.default_rng(11).random((32, 48, 40)).astype(np.float32)
    write_volume(create_dataset(root / "in.zarr"), "blurred/v0", volume, (0.2, 0.1, 0.1))
    with torch.inference_mode():
        padded = torch.from_numpy(np.pad(volume, HALO, mode="symmetric"))
        whole = load_model(run).net(padded[None, None])[0, 0].numpy()
    np.save(root / "expected.npy", whole[HALO:-HALO, HALO:-HALO, HALO:-HALO])
    return {"run": run, "input": root / "in.zarr" / "blurred" / "v0", "root": root}


def deconvolve_args(job: dict[str, Path], output: Path) -> list[str]:
    return ["--checkpoint", str(job["run"]), str(job["input"]), "--output", str(output), *EXACT]


def assert_expected(job: dict[str, Path], output: Path) -> None:
    result = zarr.open_array(output / "deconvolved" / "v0" / "0", mode="r")[...]
    assert np.abs(result - np.load(job["root"] / "expected.npy")).max() <= 1e-5


def run(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=240)


@pytest.mark.distributed
def test_default_local_cluster(
    job: dict[str, Path], launch_env: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "out.zarr"
    args = [*hpcdeconv(), "deconvolve", *deconvolve_args(job, out), "--workers", "2"]
    proc = run(args, launch_env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dashboard http://127.0.0.1:" in proc.stdout
    assert "8 block(s) computed" in proc.stdout
    assert_expected(job, out)


@pytest.mark.mpi
@pytest.mark.distributed
def test_dask_mpi_under_mpirun(
    job: dict[str, Path], launch_env: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "out.zarr"
    mpirun = str(REPO / "launch" / "mpirun.sh")
    command = [*hpcdeconv(), "deconvolve", "--cluster", "mpi", *deconvolve_args(job, out)]
    proc = run([mpirun, "4", "--", *command], launch_env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Rank 1 alone runs the client: one report.
    assert proc.stdout.count("8 block(s) computed") == 1
    assert_expected(job, out)
    proc = run([mpirun, "2", "--", *command, "--overwrite"], launch_env, tmp_path)
    assert proc.returncode == 2
    assert "--cluster mpi needs at least 3 MPI ranks" in proc.stderr


def _sbatch(
    cluster: SlurmCluster, options: list[str], args: list[str], workdir: Path
) -> tuple[int, int]:
    """Submit slurm/deconvolve.sh from the repository root; return (job id, exit status)."""
    env = cluster.env | {"PATH": f"{Path(sys.executable).parent}:{cluster.env['PATH']}"}
    command = ["sbatch", "--parsable", "--wait", f"--chdir={workdir}"]
    command += [f"--output={workdir / 'job.out'}", *options, str(SCRIPT), *args]
    proc = run_sbatch(command, env, REPO, timeout=240)
    return int(proc.stdout.strip().split(";")[0]), proc.returncode


@pytest.mark.slurm
@pytest.mark.distributed
def test_sbatch_script_with_slurm_worker_jobs(
    slurm_cluster: SlurmCluster, job: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out.zarr"
    args = [*deconvolve_args(job, out), "--workers", "1", "--set", "cluster.walltime=00:10:00"]
    job_id, status = _sbatch(slurm_cluster, [], args, tmp_path)
    log = (tmp_path / "job.out").read_text()
    assert status == 0, log[-3000:]
    assert "8 block(s) computed" in log
    assert_expected(job, out)
    assert slurm_cluster.job_states(job_id)[str(job_id)] == "COMPLETED"
    # The worker ran as a job of its own, submitted by dask-jobqueue from inside this one.
    worker_logs = [p.read_text() for p in tmp_path.glob("slurm-*.out")]
    assert len(worker_logs) == 1 and "Start worker at" in worker_logs[0]


@pytest.mark.slurm
@pytest.mark.mpi
@pytest.mark.distributed
def test_sbatch_script_with_dask_mpi_under_srun(
    slurm_cluster: SlurmCluster, job: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out.zarr"
    # Three ranks (scheduler, client, one worker) on the dev node's two CPUs.
    options = ["--ntasks=3", "--overcommit"]
    args = ["--cluster", "mpi", *deconvolve_args(job, out)]
    job_id, status = _sbatch(slurm_cluster, options, args, tmp_path)
    log = (tmp_path / "job.out").read_text()
    assert status == 0, log[-3000:]
    assert log.count("8 block(s) computed") == 1
    assert_expected(job, out)
    states = slurm_cluster.job_states(job_id)
    assert states[str(job_id)] == "COMPLETED" and states[f"{job_id}.0"] == "COMPLETED"


def test_script_outside_slurm_explains_itself(launch_env: dict[str, str], tmp_path: Path) -> None:
    env = {k: v for k, v in launch_env.items() if k != "SLURM_JOB_ID"}
    proc = run(["bash", str(SCRIPT), "--checkpoint", "x", "in.tif"], env, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("deconvolve.sh: not inside a SLURM job")
    assert "sbatch slurm/deconvolve.sh" in proc.stderr and "hpcdeconv deconvolve" in proc.stderr
    assert not any(tmp_path.iterdir())
    assert os.access(SCRIPT, os.X_OK)
