"""Resume after SIGKILL reproduces an uninterrupted run; a kill mid-write keeps the old state."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hpcdeconv.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from hpcdeconv.training.runlog import read_metrics
from tests.conftest import TINY_TRAINING

pytestmark = pytest.mark.slow

STEPS = 8


def _cli(data: Path, run: Path, *extra: str) -> list[str]:
    argv = [sys.executable, "-m", "hpcdeconv.cli", "train", "--output", str(run)]
    for item in [
        *TINY_TRAINING,
        f"data.path={data}",
        f"train.steps={STEPS}",
        "train.deterministic=true",
        "method.kernel.size=[7, 7, 7]",
        "train.keep_checkpoints=10",
        *extra,
    ]:
        argv += ["--set", item]
    return argv


def _env() -> dict[str, str]:
    # One thread: identical float reduction order in every process.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _losses(run: Path) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for record in read_metrics(run, "train"):
        out[record["step"]] = {k: v for k, v in record.items() if k not in ("step", "kind")}
    return out


def test_sigkill_then_resume_equals_uninterrupted(tiny_dataset: Path, tmp_path: Path) -> None:
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    subprocess.run(_cli(tiny_dataset, whole), env=_env(), check=True, capture_output=True)

    proc = subprocess.Popen(
        _cli(tiny_dataset, broken), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    first = broken / "checkpoints" / "step_00000002.pt"
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(broken)["step"]
    assert killed_at < STEPS, "the run finished before it could be killed"

    subprocess.run(
        [*_cli(tiny_dataset, broken), "--resume"], env=_env(), check=True, capture_output=True
    )
    expected, got = _losses(whole), _losses(broken)
    assert load_checkpoint(broken)["step"] == STEPS
    for step in range(killed_at + 1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step
    a, b = load_checkpoint(whole)["deblur"], load_checkpoint(broken)["deblur"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


_WRITER = """
import sys, torch
from pathlib import Path
from hpcdeconv.training.checkpoint import save_checkpoint
save_checkpoint(Path(sys.argv[1]), 2, {"format": 1, "config": {}, "step": 2,
                "big": torch.rand(150_000_000)})
"""


def test_kill_while_writing_keeps_previous_checkpoint(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, {"format": 1, "config": {}, "step": 1, "w": torch.ones(3)})
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)])
    ckpt_dir = tmp_path / "checkpoints"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        partial = [p for p in ckpt_dir.iterdir() if p.name.endswith(".tmp")]
        if partial and partial[0].stat().st_size > 1_000_000:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (ckpt_dir / "step_00000002.pt").exists(), "the write finished before the kill"
    state = load_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path).name == "step_00000001.pt"
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
