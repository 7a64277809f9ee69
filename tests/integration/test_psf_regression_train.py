"""PSF-parameter regression through the CLI: ``hpcdeconv train`` then ``psfnet evaluate``,
resume after a kill, a 2-rank DDP run, and the refusals (predict, a mismatched store)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from hpcdeconv.training.checkpoint import load_checkpoint
from hpcdeconv.training.runlog import read_metrics
from tests.unit.test_psf_regression import write_toy_store

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
HPCDECONV = [sys.executable, "-m", "hpcdeconv.cli"]
TORCHRUN = str(REPO / "launch" / "torchrun.sh")
CONFIG = REPO / "configs" / "psfnet_train_g1.yaml"
STEPS = 8


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("psf") / "g1.zarr"
    write_toy_store(path, n=192)
    return path


def _env() -> dict[str, str]:
    # One thread: identical float reduction order in every process.
    keep = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**keep, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _train_argv(data: Path, run: Path, *extra: str) -> list[str]:
    argv = ["train", "--config", str(CONFIG), "--output", str(run)]
    for item in [
        f"data.path={data}",
        f"train.steps={STEPS}",
        "train.deterministic=true",
        "train.device=cpu",
        "train.log_every=1",
        "train.val_every=4",
        "train.ckpt_every=2",
        "train.keep_checkpoints=10",
        "train.ema_decay=0.9",
        "method.network.width=4",
        "data.batch_size=4",
        "data.val_samples=32",
        *extra,
    ]:
        argv += ["--set", item]
    return argv


def _run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*HPCDECONV, *argv], env=_env(), capture_output=True, text=True, timeout=300, **kw
    )


def _error_lines(stderr: str) -> int:
    """Lines of stderr that are not log records (``HH:MM:SS LEVEL name: ...``)."""
    lines = stderr.strip().splitlines()
    return len([line for line in lines if " INFO " not in line and " WARNING " not in line])


def test_train_evaluate_and_the_refusals(store: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _run(_train_argv(store, run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"trained psf_regression for {STEPS} steps" in proc.stdout
    val = [r for r in read_metrics(run, "val_ema")]
    assert [r["step"] for r in val] == [4, 8] and all("r2_width" in r for r in val)
    assert (run / "checkpoints" / "best").exists()

    out = tmp_path / "scores.json"
    proc = _run(["psfnet", "evaluate", "--checkpoint", str(run), str(store), "--json", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["samples"] == 32 and report["split"] == "test"
    assert report["valid_counts"] == {"width": 28}
    assert "R² width" in proc.stdout and "a0 accuracy" in proc.stdout
    # The evaluation of the val split equals the run's own validation of those samples.
    proc = _run(
        [
            "psfnet",
            "evaluate",
            "--checkpoint",
            str(run),
            str(store),
            "--split",
            "val",
            "--json",
            str(tmp_path / "val.json"),
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = json.loads((tmp_path / "val.json").read_text())
    chosen = max(val, key=lambda r: r["r2"])  # the best checkpoint, EMA weights
    assert best["r2"] == pytest.approx(chosen["r2"], rel=1e-5, abs=1e-6)

    # A store made with another PSF model is refused in one line.
    other = tmp_path / "g2.zarr"
    write_toy_store(other, n=24, model_name="gaussian2")
    proc = _run(["psfnet", "evaluate", "--checkpoint", str(run), str(other)])
    assert proc.returncode == 2
    assert "PSF model gaussian2" in proc.stderr and "trained for gaussian1" in proc.stderr
    assert _error_lines(proc.stderr) == 1

    # predict refuses a regressor checkpoint in one line.
    image = tmp_path / "image.tif"
    tifffile.imwrite(image, np.random.default_rng(0).random((32, 32), dtype=np.float32))
    proc = _run(
        ["predict", "--checkpoint", str(run), str(image), "--output", str(tmp_path / "o.tif")]
    )
    assert proc.returncode == 2
    assert "psf_regressor model" in proc.stderr
    assert _error_lines(proc.stderr) == 1
    assert not (tmp_path / "o.tif").exists()


def test_sigkill_then_resume_equals_uninterrupted(store: Path, tmp_path: Path) -> None:
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    proc = _run(_train_argv(store, whole))
    assert proc.returncode == 0, proc.stderr[-3000:]

    killed = subprocess.Popen(
        [*HPCDECONV, *_train_argv(store, broken)],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = broken / "checkpoints" / "step_00000002.pt"
    deadline = time.monotonic() + 300
    while not first.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    stopped = load_checkpoint(broken)["step"]
    assert stopped < STEPS, "the run finished before it could be killed"

    proc = _run([*_train_argv(store, broken), "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_checkpoint(whole), load_checkpoint(broken)
    assert b["step"] == STEPS
    for key in ("regressor", "regressor_ema"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=1e-6, atol=1e-7)


@pytest.mark.distributed
def test_two_rank_ddp_run(store: Path, tmp_path: Path, launch_env: dict[str, str]) -> None:
    run = tmp_path / "ddp"
    argv = _train_argv(store, run, "strategy.name=ddp", "strategy.backend=gloo")
    proc = subprocess.run(
        [TORCHRUN, "2", "--", *HPCDECONV, *argv],
        env=launch_env | {"OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count(f"trained psf_regression for {STEPS} steps") == 1
    state = load_checkpoint(run)
    assert state["world_size"] == 2 and state["artefact"]["kind"] == "psf_regressor"
    assert all(torch.isfinite(t).all() for t in state["regressor"].values())
