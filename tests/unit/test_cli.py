"""The CLI of the foundation: simulate, psf, ingest, info, and their error paths."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile

from hpcdeconv.data.zarr_io import get_split, open_dataset, read_volume
from hpcdeconv.metrics import snr
from hpcdeconv.physics.forward import convolve
from tests.conftest import assert_one_line_error, run_cli

SMALL = [
    "--set",
    "shape=[24, 40, 40]",
    "--set",
    "psf.shape=[9, 9, 9]",
    "--set",
    "split={train: 2, val: 1, test: 1}",
    "--set",
    "storage.chunks=[16, 16, 16]",
]


def test_simulate_writes_dataset_figure_and_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "data.zarr"
    code, stdout, _ = run_cli(
        ["simulate", str(out), "--png", str(tmp_path / "d.png"), *SMALL], capsys
    )
    assert code == 0
    assert "split: train=2, val=1, test=1" in stdout
    group = open_dataset(out)
    assert get_split(group) == {
        "train": ["train000", "train001"],
        "val": ["val000"],
        "test": ["test000"],
    }
    sharp, meta = read_volume(group, "sharp/train000")
    blurred, _ = read_volume(group, "blurred/train000")
    psf, _ = read_volume(group, "psf")
    assert sharp.shape == (24, 40, 40) and meta.voxel_size == (0.1, 0.1, 0.1)
    sim = group.attrs["hpcdeconv"]["simulation"]
    assert sim["config"]["noise"]["snr_db"] == 20.0
    # The stored blurred volume is the stored sharp one through the stored PSF, plus noise
    # at the requested SNR (seed paper's definition on the noise component).
    clean = convolve(np.asarray(sharp), np.asarray(psf))
    assert abs(snr(clean, np.asarray(blurred)) - 20.0) < 0.5
    assert (tmp_path / "d.png").stat().st_size > 10_000
    assert (tmp_path / "data.config.yaml").is_file()


def test_simulate_is_reproducible(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("a.zarr", "b.zarr"):
        assert run_cli(["simulate", str(tmp_path / name), *SMALL], capsys)[0] == 0
    a, _ = read_volume(tmp_path / "a.zarr", "blurred/test000")
    b, _ = read_volume(tmp_path / "b.zarr", "blurred/test000")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_simulate_refuses_existing_output_and_keeps_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "data.zarr"
    assert run_cli(["simulate", str(out), *SMALL], capsys)[0] == 0
    before = np.asarray(read_volume(out, "sharp/train000")[0])
    code, _, err = run_cli(["simulate", str(out), *SMALL, "--set", "seed=9"], capsys)
    assert_one_line_error(code, err, "--overwrite")
    np.testing.assert_array_equal(np.asarray(read_volume(out, "sharp/train000")[0]), before)
    assert run_cli(["simulate", str(out), *SMALL, "--set", "seed=9", "--overwrite"], capsys)[0] == 0
    after = np.asarray(read_volume(out, "sharp/train000")[0])
    assert not np.array_equal(after, before)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("psf.nna=1.2", "unknown configuration key 'psf.nna'; did you mean 'na'?"),
        ("shape=[0, 40, 40]", "shape.0"),
        ("shape=[-3, 40, 40]", "shape.0"),
        ("psf.na=1.5", "must be smaller than n_immersion"),
        ("psf.shape=[31, 31, 31]", "larger than the volume"),
    ],
)
def test_simulate_bad_config_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, fragment: str
) -> None:
    code, _, err = run_cli(
        ["simulate", str(tmp_path / "x.zarr"), *SMALL, "--set", override], capsys
    )
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "x.zarr").exists()


def test_psf_command_writes_tiff_and_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tif, png = tmp_path / "psf.tif", tmp_path / "psf.png"
    argv = ["psf", "--model", "born-wolf", "--out", str(tif), "--png", str(png), "--log"]
    code, stdout, _ = run_cli([*argv, "--set", "psf.shape=[15, 17, 17]"], capsys)
    assert code == 0 and "born_wolf" in stdout
    data = tifffile.imread(tif)
    assert data.shape == (15, 17, 17)
    assert abs(float(data.sum()) - 1.0) < 1e-5
    assert np.unravel_index(np.argmax(data), data.shape) == (7, 8, 8)
    with tifffile.TiffFile(tif) as f:
        assert f.imagej_metadata["spacing"] == pytest.approx(0.1)
    assert png.stat().st_size > 10_000
    code, _, err = run_cli([*argv], capsys)
    assert_one_line_error(code, err, "exists")


@pytest.mark.parametrize("model", ["richards-wolf", "gibson-lanni", "gaussian", "zernike"])
def test_psf_command_every_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model: str
) -> None:
    out = tmp_path / "psf.npy"
    shape = "[33, 33]" if model in ("zernike", "gaussian") else "[9, 15, 15]"
    extra = ["--set", "psf.voxel_size=[0.1, 0.1]", "--set", "psf.sigma=[2, 1]"]
    if model != "gaussian":
        extra = []
    code, _, err = run_cli(
        ["psf", "--model", model, "--out", str(out), "--set", f"psf.shape={shape}", *extra],
        capsys,
    )
    assert code == 0, err
    assert abs(float(np.load(out).sum()) - 1.0) < 1e-5


def test_psf_command_rejects_na_above_index(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(["psf", "--out", str(tmp_path / "p.tif"), "--set", "psf.na=1.6"], capsys)
    assert_one_line_error(code, err, "must be smaller than n_immersion")


def test_ingest_and_info(tmp_path: Path, capsys: pytest.CaptureFixture[str], rng) -> None:
    stack = (rng.random((12, 20, 24)) * 1000).astype(np.uint16)
    tif = tmp_path / "cells.tif"
    tifffile.imwrite(
        tif,
        stack,
        imagej=True,
        resolution=(1 / 0.2, 1 / 0.2),
        metadata={"spacing": 0.5, "unit": "um", "axes": "ZYX"},
    )
    out = tmp_path / "real.zarr"
    code, stdout, _ = run_cli(["ingest", str(tif), "--output", str(out)], capsys)
    assert code == 0 and "blurred/cells" in stdout
    data, meta = read_volume(out, "blurred/cells")
    np.testing.assert_array_equal(np.asarray(data), stack.astype(np.float32))
    assert meta.voxel_size == pytest.approx((0.5, 0.2, 0.2))
    code, stdout, _ = run_cli(["info", str(out)], capsys)
    assert code == 0
    assert "blurred/cells: shape=(12, 20, 24)" in stdout and "blosc" in stdout


def test_ingest_rejects_wrong_dimensions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rng
) -> None:
    tif = tmp_path / "flat.tif"
    tifffile.imwrite(tif, rng.random((20, 24)).astype(np.float32))
    code, _, err = run_cli(
        ["ingest", str(tif), "--output", str(tmp_path / "o.zarr"), "--voxel-size", "1", "1", "1"],
        capsys,
    )
    assert_one_line_error(code, err, "a 2D (Y, X) image of shape (20, 24) (axes YX) needs two")
    assert not (tmp_path / "o.zarr").exists()


def test_info_describes_2d_and_channel_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Files predict, rl --psf-map and estimate-psf read: info refused them as "not a stack".
    plane = np.zeros((40, 50), np.float32)
    tifffile.imwrite(tmp_path / "plane.tif", plane)
    np.save(tmp_path / "plane.npy", plane)
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((40, 50, 3), np.uint8), photometric="rgb")
    lines = {}
    for name in ("plane.tif", "plane.npy", "rgb.tif"):
        code, out, err = run_cli(["info", str(tmp_path / name)], capsys)
        assert code == 0, err
        lines[name] = out.strip()
    assert lines["plane.tif"].endswith(": axes YX -> YX (40, 50) float32 voxel=?x? um")
    assert lines["plane.npy"].endswith(" -> YX (40, 50) float32 voxel=?x? um")
    assert lines["rgb.tif"].endswith(": axes YXS -> CYX (3, 40, 50) uint8 voxel=?x? um")


def test_info_on_corrupt_or_missing_zarr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(["info", str(tmp_path / "missing.zarr")], capsys)
    assert_one_line_error(code, err, "missing.zarr")
    bad = tmp_path / "bad.zarr"
    bad.mkdir()
    (bad / "zarr.json").write_text("{ not json")
    code, _, err = run_cli(["info", str(bad)], capsys)
    assert_one_line_error(code, err, "bad.zarr")


def test_dask_logs_stay_at_warning_after_distributed_is_imported() -> None:
    # distributed sets its loggers' levels when it is imported, inside a command, after the
    # CLI configured logging: the CLI's WARNING must survive that import, without an
    # environment variable that SLURM worker jobs would inherit (their logs keep INFO).
    import subprocess
    import sys

    code = (
        "import logging, os\n"
        "os.environ.pop('DASK_DISTRIBUTED__LOGGING__DISTRIBUTED', None)\n"
        "from hpcdeconv.cli import configure_logging\n"
        "configure_logging(False)\n"
        "import distributed\n"
        "print(logging.getLogger('distributed').getEffectiveLevel())\n"
        "print('DASK_DISTRIBUTED__LOGGING__DISTRIBUTED' in os.environ)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(logging.WARNING), "False"]


def test_info_cuts_a_long_split_of_a_samples_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hpcdeconv.data.samples import write_psf_samples

    store = tmp_path / "samples.zarr"
    split = {"train": range(80), "val": range(80, 90), "test": range(90, 100)}
    params = np.ones((100, 1), np.float32)
    write_psf_samples(
        store, np.zeros((100, 1, 8, 8)), params, ["width"], ["um"], [0.3, 0.3], split=split
    )
    code, out, _ = run_cli(["info", str(store)], capsys)
    assert code == 0
    assert "group, 3 arrays" in out
    assert "split: train=80, val=10, test=10" in out
    assert "  train: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, … (68 more)\n" in out
    assert "  val: 80, 81, 82, 83, 84, 85, 86, 87, 88, 89\n" in out
