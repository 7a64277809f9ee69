"""The GPU path end to end: training and resume (single GPU, DeepSpeed ZeRO-1/2 in bf16 and
fp16), GPU checkpoints resumed on the CPU, predict in bf16, the dask driver with a GPU worker
and Richardson-Lucy on CUDA. Every test skips cleanly on machines without CUDA.

Runs are started as ``python -m hpcdeconv`` subprocesses (as users launch them), so each gets
a fresh CUDA context and ``CUBLAS_WORKSPACE_CONFIG`` for deterministic kernels.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

from hpcdeconv.training.checkpoint import load_checkpoint
from hpcdeconv.training.runlog import read_metrics
from tests.conftest import TINY_TRAINING

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = str(REPO / "launch" / "torchrun.sh")
STEPS, STOP = 6, 3


def _env() -> dict[str, str]:
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    # Deterministic cuBLAS, so a resumed run can be compared with an uninterrupted one.
    path = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env | {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONPATH": path}


def _train(
    data: Path,
    run: Path,
    *extra: str,
    flags: tuple[str, ...] = (),
    launcher: tuple[str, ...] = (),
) -> None:
    if "method.name=supervised" not in extra:
        extra = ("method.kernel.size=[7, 7, 7]", *extra)
    overrides = [
        *TINY_TRAINING,
        f"data.path={data}",
        f"train.steps={STEPS}",
        f"train.ckpt_every={STOP}",
        "train.keep_checkpoints=10",
        "train.deterministic=true",
        "train.device=cuda",
        *extra,
    ]
    command = [*launcher, sys.executable, "-m", "hpcdeconv", "train", "--output", str(run)]
    command += [arg for item in overrides for arg in ("--set", item)]
    proc = subprocess.run(
        [*command, *flags], env=_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"train exited {proc.returncode}:\n{proc.stderr[-4000:]}"


def _metrics(run: Path) -> dict[int, dict[str, float]]:
    return {
        r["step"]: {k: v for k, v in r.items() if k not in ("step", "kind")}
        for r in read_metrics(run, "train")
    }


def _break_after_stop(whole: Path, broken: Path) -> None:
    """The state of a run killed between the checkpoints of steps STOP and STEPS."""
    shutil.copytree(whole, broken)
    (broken / "checkpoints" / f"step_{STEPS:08d}.pt").unlink()
    shards = broken / "checkpoints" / "deepspeed" / f"step_{STEPS:08d}"
    if shards.exists():
        shutil.rmtree(shards)
    (broken / "metrics.jsonl").unlink()


def _assert_resumed_like_whole(whole: Path, broken: Path) -> None:
    expected, resumed = _metrics(whole), _metrics(broken)
    assert sorted(resumed) == list(range(STOP + 1, STEPS + 1))
    for step in resumed:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_single_gpu_resume_matches_the_uninterrupted_run(
    tiny_dataset: Path, tmp_path: Path, precision: str
) -> None:
    # The history pools are on (50 images): their generator states are restored from a
    # checkpoint that lived on the GPU (the reported "RNG state must be a torch.ByteTensor").
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    _train(tiny_dataset, whole, f"train.precision={precision}")
    state = load_checkpoint(whole)
    assert len(state["rng"]["cuda"]) == torch.cuda.device_count()
    _break_after_stop(whole, broken)
    _train(tiny_dataset, broken, f"train.precision={precision}", flags=("--resume",))
    _assert_resumed_like_whole(whole, broken)


def test_gpu_checkpoint_resumes_on_the_cpu(tiny_dataset: Path, tmp_path: Path) -> None:
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    _train(tiny_dataset, whole)
    _break_after_stop(whole, broken)
    _train(tiny_dataset, broken, "train.device=cpu", flags=("--resume",))
    expected, resumed = _metrics(whole), _metrics(broken)
    assert sorted(resumed) == list(range(STOP + 1, STEPS + 1))
    # Same state, other kernels (cuDNN may use TF32): close, not identical.
    assert resumed[STOP + 1]["loss_g"] == pytest.approx(expected[STOP + 1]["loss_g"], rel=2e-2)


@pytest.mark.distributed
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_half_precision_trains_and_resumes(
    tiny_dataset: Path, tmp_path: Path, stage: int, precision: str
) -> None:
    extra = (
        f"train.precision={precision}",
        "strategy.name=deepspeed",
        f"strategy.deepspeed.zero_stage={stage}",
    )
    launcher = (TORCHRUN, "1", "--")
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    _train(tiny_dataset, whole, *extra, launcher=launcher)
    state = load_checkpoint(whole)
    # Weights stay fp32 (torch autocast inside the engine); losses are fp32 numbers.
    assert {t.dtype for t in state["deblur"].values() if t.is_floating_point()} == {torch.float32}
    if precision == "fp16":
        assert state["groups"]["G"]["grad_scaler"]["scale"] > 0
    _break_after_stop(whole, broken)
    _train(tiny_dataset, broken, *extra, flags=("--resume",), launcher=launcher)
    _assert_resumed_like_whole(whole, broken)


@pytest.fixture(scope="module")
def gpu_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A supervised run trained on the GPU (norm-free depth-1 U-Net: halo 9)."""
    run = tmp_path_factory.mktemp("gpu") / "run"
    _train(
        tiny_dataset,
        run,
        "method.name=supervised",
        "method.generator.norm=none",
        "method.generator.depth=1",
    )
    return run


@pytest.fixture
def volume_tif(tmp_path: Path) -> Path:
    path = tmp_path / "volume.tif"
    volume = np.random.default_rng(3).random((32, 48, 40)).astype(np.float32)
    tifffile.imwrite(
        path,
        volume,
        imagej=True,
        resolution=(10.0, 10.0),
        metadata={"spacing": 0.2, "unit": "um", "axes": "ZYX"},
    )
    return path


def _full_resolution(store: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The one array of ``shape`` in an output store (wherever its layout puts it)."""
    group = zarr.open_group(store, mode="r")
    found = [a for _, a in group.members(max_depth=None) if isinstance(a, zarr.Array)]
    (array,) = [a for a in found if a.shape == shape]
    return np.asarray(array[...])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "hpcdeconv", *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{args[0]} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


def test_predict_in_bf16_is_close_to_fp32(gpu_run: Path, volume_tif: Path, tmp_path: Path) -> None:
    outputs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.npy"
        _cli(
            "predict",
            "--checkpoint",
            str(gpu_run),
            str(volume_tif),
            "--output",
            str(out),
            "--set",
            "device=cuda",
            "--set",
            f"precision={precision}",
            "--set",
            "tile=[16, 32, 32]",
            "--set",
            "overlap=8",
        )
        outputs[precision] = np.load(out)
    fp32, bf16 = outputs["fp32"], outputs["bf16"]
    assert np.isfinite(bf16).all()
    scale = float(np.abs(fp32).max())
    assert 0 < np.abs(bf16 - fp32).max() <= 2e-2 * scale


def test_dask_driver_with_a_gpu_worker_matches_whole_volume_inference(
    gpu_run: Path, volume_tif: Path, tmp_path: Path
) -> None:
    from hpcdeconv.inference.model import load_model

    out = tmp_path / "out.zarr"
    proc = _cli(
        "deconvolve",
        "--checkpoint",
        str(gpu_run),
        str(volume_tif),
        "--output",
        str(out),
        "--block",
        "24",
        "--set",
        "chunks=[8, 8, 8]",
        "--set",
        "blend=constant",
        "--set",
        "overlap=0",
        "--set",
        "tile=[64, 64, 64]",
        "--workers",
        "1",
    )
    assert "block(s) computed" in proc.stdout
    volume = tifffile.imread(volume_tif)
    result = _full_resolution(out, volume.shape)
    net = load_model(gpu_run, "cuda").net
    halo = 9
    with torch.inference_mode():
        padded = torch.from_numpy(np.pad(volume, halo, mode="symmetric"))[None, None].cuda()
        whole = net(padded)[0, 0, halo:-halo, halo:-halo, halo:-halo].cpu().numpy()
    # Same network, other tile shapes: cuDNN's TF32 kernels (on by default for convolutions)
    # round differently per shape, ~1e-3 relative; a seam or a misplaced block is O(1).
    assert np.abs(result - whole).max() <= 5e-3 * np.abs(whole).max()


def test_rl_command_on_the_gpu_matches_the_cpu(volume_tif: Path, tmp_path: Path) -> None:
    from hpcdeconv.classical.rl import richardson_lucy
    from hpcdeconv.physics.psf import gaussian

    psf = gaussian((9, 9, 9), (1.5, 1.0, 1.0)).astype(np.float32)
    psf_path = tmp_path / "psf.npy"
    np.save(psf_path, psf)
    out = tmp_path / "rl.zarr"
    _cli("rl", "--psf", str(psf_path), str(volume_tif), "--output", str(out), "--workers", "1")
    volume = tifffile.imread(volume_tif)
    result = _full_resolution(out, volume.shape)
    reference = richardson_lucy(volume, psf, iterations=20)
    assert np.abs(result - reference).max() <= 1e-3 * reference.max()
