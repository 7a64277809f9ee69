"""The dev SLURM from slurm/dev: a 2-task job step finds its ranks and all-reduces over gloo,
accounting records the outcome, a cancelled job is seen to end, and a restarted cluster does
not reuse job ids (an MPI job that shared an id with a killed one hung in MPI_Init)."""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.distributed]


def test_two_task_step_discovers_and_reduces(
    slurm_cluster: SlurmCluster,
    dist_worker: list[str],
    check_allreduce: Callable[[str, int, str], list[dict]],
    tmp_path: Path,
) -> None:
    output = tmp_path / "job.out"
    worker = shlex.join(dist_worker)
    # The batch step itself carries SLURM_PROCID=0 and SLURM_NTASKS=2 but is one process.
    batch_probe = (
        "from dataclasses import asdict; import json; "
        "from hpcdeconv.training.dist import discover; "
        "print('batch_step', json.dumps(asdict(discover())))"
    )
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --job-name=hpcdeconv-dist-test\n"
        "#SBATCH --ntasks=2\n"
        "#SBATCH --time=5\n"
        f"#SBATCH --output={output}\n"
        "set -e\n"
        f"{shlex.quote(dist_worker[0])} -c {shlex.quote(batch_probe)}\n"
        f"srun --mpi=pmi2 {worker}\n"
    )
    job_id, status = slurm_cluster.sbatch_wait(script)
    text = output.read_text()
    assert status == 0, text
    reports = check_allreduce(text, 2, "slurm")
    assert {r["master_port"] for r in reports} == {10000 + 101 * job_id % 50000}
    assert {r["run_id"] for r in reports} == {f"SLURM job {job_id} step 0"}
    assert sorted(r["local_rank"] for r in reports) == [0, 1]
    batch_line = next(line for line in text.splitlines() if line.startswith("batch_step "))
    batch = json.loads(batch_line.removeprefix("batch_step "))
    assert (batch["launcher"], batch["world_size"]) == ("single", 1)
    states = slurm_cluster.job_states(job_id)
    assert states == {
        str(job_id): "COMPLETED",
        f"{job_id}.batch": "COMPLETED",
        f"{job_id}.0": "COMPLETED",
    }


def test_cancelled_job_is_accounted(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = slurm_cluster.run(
        "sbatch", "--parsable", "--output=/dev/null", "--wrap", "sleep 120", cwd=tmp_path
    )
    job_id = int(out.strip().split(";")[0])
    deadline = time.monotonic() + 30
    while slurm_cluster.run("squeue", "-h", "-j", str(job_id), "-o", "%T").strip() != "RUNNING":
        assert time.monotonic() < deadline, "job never started"
        time.sleep(0.2)
    slurm_cluster.run("scancel", str(job_id))
    assert slurm_cluster.job_states(job_id)[str(job_id)] == "CANCELLED"


def _first_job(cluster: SlurmCluster, tmp_path: Path, name: str, body: str) -> tuple[int, int]:
    script = tmp_path / f"{name}.sh"
    script.write_text(
        "#!/bin/bash\n#SBATCH --ntasks=2\n#SBATCH --overcommit\n"
        f"#SBATCH --output={tmp_path / name}.out\n"
        f"srun --mpi=pmi2 {shlex.quote(sys.executable)} -c {shlex.quote(body)}\n"
    )
    return cluster.sbatch_wait(script, timeout=90)


def test_restarted_cluster_does_not_reuse_the_job_id_of_a_killed_mpi_job(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    # Ranks killed after MPI_Init leave mpich's node segment in /dev/shm, named after the
    # SLURM job and step. When every start of the dev cluster began at job 1, the first MPI job
    # of the next start attached to that stale segment and waited in MPI_Init forever.
    shm = Path("/dev/shm")
    before = set(shm.iterdir())
    killed = "import os; from mpi4py import MPI; MPI.COMM_WORLD.Barrier(); os.kill(os.getpid(), 9)"
    reduce = "from mpi4py import MPI; print('sum', MPI.COMM_WORLD.allreduce(1))"
    try:
        slurm_cluster.restart()
        first_id, _ = _first_job(slurm_cluster, tmp_path, "killed", killed)
        assert "Killed" in (tmp_path / "killed.out").read_text()
        slurm_cluster.restart()
        second_id, status = _first_job(slurm_cluster, tmp_path, "reduce", reduce)
        log = (tmp_path / "reduce.out").read_text()
        assert status == 0, log
        assert log.count("sum 2") == 2
        assert second_id > first_id
    finally:
        for stale in set(shm.iterdir()) - before:
            if stale.name.startswith("mpich_shm_"):
                stale.unlink(missing_ok=True)
