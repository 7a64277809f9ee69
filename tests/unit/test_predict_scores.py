"""``hpcdeconv predict`` on thin stacks and 2D/channel images: --truth scores as the generator
sees the data, --png draws 2D and RGB images as they are, --voxel-size takes one size per
spatial axis, and a 2D zarr image is not asked for a Z voxel size."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image as PILImage

from hpcdeconv.metrics import psnr, ssim
from tests.conftest import assert_one_line_error, run_cli
from tests.unit.test_predict_2d import save_generator


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    save_generator(root / "2d", spatial_dims=2, channels=1)
    save_generator(root / "3d", spatial_dims=3, channels=1)
    save_generator(root / "rgb", spatial_dims=2, channels=3, seed=1)
    return {name: root / name for name in ("2d", "3d", "rgb")}


def predict(run: Path, source: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", str(source), "--checkpoint", str(run), "--output", str(out), *extra]


def scores(line: str) -> list[float]:
    """The four numbers of the score line: PSNR in, out; SSIM in, out."""
    words = line.replace(";", " ").split()
    return [float(w) for w in words if w.replace(".", "").replace("-", "").isdigit()]


@pytest.fixture
def stack(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    """A thin (5, 48, 48) stack and a truth, as TIFFs."""
    rng = np.random.default_rng(0)
    truth = rng.random((5, 48, 48), dtype=np.float32)
    blurred = (truth + 0.1 * rng.standard_normal(truth.shape)).astype(np.float32)
    tifffile.imwrite(tmp_path / "in.tif", blurred, photometric="minisblack")
    tifffile.imwrite(tmp_path / "truth.tif", truth, photometric="minisblack")
    return tmp_path / "in.tif", tmp_path / "truth.tif", truth


def test_a_2d_generator_on_a_thin_stack_is_scored_plane_by_plane(
    runs: dict[str, Path], stack: tuple[Path, Path, np.ndarray], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    source, truth_path, truth = stack
    argv = predict(runs["2d"], source, tmp_path / "o.tif", "--truth", str(truth_path))
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith("PSNR"))
    assert "SSIM (2D, per plane)" in line
    pred = tifffile.imread(tmp_path / "o.tif")
    rng = float(truth.max() - truth.min())
    expected_ssim = np.mean([ssim(p, t, rng) for p, t in zip(pred, truth, strict=True)])
    psnr_in, psnr_out, _, ssim_out = scores(line)
    assert psnr_out == pytest.approx(psnr(pred, truth, rng), abs=0.01)
    assert ssim_out == pytest.approx(expected_ssim, abs=1e-4)
    assert psnr_in == pytest.approx(psnr(tifffile.imread(source), truth, rng), abs=0.01)


def test_a_3d_generator_on_a_thin_stack_uses_the_largest_window_that_fits(
    runs: dict[str, Path], stack: tuple[Path, Path, np.ndarray], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    source, truth_path, truth = stack
    argv = predict(runs["3d"], source, tmp_path / "o.tif", "--truth", str(truth_path))
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith("PSNR"))
    assert "SSIM (3D, window 5)" in line
    pred = tifffile.imread(tmp_path / "o.tif")
    rng = float(truth.max() - truth.min())
    assert scores(line)[3] == pytest.approx(ssim(pred, truth, rng, win_size=5), abs=1e-4)


def test_png_draws_a_2d_image_as_itself_and_an_rgb_image_in_colour(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(1)
    gray = rng.random((48, 64), dtype=np.float32)
    tifffile.imwrite(tmp_path / "gray.tif", gray)
    argv = predict(runs["2d"], tmp_path / "gray.tif", tmp_path / "g.tif", "--png")
    code, _, err = run_cli([*argv, str(tmp_path / "g.png")], capsys)
    assert code == 0, err
    rgb = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    argv = predict(runs["rgb"], tmp_path / "rgb.tif", tmp_path / "c.tif", "--png")
    code, _, err = run_cli([*argv, str(tmp_path / "c.png")], capsys)
    assert code == 0, err
    # One view per row (no made-up XZ/YZ panels): 4 in wide, 3.2 in per row, 2 rows.
    width, height = PILImage.open(tmp_path / "g.png").size
    assert width / height == pytest.approx(4.0 / 6.4, rel=0.05)
    colour = np.asarray(PILImage.open(tmp_path / "c.png").convert("RGB"), dtype=int)
    assert np.abs(colour[..., 0] - colour[..., 1]).max() > 50  # drawn in colour, not gray


def test_voxel_size_takes_one_size_per_spatial_axis(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = np.random.default_rng(2).random((48, 64), dtype=np.float32)
    tifffile.imwrite(tmp_path / "in.tif", image)
    argv = predict(runs["2d"], tmp_path / "in.tif", tmp_path / "o.zarr")
    code, _, err = run_cli([*argv, "--voxel-size", "0.2", "0.1"], capsys)
    assert code == 0, err
    group = zarr.open_group(str(tmp_path / "o.zarr" / "deconvolved" / "in"), mode="r")
    scale = group.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert scale[0]["scale"] == pytest.approx([0.2, 0.1])
    code, _, err = run_cli([*argv, "--overwrite", "--voxel-size", "1", "0.2", "0.1"], capsys)
    assert_one_line_error(
        code, err, "(axes YX) needs two positive sizes DY DX in µm, got 1 0.2 0.1"
    )


def test_a_2d_zarr_image_is_not_asked_for_a_z_voxel_size(
    runs: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    image = np.random.default_rng(3).random((48, 64), dtype=np.float32)
    zarr.create_array(str(tmp_path / "in.zarr"), shape=image.shape, dtype="float32")[:] = image
    argv = predict(runs["2d"], tmp_path / "in.zarr", tmp_path / "o.tif")
    with caplog.at_level(logging.WARNING):
        code, _, err = run_cli([*argv, "--truth", str(tmp_path / "in.zarr")], capsys)
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if "voxel size" in r.getMessage()]
    assert warnings and all("along Y, X not" in w and "DY DX" in w for w in warnings)
    assert not any("Z" in w.split(":", 1)[1] for w in warnings)


def test_psf_and_simulate_draw_a_2d_image_as_one_view(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    psf = ["psf", "--model", "gaussian", "--out", str(tmp_path / "p.npy"), "--png"]
    psf += [str(tmp_path / "p.png"), "--set", "psf.shape=[33, 33]"]
    psf += ["--set", "psf.voxel_size=[0.1, 0.1]", "--set", "psf.sigma=[2, 1]"]
    code, _, err = run_cli(psf, capsys)
    assert code == 0, err
    sim = ["simulate", str(tmp_path / "d.zarr"), "--png", str(tmp_path / "d.png")]
    sim += ["--set", "shape=[48, 56]", "--set", "psf.shape=[11, 11]"]
    sim += ["--set", "psf.voxel_size=[0.05, 0.05]", "--set", "split={train: 1, val: 1, test: 1}"]
    code, _, err = run_cli(sim, capsys)
    assert code == 0, err
    # A figure with XZ and YZ panels is three views wide (10 x 3.2 in per row); one view is
    # 4 in wide.
    for png, rows in (("p.png", 1), ("d.png", 2)):
        width, height = PILImage.open(tmp_path / png).size
        assert width / height == pytest.approx(4.0 / (3.2 * rows), rel=0.05)
