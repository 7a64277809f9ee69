"""Leaving a DDP process group and joining the next one, many times in one process (what a
sweep worker does between trials), never hangs.

A DDP module's reducer holds the gloo process group. When the reducer was the last holder
(the trainer let go after the group was destroyed), gloo's destructor ran with the GIL held
and waited for a worker thread that needed the GIL to free the tensors of the last
``all_gather_object``: the process hung for ever. It hung in the second or third cycle of
the two-rank loop below, and it was the cause of the intermittent time-outs of the SLURM
two-task sweep test. :meth:`DDPStrategy.close` now unwraps its groups before the group is
left.
"""

from __future__ import annotations

import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

from hpcdeconv.config import OptimConfig
from hpcdeconv.training import dist
from hpcdeconv.training.launch_env import free_port
from hpcdeconv.training.strategy import DDPStrategy

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]

# One cycle = what one DDP trial of a sweep worker does with the process group.
WORKER = r"""
import os, sys

import torch

from hpcdeconv.config import OptimConfig
from hpcdeconv.training import dist
from hpcdeconv.training.strategy import DDPStrategy

ports = [int(p) for p in sys.argv[1].split(",")]
for port in ports:
    dist.init_process_group(
        dist.discover(dict(os.environ, MASTER_PORT=str(port))), backend="gloo", timeout_s=30
    )
    strategy = DDPStrategy(torch.device("cpu"), "fp32")
    trainable = strategy.wrap(torch.nn.Linear(4, 4), OptimConfig(), total_steps=1)
    trainable.backward(trainable(torch.randn(2, 4)).square().mean())
    trainable.step()
    strategy.agree(lambda: None)  # all_gather_object, as after every checkpoint
    strategy.close()
    del trainable, strategy  # the trainer's end: the last reference to the group's modules
print("cycles", len(ports), flush=True)
"""


def _ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        if (port := free_port()) not in ports:
            ports.append(port)
    return ports


def test_two_ranks_join_and_leave_ddp_groups_many_times(
    launch_env: dict[str, str], tmp_path: Path
) -> None:
    cycles = 12
    script = tmp_path / "cycles.py"
    script.write_text(WORKER)
    ports = ",".join(map(str, _ports(cycles)))
    env = launch_env | {"MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2", "PYTHONPATH": str(REPO)}
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), ports],
            env=env | {"RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        outs = [p.communicate(timeout=60) for p in ranks]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the ranks hung while leaving and joining {cycles} DDP process groups")
    finally:
        for p in ranks:
            p.kill()
    for p, (out, err) in zip(ranks, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert out.strip() == f"cycles {cycles}"


def test_close_frees_the_ddp_modules_while_the_group_still_exists(
    launch_env: dict[str, str],
) -> None:
    # A one-rank group in this process (launch_env: no launcher variables).
    dist.init_process_group(dist.discover(launch_env), backend="gloo", timeout_s=30)
    try:
        strategy = DDPStrategy(torch.device("cpu"), "fp32")
        module = torch.nn.Linear(3, 2)
        trainable = strategy.wrap(module, OptimConfig(), total_steps=1)
        group_alive_when_freed: list[bool] = []
        weakref.finalize(
            trainable.wrapped, lambda: group_alive_when_freed.append(tdist.is_initialized())
        )
        trainable.backward(trainable(torch.randn(4, 3)).sum())
        trainable.step()
        strategy.close()
        # The caller still holds the trainable (as a trainer does): it works on, unwrapped.
        assert group_alive_when_freed == [True]
        assert trainable.wrapped is module
        assert not tdist.is_initialized()
        assert trainable(torch.ones(1, 3)).shape == (1, 2)
    finally:
        dist.destroy()
