"""Rank discovery and process-group set-up under real launchers (mpiexec, torchrun), through
the launch/ wrappers, and the errors of a rendezvous that cannot complete: each ends in one
:class:`RendezvousError` within the timeout (more such faults: test_rendezvous.py)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

from hpcdeconv.errors import ConfigError
from hpcdeconv.training import dist

REPO = Path(__file__).resolve().parents[2]
ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")

pytestmark = pytest.mark.distributed


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _launch(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{command} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.mpi
def test_mpirun_wrapper_two_ranks_allreduce(
    launch_env: dict[str, str],
    dist_worker: list[str],
    check_allreduce: Callable[[str, int, str], list[dict]],
) -> None:
    proc = _launch([str(REPO / "launch" / "mpirun.sh"), "2", "--", *dist_worker], launch_env)
    reports = check_allreduce(proc.stdout, 2, "mpi")
    assert sorted(r["local_rank"] for r in reports) == [0, 1]
    assert reports[0]["master_port"] > 0


def test_torchrun_wrapper_two_ranks_allreduce(
    launch_env: dict[str, str],
    dist_worker: list[str],
    check_allreduce: Callable[[str, int, str], list[dict]],
) -> None:
    proc = _launch([str(REPO / "launch" / "torchrun.sh"), "2", "--", *dist_worker], launch_env)
    reports = check_allreduce(proc.stdout, 2, "torchrun")
    assert sorted(r["local_rank"] for r in reports) == [0, 1]


@pytest.mark.parametrize("script", ["torchrun.sh", "mpirun.sh"])
@pytest.mark.parametrize("args", [[], ["2", "hpcdeconv"], ["two", "--", "true"], ["0", "--", "x"]])
def test_wrapper_usage_errors(script: str, args: list[str], launch_env: dict[str, str]) -> None:
    proc = subprocess.run(
        [str(REPO / "launch" / script), *args],
        env=launch_env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"usage: {script} N")


@pytest.mark.usefixtures("restored_env")
def test_single_process_group_reduces() -> None:
    dist_env = dist.discover({})
    dist.init_process_group(dist_env, backend="gloo", timeout_s=10.0)
    values = torch.tensor([1.5, -2.0])
    tdist.all_reduce(values)
    assert values.tolist() == [1.5, -2.0]
    assert tdist.get_world_size() == 1
    assert dist.is_main()
    dist.barrier()
    dist.destroy()
    assert not tdist.is_initialized()


@pytest.mark.usefixtures("restored_env")
def test_unreachable_master_fails_within_timeout() -> None:
    port = _unused_port()
    dist_env = dist.DistEnv(1, 2, 1, "127.0.0.1", port, "slurm")
    start = time.monotonic()
    with pytest.raises(dist.RendezvousError) as info:
        dist.init_process_group(dist_env, backend="gloo", timeout_s=2.0)
    elapsed = time.monotonic() - start
    assert str(info.value) == (
        f"rank 1 of 2 (slurm) could not join the process group at 127.0.0.1:{port} within 2 s: "
        "nothing accepted a connection there (Connection refused)"
    )
    # Connections are retried until the timeout: rank 0 may start after this rank.
    assert 2.0 <= elapsed < 3.0
    assert not tdist.is_initialized()


@pytest.mark.usefixtures("restored_env")
def test_missing_peer_fails_within_timeout() -> None:
    dist_env = dist.DistEnv(0, 2, 0, "127.0.0.1", _unused_port(), "mpi")
    start = time.monotonic()
    with pytest.raises(dist.RendezvousError, match="only 1 of 2 ranks arrived"):
        dist.init_process_group(dist_env, backend="gloo", timeout_s=2.0)
    assert time.monotonic() - start < 15.0


@pytest.mark.usefixtures("restored_env")
def test_store_of_another_program_is_refused_within_timeout() -> None:
    # A torch store no hpcdeconv rank 0 opened: it answers, but never names this run.
    port = _unused_port()
    other = tdist.TCPStore(
        "127.0.0.1", port, 2, True, timedelta(seconds=30), wait_for_workers=False
    )
    dist_env = dist.DistEnv(1, 2, 1, "127.0.0.1", port, "torchrun", "torchrun run x restart 0")
    start = time.monotonic()
    with pytest.raises(dist.RendezvousError, match="no hpcdeconv rank 0 announced its run there"):
        dist.init_process_group(dist_env, backend="gloo", timeout_s=2.0)
    assert 2.0 <= time.monotonic() - start < 5.0
    assert other.num_keys() == 0  # the refused rank wrote nothing there
    assert not tdist.is_initialized()


@pytest.mark.usefixtures("restored_env")
def test_taken_master_port_fails_at_once() -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        dist_env = dist.DistEnv(0, 2, 0, "127.0.0.1", port, "torchrun")
        with pytest.raises(dist.RendezvousError, match="address already in use"):
            dist.init_process_group(dist_env, backend="gloo", timeout_s=30.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_nccl_without_cuda_is_a_config_error() -> None:
    dist_env = dist.DistEnv(0, 1, 0, "127.0.0.1", 0, "single")
    with pytest.raises(ConfigError, match="nccl"):
        dist.init_process_group(dist_env, backend="nccl")
    assert not tdist.is_initialized()


@pytest.mark.gpu
@pytest.mark.usefixtures("restored_env")
def test_auto_backend_on_gpu_is_nccl_and_pins_device() -> None:
    dist.init_process_group(dist.discover({}), backend="auto", timeout_s=30.0)
    assert tdist.get_backend() == "nccl"
    assert torch.cuda.current_device() == 0
    values = torch.tensor([2.0, 3.0], device="cuda")
    tdist.all_reduce(values)
    assert values.tolist() == [2.0, 3.0]
