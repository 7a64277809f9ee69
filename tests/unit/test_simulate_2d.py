"""``hpcdeconv simulate`` making a 2D dataset: (Y, X) phantoms blurred by a 2D PSF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import signal

from hpcdeconv.data.zarr_io import get_split, open_dataset, read_volume
from hpcdeconv.metrics import pcc, snr
from tests.conftest import assert_one_line_error, run_cli

SMALL_2D = [
    "--set",
    "shape=[48, 56]",
    "--set",
    "psf.shape=[11, 11]",
    "--set",
    "psf.voxel_size=[0.05, 0.05]",
    "--set",
    "psf.wavelength=0.6",
    "--set",
    "phantom.filaments_per_mvoxel=3000",
    "--set",
    "split={train: 2, val: 1, test: 1}",
    "--set",
    "storage.chunks=[32, 32]",
]


def _array(group, name: str) -> tuple[np.ndarray, tuple, tuple]:
    data, meta = read_volume(group, name)
    return np.asarray(data), meta.voxel_size, meta.axes


def test_simulate_2d_writes_images_psf_and_noise_as_configured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "flat.zarr"
    png = tmp_path / "flat.png"
    code, stdout, err = run_cli(["simulate", str(out), "--png", str(png), *SMALL_2D], capsys)
    assert code == 0, err
    assert "split: train=2, val=1, test=1" in stdout
    group = open_dataset(out)
    assert get_split(group) == {
        "train": ["train000", "train001"],
        "val": ["val000"],
        "test": ["test000"],
    }
    psf, psf_voxel, psf_axes = _array(group, "psf")
    assert psf.shape == (11, 11) and psf_axes == ("y", "x")
    assert psf_voxel == pytest.approx((0.05, 0.05))
    assert psf.sum(dtype=np.float64) == pytest.approx(1.0, abs=1e-5)
    assert np.unravel_index(np.argmax(psf), psf.shape) == (5, 5)
    for name in ("train000", "train001", "val000", "test000"):
        sharp, voxel, axes = _array(group, f"sharp/{name}")
        blurred, blurred_voxel, blurred_axes = _array(group, f"blurred/{name}")
        assert sharp.shape == blurred.shape == (48, 56)
        assert axes == blurred_axes == ("y", "x")
        assert voxel == blurred_voxel == pytest.approx((0.05, 0.05))
        assert sharp.dtype == blurred.dtype == np.float32
        assert sharp.min() >= 0.0 and sharp.max() <= 1.0 and sharp.max() > 0.3
        # Independent forward model: linear convolution with zeros outside, PSF centre at
        # n // 2 (scipy's "same" crop for an odd PSF).
        clean = signal.fftconvolve(sharp.astype(np.float64), psf.astype(np.float64), "same")
        noise = blurred - clean
        # Noise at the requested SNR on the noise component, zero-mean, and blurred is
        # still the blurred phantom (not the sharp one) underneath.
        assert snr(clean, blurred) == pytest.approx(20.0, abs=0.7)
        assert abs(noise.mean()) < 0.1 * noise.std()
        assert pcc(clean, blurred) > pcc(sharp, blurred)
    measured = group.attrs["hpcdeconv"]["simulation"]["measured_snr_db"]
    assert measured["train000"] == pytest.approx(20.0, abs=0.7)
    assert png.stat().st_size > 10_000


def test_simulate_2d_without_noise_is_exactly_the_convolution(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "clean.zarr"
    argv = ["simulate", str(out), *SMALL_2D, "--set", "noise.snr_db=null"]
    assert run_cli(argv, capsys)[0] == 0
    group = open_dataset(out)
    psf, _, _ = _array(group, "psf")
    sharp, _, _ = _array(group, "sharp/test000")
    blurred, _, _ = _array(group, "blurred/test000")
    clean = signal.fftconvolve(sharp.astype(np.float64), psf.astype(np.float64), "same")
    np.testing.assert_allclose(blurred, clean, atol=1e-6)


@pytest.mark.parametrize("kind", ["cells", "points"])
def test_simulate_2d_texture_phantoms(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    out = tmp_path / f"{kind}.zarr"
    argv = ["simulate", str(out), *SMALL_2D, "--set", f"phantom.kind={kind}"]
    assert run_cli(argv, capsys)[0] == 0
    sharp, _, axes = _array(open_dataset(out), "sharp/train000")
    assert sharp.shape == (48, 56) and axes == ("y", "x") and sharp.max() > 0


def test_simulate_2d_with_a_gaussian_psf(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gauss.zarr"
    argv = [
        "simulate",
        str(out),
        "--set",
        "shape=[32, 32]",
        "--set",
        "psf={model: gaussian, shape: [9, 9], voxel_size: [0.1, 0.1], sigma: [1.5, 1.0]}",
        "--set",
        "split={train: 1, val: 0, test: 0}",
    ]
    assert run_cli(argv, capsys)[0] == 0
    psf, voxel, axes = _array(open_dataset(out), "psf")
    assert psf.shape == (9, 9) and axes == ("y", "x") and voxel == pytest.approx((0.1, 0.1))
    assert psf.sum(dtype=np.float64) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["shape=[48, 56]"], "psf.shape (31, 31, 31) has 3 axes but the images (48, 56) have 2"),
        (["psf.shape=[11, 11]", "psf.voxel_size=[0.1, 0.1]"], "has 2 axes but the images"),
        (["shape=[48, 56]", "psf.shape=[11, 11]"], "one entry per axis"),
        (["phantom.kind=cells"], "2D only"),
    ],
)
def test_simulate_psf_axes_must_match_the_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], fragment: str
) -> None:
    out = tmp_path / "bad.zarr"
    argv = ["simulate", str(out)] + [a for o in overrides for a in ("--set", o)]
    code, _, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, fragment)
    assert not out.exists()


def test_simulate_2d_example_config_validates() -> None:
    from hpcdeconv.config import SimulateConfig, load_config

    config = Path(__file__).resolve().parents[2] / "configs" / "simulate_2d.yaml"
    cfg = load_config(SimulateConfig, config)
    assert len(cfg.shape) == len(cfg.psf.shape) == 2
