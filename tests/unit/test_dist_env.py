"""Rank discovery from launcher environments: torchrun, SLURM (host lists, ports), single."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hpcdeconv.errors import ConfigError
from hpcdeconv.training.dist import DistEnv, discover
from hpcdeconv.training.slurm_env import expand_hostlist, slurm_master_port

# The variables srun sets for task 1 of a 2-task step (recorded from slurm/dev, trimmed).
SLURM_STEP_TASK1 = {
    "SLURM_JOB_ID": "123457",
    "SLURM_JOB_NODELIST": "gpu[07-08],cpu1",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
    "SLURM_NTASKS": "4",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "1",
    "SLURM_STEP_ID": "0",
    "SLURM_STEPID": "0",
    "PMI_RANK": "1",
    "PMI_SIZE": "4",
}

# A batch script's own environment: no step id, yet SLURM_PROCID and SLURM_NTASKS are set.
SLURM_BATCH_STEP = {
    "SLURM_JOB_ID": "7",
    "SLURM_JOB_NODELIST": "vm",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
}

TORCHRUN = {
    "RANK": "3",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "MASTER_ADDR": "node01",
    "MASTER_PORT": "29500",
    "TORCHELASTIC_RUN_ID": "none",
}


def test_torchrun_env() -> None:
    found = discover(TORCHRUN)
    assert found == DistEnv(3, 8, 1, "node01", 29500, "torchrun", "torchrun run none restart 0")
    restarted = discover(TORCHRUN | {"TORCHELASTIC_RESTART_COUNT": "2"})
    assert restarted.run_id == "torchrun run none restart 2"


def test_rank_variables_without_torchrun_have_a_fixed_run_id() -> None:
    env = {k: v for k, v in TORCHRUN.items() if k != "TORCHELASTIC_RUN_ID"}
    assert discover(env).run_id == "a launch by RANK/WORLD_SIZE variables"


def test_torchrun_wins_over_slurm() -> None:
    # torchrun started by srun inside a job: one SLURM task per node, torchrun's ranks inside.
    env = SLURM_STEP_TASK1 | TORCHRUN
    assert discover(env).launcher == "torchrun"
    assert discover(env).world_size == 8


@pytest.mark.parametrize("missing", ["WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"])
def test_incomplete_torchrun_env_names_the_variable(missing: str) -> None:
    env = {k: v for k, v in TORCHRUN.items() if k != missing}
    with pytest.raises(ConfigError, match=missing):
        discover(env)


def test_slurm_step_env() -> None:
    found = discover(SLURM_STEP_TASK1, use_mpi=False)
    port = 10000 + (101 * 123457 + 0) % 50000
    assert found == DistEnv(1, 4, 1, "gpu07", port, "slurm", "SLURM job 123457 step 0")
    assert found.master_port == 29157


def test_two_steps_of_one_job_get_different_ports_and_run_ids() -> None:
    # The reported case: steps 0 and 1 of one allocation derived one port from the job id.
    step0 = discover(SLURM_STEP_TASK1)
    step1 = discover(SLURM_STEP_TASK1 | {"SLURM_STEP_ID": "1", "SLURM_STEPID": "1"})
    assert (step0.master_port, step1.master_port) == (29157, 29158)
    assert step1.run_id == "SLURM job 123457 step 1"


def test_old_slurm_stepid_variable_alone_is_read() -> None:
    env = {k: v for k, v in SLURM_STEP_TASK1.items() if k != "SLURM_STEP_ID"}
    found = discover(env | {"SLURM_STEPID": "3"})
    assert (found.master_port, found.run_id) == (29160, "SLURM job 123457 step 3")


def test_slurm_reserved_step_ports_win_over_the_derived_port() -> None:
    found = discover(SLURM_STEP_TASK1 | {"SLURM_STEP_RESV_PORTS": "12003-12006"})
    assert found.master_port == 12003
    # An exported MASTER_PORT wins over both.
    env = SLURM_STEP_TASK1 | {"SLURM_STEP_RESV_PORTS": "12003-12006", "MASTER_PORT": "31000"}
    assert discover(env).master_port == 31000


def test_slurm_uses_job_nodelist_without_step_nodelist() -> None:
    env = {k: v for k, v in SLURM_STEP_TASK1.items() if k != "SLURM_STEP_NODELIST"}
    env["SLURM_JOB_NODELIST"] = "a1,b[2-3]"
    assert discover(env).master_addr == "a1"


def test_slurm_master_overrides() -> None:
    env = SLURM_STEP_TASK1 | {"MASTER_PORT": "31000", "MASTER_ADDR": "login2"}
    found = discover(env)
    assert (found.master_addr, found.master_port) == ("login2", 31000)


def test_slurm_batch_step_is_single() -> None:
    found = discover(SLURM_BATCH_STEP, use_mpi=False)
    assert found == DistEnv(0, 1, 0, "127.0.0.1", 0, "single", "a single process")


def test_explicit_world_size_must_match_slurm_ntasks() -> None:
    assert discover(SLURM_STEP_TASK1 | {"WORLD_SIZE": "4"}).world_size == 4
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=2 contradicts SLURM_NTASKS, which gives 4"):
        discover(SLURM_STEP_TASK1 | {"WORLD_SIZE": "2"})


def test_world_size_without_launcher_is_rejected() -> None:
    with pytest.raises(ConfigError, match="WORLD_SIZE=2 contradicts a single-process launch"):
        discover({"WORLD_SIZE": "2"}, use_mpi=False)


@pytest.mark.parametrize(
    ("env", "match"),
    [
        (SLURM_STEP_TASK1 | {"SLURM_PROCID": "one"}, r"SLURM_PROCID='one' is not an integer"),
        (SLURM_STEP_TASK1 | {"SLURM_PROCID": "4"}, "rank 4 is outside a world of 4"),
        (TORCHRUN | {"LOCAL_RANK": "-1"}, "local rank -1 is negative"),
        (TORCHRUN | {"MASTER_PORT": "70000"}, "master port 70000 is not a TCP port"),
        ({k: v for k, v in SLURM_STEP_TASK1.items() if k != "SLURM_JOB_ID"}, "SLURM_JOB_ID"),
        (SLURM_STEP_TASK1 | {"SLURM_STEP_ID": "x"}, r"SLURM_STEP_ID='x' is not an integer"),
        (SLURM_STEP_TASK1 | {"SLURM_STEP_RESV_PORTS": "none"}, "SLURM_STEP_RESV_PORTS='none'"),
        (SLURM_STEP_TASK1 | {"SLURM_STEP_RESV_PORTS": "70000"}, "does not start with a port"),
    ],
)
def test_bad_values_are_config_errors(env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        discover(env)


def test_single() -> None:
    assert discover({}, use_mpi=False) == DistEnv(0, 1, 0, "127.0.0.1", 0, "single")
    assert discover({"MASTER_PORT": "4000"}, use_mpi=False).master_port == 4000


def test_use_mpi_false_never_imports_mpi4py() -> None:
    # In a fresh interpreter: importing mpi4py.MPI would initialise MPI.
    code = (
        "import sys; from hpcdeconv.training.dist import discover; "
        "e = discover({'PMI_RANK': '1', 'PMI_SIZE': '2'}, use_mpi=False); "
        "print(e.launcher, 'mpi4py.MPI' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == ["single", "False"]


@pytest.mark.parametrize(
    ("hostlist", "hosts"),
    [
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("a1,b[2-3]", ["a1", "b2", "b3"]),
        ("n[08-10]", ["n08", "n09", "n10"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("n[1-2]-ib[01-02]", ["n1-ib01", "n1-ib02", "n2-ib01", "n2-ib02"]),
        ("x-1,y", ["x-1", "y"]),
        ("vm", ["vm"]),
    ],
)
def test_expand_hostlist(hostlist: str, hosts: list[str]) -> None:
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("hostlist", ["", "n[1-3", "n1-3]", "n[[1]]", "n[3-1]", "n[a-b]", "n[]"])
def test_malformed_hostlist(hostlist: str) -> None:
    with pytest.raises(ConfigError, match="host list"):
        expand_hostlist(hostlist)


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="needs SLURM's scontrol")
def test_expand_hostlist_matches_scontrol(tmp_path: Path) -> None:
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=ref\nSlurmctldHost=localhost\nNodeName=localhost\n")
    hostlist = "node[01-04,07],a1,b[2-3],n[8-10],r[1-2]n[009-011],c[1,3-4]-ib[1-2],x-1"
    out = subprocess.run(
        ["scontrol", "show", "hostnames", hostlist],
        env={"SLURM_CONF": str(conf), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert expand_hostlist(hostlist) == out.stdout.split()


def test_slurm_master_port() -> None:
    assert slurm_master_port(0, 0) == 10000
    assert slurm_master_port(1, 0) == 10101
    assert slurm_master_port(1, 1) == 10102
    assert slurm_master_port(495, 0) == 10000 + 49995
    assert slurm_master_port(123457, 0) == 29157
    assert slurm_master_port(123457, 5, "12000-12003") == 12000
    assert slurm_master_port(123457, 5, "12000,12007") == 12000
    ports = {slurm_master_port(job, step) for job in range(0, 10**6, 37) for step in (0, 7)}
    assert min(ports) >= 10000
    assert max(ports) < 60000


def test_concurrent_steps_of_one_job_never_share_a_port() -> None:
    for job in (0, 1, 4999, 49999, 123457, 10**7 + 3):
        ports = [slurm_master_port(job, step) for step in range(1000)]
        assert len(set(ports)) == len(ports)


def test_one_step_of_different_jobs_shares_a_port_only_50000_ids_apart() -> None:
    ports = [slurm_master_port(job, 0) for job in range(100000, 150000)]
    assert len(set(ports)) == 50000
    assert slurm_master_port(150000, 0) == slurm_master_port(100000, 0)
