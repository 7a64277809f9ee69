"""Rendezvous faults that used to hang or mix runs, each now one line within ``timeout_s``.

- A listener that accepts the connection and never answers (torch's store client waits for
  it forever): the rank gives up after the timeout.
- Two SLURM steps given one port (the reported case: both derived it from the job id; here
  both are given it through ``SLURM_STEP_RESV_PORTS``): the second step's rank 1 reaches the
  first step's store and is refused, before the first step has formed and after; its rank 0
  finds the port taken; the first step completes its all-reduce untouched.
- On the dev SLURM: two ``srun`` steps of ``hpcdeconv train`` running at once in one
  allocation take different ports and both finish.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch.distributed as tdist

from hpcdeconv.training import dist
from hpcdeconv.training.checkpoint import list_checkpoints
from tests.conftest import TINY_TRAINING

if TYPE_CHECKING:
    from conftest import SlurmCluster

pytestmark = pytest.mark.distributed

HPCDECONV = [sys.executable, "-m", "hpcdeconv.cli"]
ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
JOB_ID = 4242
TIMEOUT_S = 3

# One rank of the first step: joins, says so, holds the group until told to go on, then
# all-reduces (rank + 1) * [0, 1, 2, 3] and reports.
HOLDING_WORKER = r"""
import json, sys, time
from pathlib import Path

import torch
import torch.distributed as tdist

from hpcdeconv.training import dist
from hpcdeconv.training.checkpoint import list_checkpoints

signals = Path(sys.argv[1])
env = dist.discover()
dist.init_process_group(env, backend="gloo", timeout_s=120.0)
(signals / f"joined-{env.rank}").touch()
deadline = time.monotonic() + 180
while not (signals / "go").exists() and time.monotonic() < deadline:
    time.sleep(0.1)
values = torch.arange(4, dtype=torch.float64) * (env.rank + 1)
tdist.all_reduce(values)
print(json.dumps({"rank": env.rank, "run_id": env.run_id, "reduced": values.tolist()}))
dist.destroy()
"""


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """Port of a TCP listener that accepts every connection and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _train(
    env: dict[str, str], data: Path, run: Path, timeout_s: float = TIMEOUT_S
) -> tuple[subprocess.CompletedProcess[str], float]:
    """``hpcdeconv train`` of a tiny DDP run; returns the process and its wall time (s)."""
    overrides = [
        *TINY_TRAINING,
        f"data.path={data}",
        f"output={run}",
        "strategy.name=ddp",
        f"strategy.timeout_s={timeout_s:g}",
    ]
    args = [arg for item in overrides for arg in ("--set", item)]
    start = time.monotonic()
    proc = subprocess.run(
        [*HPCDECONV, "train", *args], env=env, capture_output=True, text=True, timeout=180
    )
    return proc, time.monotonic() - start


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The single ``hpcdeconv train: error:`` line of a run that exited 2."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hpcdeconv train:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
    return errors[0]


def _step_env(base: dict[str, str], step: int, rank: int, port: int) -> dict[str, str]:
    """What srun gives task ``rank`` of step ``step`` of a 2-task step of job ``JOB_ID`` whose
    reserved port is ``port``."""
    return base | {
        "SLURM_JOB_ID": str(JOB_ID),
        "SLURM_JOB_NODELIST": "127.0.0.1",
        "SLURM_STEP_NODELIST": "127.0.0.1",
        "SLURM_STEP_ID": str(step),
        "SLURM_NTASKS": "2",
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank),
        "SLURM_STEP_RESV_PORTS": str(port),
    }


def _wait_for(condition: object, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.usefixtures("restored_env")
def test_listener_that_never_answers_fails_within_timeout(silent_listener: int) -> None:
    # torch's TCPStore client alone waits for this listener's answer forever.
    dist_env = dist.DistEnv(1, 2, 1, "127.0.0.1", silent_listener, "slurm", "SLURM job 5 step 1")
    start = time.monotonic()
    with pytest.raises(dist.RendezvousError) as info:
        dist.init_process_group(dist_env, backend="gloo", timeout_s=TIMEOUT_S)
    elapsed = time.monotonic() - start
    assert str(info.value) == (
        f"rank 1 of 2 (slurm) could not join the process group at 127.0.0.1:{silent_listener} "
        "within 3 s: something accepted the connection but never answered (not this run's "
        "rank 0)"
    )
    # The deadline, then 2 s in which torch could still have answered.
    assert TIMEOUT_S + 2.0 <= elapsed < TIMEOUT_S + 3.0
    assert not tdist.is_initialized()


@pytest.mark.parametrize("master", ["silent listener", "nothing listening"])
def test_train_rank_that_cannot_reach_its_master_exits_2_in_one_line(
    master: str,
    silent_listener: int,
    tiny_dataset: Path,
    tmp_path: Path,
    launch_env: dict[str, str],
) -> None:
    port = silent_listener if master == "silent listener" else _unused_port()
    env = launch_env | {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    proc, elapsed = _train(env, tiny_dataset, tmp_path / "run")
    reason = {
        "silent listener": "something accepted the connection but never answered "
        "(not this run's rank 0)",
        # This one once aborted the interpreter at exit (status -6) instead of exiting 2.
        "nothing listening": "nothing accepted a connection there (Connection refused)",
    }[master]
    assert _one_error_line(proc) == (
        "hpcdeconv train: error: rank 1 of 2 (torchrun) could not join the process group at "
        f"127.0.0.1:{port} within 3 s: {reason}"
    )
    # Interpreter and torch start-up on a loaded 2-core machine plus the 3 s, never a hang.
    assert elapsed < 60
    assert not (tmp_path / "run").exists()


def test_rank_started_before_its_master_waits_for_it(
    tmp_path: Path, launch_env: dict[str, str], dist_worker: list[str]
) -> None:
    port = _unused_port()
    late = subprocess.Popen(
        dist_worker, env=_step_env(launch_env, 0, 1, port), stdout=subprocess.PIPE, text=True
    )
    time.sleep(3.0)
    try:
        master = subprocess.run(
            dist_worker, env=_step_env(launch_env, 0, 0, port), capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        out, _ = late.communicate(timeout=120)
    finally:
        if late.poll() is None:
            late.kill()
            late.wait()
    assert (master.returncode, late.returncode) == (0, 0), master.stderr[-2000:]
    reports = [json.loads(text.strip().splitlines()[-1]) for text in (master.stdout, out)]
    assert [r["reduced"] for r in reports] == [[0.0, 3.0, 6.0, 9.0]] * 2
    assert {r["run_id"] for r in reports} == {f"SLURM job {JOB_ID} step 0"}


def test_second_step_on_the_first_steps_port_is_refused_and_the_first_is_unharmed(
    tiny_dataset: Path, tmp_path: Path, launch_env: dict[str, str]
) -> None:
    port = _unused_port()
    signals = tmp_path / "signals"
    signals.mkdir()
    worker = [sys.executable, "-c", HOLDING_WORKER, str(signals)]
    first: list[subprocess.Popen[str]] = []
    refused = (
        "hpcdeconv train: error: rank 1 of 2 (slurm) could not join the process group at "
        f"127.0.0.1:{port} within 3 s: the store there belongs to SLURM job {JOB_ID} step 0, "
        f"2 ranks, not to this run (SLURM job {JOB_ID} step 1, 2 ranks); two runs were given "
        "one rendezvous port"
    )
    try:
        first.append(
            subprocess.Popen(
                worker, env=_step_env(launch_env, 0, 0, port), stdout=subprocess.PIPE, text=True
            )
        )
        _wait_for(lambda: _listening(port), "step 0's rank 0 to open its store")

        # Step 1's rank 1 while step 0 still waits for its own rank 1: it must not take the
        # place of step 0's rank 1.
        proc, elapsed = _train(_step_env(launch_env, 1, 1, port), tiny_dataset, tmp_path / "a")
        assert _one_error_line(proc) == refused
        assert elapsed < 60

        first.append(
            subprocess.Popen(
                worker, env=_step_env(launch_env, 0, 1, port), stdout=subprocess.PIPE, text=True
            )
        )
        _wait_for(
            lambda: all((signals / f"joined-{rank}").exists() for rank in (0, 1)),
            "step 0 to form",
        )

        # Step 1 again, now that step 0 trains: rank 1 is refused, rank 0 finds the port taken.
        proc, _ = _train(_step_env(launch_env, 1, 1, port), tiny_dataset, tmp_path / "b")
        assert _one_error_line(proc) == refused
        proc, _ = _train(_step_env(launch_env, 1, 0, port), tiny_dataset, tmp_path / "c")
        line = _one_error_line(proc)
        assert line.startswith(
            "hpcdeconv train: error: rank 0 of 2 (slurm) could not join the process group at "
            f"127.0.0.1:{port} within 3 s: "
        )
        assert "address already in use" in line
        assert not any((tmp_path / name).exists() for name in "abc")

        (signals / "go").touch()
        reports = []
        for proc_first in first:
            out, _ = proc_first.communicate(timeout=120)
            assert proc_first.returncode == 0
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc_first in first:
            if proc_first.poll() is None:
                proc_first.kill()
                proc_first.wait()
    assert [r["rank"] for r in reports] == [0, 1]
    assert {r["run_id"] for r in reports} == {f"SLURM job {JOB_ID} step 0"}
    assert all(r["reduced"] == [0.0, 3.0, 6.0, 9.0] for r in reports)


@pytest.mark.slurm
def test_two_concurrent_srun_steps_of_one_allocation_both_train(
    slurm_cluster: SlurmCluster, tiny_dataset: Path, tmp_path: Path
) -> None:
    overrides = [*TINY_TRAINING, f"data.path={tiny_dataset}", "strategy.name=ddp", "train.steps=4"]
    overrides += [f"strategy.timeout_s={60}", "train.ckpt_every=1000", "train.image_every=1000"]
    train = [sys.executable, "-m", "hpcdeconv.cli", "train"]
    train += [arg for item in overrides for arg in ("--set", item)]
    # --overlap: the two steps share the allocation's 2 CPUs instead of running one after
    # the other, as steps of a real job that each take part of it would.
    steps = "\n".join(
        f"srun --overlap -n 2 {shlex.join([*train, '--output', str(tmp_path / f'run{step}')])}"
        f" > {tmp_path / f'step{step}.log'} 2>&1 &\npid{step}=$!"
        for step in (0, 1)
    )
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --job-name=hpcdeconv-two-steps\n"
        "#SBATCH --ntasks=2\n"
        "#SBATCH --time=10\n"
        f"#SBATCH --output={tmp_path / 'job.out'}\n"
        f"{steps}\n"
        "wait $pid0; s0=$?\nwait $pid1; s1=$?\n"
        'echo "steps exited $s0 $s1"\n'
        "exit $((s0 | s1))\n"
    )
    job_id, status = slurm_cluster.sbatch_wait(script, timeout=300)
    logs = [(tmp_path / f"step{step}.log").read_text() for step in (0, 1)]
    assert status == 0, "\n".join([(tmp_path / "job.out").read_text(), *logs])
    # SLURM numbers the steps in the order the two background sruns reach it.
    step_ids = []
    for index, log in enumerate(logs):
        joined = re.findall(r"rank (\d)/2 joined the gloo process group at \S+:(\d+) \((.*)\)", log)
        step_id = int(re.findall(rf"SLURM job {job_id} step (\d+)", log)[0])
        port = str(10000 + (101 * job_id + step_id) % 50000)
        run_id = f"SLURM job {job_id} step {step_id}"
        assert sorted(joined) == [("0", port, run_id), ("1", port, run_id)], log
        step_ids.append(step_id)
        checkpoints = list_checkpoints(tmp_path / f"run{index}")
        assert [p.name for p in checkpoints] == ["step_00000004.pt"]
    assert sorted(step_ids) == [0, 1]
    out = slurm_cluster.run("sacct", "-j", str(job_id), "-n", "-P", "-o", "JobID,State,Start,End")
    times = {}
    for line in out.splitlines():
        job, state, start, end = line.split("|")
        if job in (f"{job_id}.0", f"{job_id}.1"):
            assert state == "COMPLETED", out
            times[job] = (datetime.fromisoformat(start), datetime.fromisoformat(end))
    (start0, end0), (start1, end1) = times[f"{job_id}.0"], times[f"{job_id}.1"]
    assert start1 < end0 and start0 < end1, f"the steps did not run at once:\n{out}"
