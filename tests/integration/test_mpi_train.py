"""``launch/mpirun.sh 2 -- hpcdeconv train``: ranks from mpi4py, collectives over gloo, DDP."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpcdeconv.training.checkpoint import load_checkpoint
from hpcdeconv.training.runlog import read_metrics
from tests.conftest import TINY_TRAINING

pytestmark = [pytest.mark.distributed, pytest.mark.mpi]

REPO = Path(__file__).resolve().parents[2]
STEPS = 3


def test_mpiexec_two_ranks_train_with_ddp(
    tiny_dataset: Path, tmp_path: Path, launch_env: dict[str, str]
) -> None:
    run = tmp_path / "run"
    overrides = [
        *TINY_TRAINING,
        f"data.path={tiny_dataset}",
        "method.kernel.size=[7, 7, 7]",
        f"train.steps={STEPS}",
        "train.ckpt_every=1000",
        "strategy.name=ddp",
    ]
    command = [str(REPO / "launch" / "mpirun.sh"), "2", "--", sys.executable, "-m"]
    command += ["hpcdeconv.cli", "train", "--output", str(run)]
    command += [arg for item in overrides for arg in ("--set", item)]
    proc = subprocess.run(command, env=launch_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Both ranks found themselves through MPI and met in one gloo process group.
    for rank in (0, 1):
        assert f"rank {rank}/2 joined the gloo process group" in proc.stderr
    assert proc.stdout.count(f"trained blind_cyclegan for {STEPS} steps") == 1

    state = load_checkpoint(run)
    assert state["step"] == STEPS
    assert state["config"]["strategy"]["name"] == "ddp"
    assert [r["step"] for r in read_metrics(run, "train")] == list(range(1, STEPS + 1))
    assert all(torch.isfinite(t).all() for t in state["deblur"].values())
