"""``hpcdeconv estimate-psf`` and ``hpcdeconv depth`` end to end, with a tiny untrained
ResNet-34 checkpoint (width 4, 32-pixel window) saved in the engine's checkpoint layout."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from hpcdeconv.cli import main
from hpcdeconv.config import RegressorConfig
from hpcdeconv.config.psfnet import PSFOptics
from hpcdeconv.models.regressor import Regressor
from hpcdeconv.psfnet.depth import depth_index
from hpcdeconv.psfnet.estimate import estimate_psf_map
from hpcdeconv.psfnet.psf_map import PSFMap, read_psf_map, window_starts, write_psf_map
from hpcdeconv.psfnet.psf_models import PSFModel
from hpcdeconv.psfnet.regressor import (
    PSF_REGRESSOR,
    REGRESSOR_KEY,
    load_regressor,
    regressor_record,
)
from hpcdeconv.training.engine import CHECKPOINT_FORMAT

WINDOW = 32
OPTICS = PSFOptics(psf_size=31)


def tiny_checkpoint(path: Path, model_name: str) -> Path:
    """A seeded width-4 ResNet-34 whose invalidity output is pinned at 0 (every window valid)."""
    torch.manual_seed(0)
    model = PSFModel(model_name, OPTICS)
    cfg = RegressorConfig(kind="resnet34", width=4)
    net = Regressor(cfg, len(model.names) + 1)
    with torch.no_grad():
        net.head.bias[:-1] = 0.5
        net.head.bias[-1] = -5.0
    record = regressor_record(cfg, model, WINDOW)
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": {},
        "step": 1,
        "artefact": {"kind": PSF_REGRESSOR, "key": REGRESSOR_KEY, **record},
        REGRESSOR_KEY: net.state_dict(),
    }
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("estimate")
    rng = np.random.default_rng(0)
    image = rng.random((90, 75)).astype(np.float32) * np.linspace(1, 3, 75, dtype=np.float32)
    tifffile.imwrite(root / "image.tif", image)
    tifffile.imwrite(root / "small.tif", image[:20])
    tifffile.imwrite(root / "stack.tif", np.stack([image] * 3), photometric="minisblack")
    return {
        "root": root,
        "image": root / "image.tif",
        "small": root / "small.tif",
        "stack": root / "stack.tif",
        "z3": tiny_checkpoint(root / "z3.pt", "zernike3"),
    }


def _run(*argv: object) -> int:
    return main([str(a) for a in argv])


def test_estimate_psf_writes_the_map_of_the_network(files, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out, png = tmp_path / "map.zarr", tmp_path / "map.png"
    argv = ["estimate-psf", "--checkpoint", files["z3"], files["image"], "--stride", 20]
    assert _run(*argv, "--out", out, "--png", png, "--device", "cpu", "--model", "zernike3") == 0
    m = read_psf_map(out)
    assert m.params.shape == (3, 4, 4) and m.window == WINDOW and m.estimated.all()
    assert png.read_bytes().startswith(b"\x89PNG")
    # The same as the network run here on the same windows.
    loaded = load_regressor(files["z3"], "cpu")
    image = tifffile.imread(files["image"])
    want = estimate_psf_map(image, loaded.predict, loaded.model, WINDOW, 20)
    np.testing.assert_allclose(m.params, want.params, rtol=1e-5, atol=1e-6)
    assert np.ptp(m.params[0]) > 0  # the windows differ
    assert "4x4 windows of 32" in capsys.readouterr().out
    # No silent overwrite; --overwrite replaces.
    assert _run(*argv, "--out", out) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert _run(*argv, "--out", out, "--overwrite") == 0


def test_estimate_psf_on_a_dask_cluster_equals_in_process(files, tmp_path) -> None:  # type: ignore[no-untyped-def]
    single, banded = tmp_path / "single.zarr", tmp_path / "banded.zarr"
    argv = ["estimate-psf", "--checkpoint", files["z3"], files["image"], "--stride", 20]
    assert _run(*argv, "--out", single, "--device", "cpu") == 0
    cluster = [
        "--cluster",
        "local",
        "--workers",
        1,
        "--band-rows",
        1,
        "--set",
        "cluster.dashboard=false",
    ]
    assert _run(*argv, "--out", banded, "--device", "cpu", *cluster) == 0
    a, b = read_psf_map(single), read_psf_map(banded)
    np.testing.assert_allclose(b.params, a.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(b.estimated, a.estimated)


@pytest.mark.parametrize(
    ("image", "extra", "message"),
    [
        ("small", [], "the image [20, 75] is smaller than one 32x32 window"),
        ("image", ["--stride", 80], "stride must be between 1 and the image size 75"),
        ("image", ["--model", "gaussian1"], "trained for the zernike3 PSF model, not gaussian1"),
        ("stack", [], "a PSF map needs a 2D (Y, X) image"),
        ("image", ["--set", "stride=0"], "stride"),
    ],
)
def test_bad_input_is_one_line(files, tmp_path, capsys, image, extra, message) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "bad.zarr"
    argv = ["estimate-psf", "--checkpoint", files["z3"], files[image], "--out", out, *extra]
    assert _run(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_stride_zero_is_refused_by_the_parser(files, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exit_:
        _run(
            "estimate-psf",
            "--checkpoint",
            files["z3"],
            files["image"],
            "--out",
            tmp_path / "m.zarr",
            "--stride",
            0,
        )
    assert exit_.value.code == 2
    assert "--stride: must be positive" in capsys.readouterr().err


def _tilted_map(path: Path, z0: float, gx: float, scale: float) -> PSFMap:
    """A zernike3 map of an image of the plane z = z0 + gx x (µm), 1 wave = ``scale`` µm."""
    model = PSFModel("zernike3", OPTICS)
    shape = (128, 256)
    gy_, gx_ = (len(window_starts(n, 64, 64)) for n in shape)
    x = (np.asarray(window_starts(shape[1], 64, 64)) + 32) * OPTICS.pixel_size
    waves = np.broadcast_to((z0 + gx * x) / scale, (gy_, gx_))
    params = np.stack(
        [np.abs(waves), np.full_like(waves, 0.3), np.where(waves > 0, 1, 3) * math.pi / 4]
    )
    m = PSFMap(
        model,
        params.astype(np.float32),
        np.zeros((gy_, gx_), np.float32),
        np.ones((gy_, gx_), bool),
        64,
        64,
        shape,
        (OPTICS.pixel_size,) * 2,
    )
    write_psf_map(path, m)
    return m


def test_depth_calibrate_then_apply(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    m1 = _tilted_map(tmp_path / "t1.zarr", -20.0, 0.5, 25.0)
    _tilted_map(tmp_path / "t2.zarr", 10.0, -0.2, 25.0)
    cal = tmp_path / "cal.json"
    tilt = [
        "--tilt",
        tmp_path / "t1.zarr",
        -20.0,
        0.0,
        0.5,
        "--tilt",
        tmp_path / "t2.zarr",
        10.0,
        0.0,
        -0.2,
    ]
    assert _run("depth", "--calibrate", cal, *tilt) == 0
    assert "z_true = -50 z + " in capsys.readouterr().out
    out, png = tmp_path / "depth.zarr", tmp_path / "depth.png"
    assert (
        _run("depth", tmp_path / "t1.zarr", "--out", out, "--calibration", cal, "--png", png) == 0
    )
    import zarr

    depth = zarr.open_group(out, mode="r")["depth"][...]
    x = (np.asarray(window_starts(256, 64, 64)) + 32) * OPTICS.pixel_size
    np.testing.assert_allclose(depth, np.broadcast_to(-20.0 + 0.5 * x, depth.shape), atol=1e-3)
    assert png.read_bytes().startswith(b"\x89PNG")
    # Uncalibrated TIFF: the eq. 14 index itself.
    tif = tmp_path / "index.tif"
    assert _run("depth", tmp_path / "t1.zarr", "--out", tif) == 0
    np.testing.assert_allclose(tifffile.imread(tif), depth_index(m1), atol=1e-6)
    # Output never inside an input, never overwritten silently; other models refused.
    assert _run("depth", tmp_path / "t1.zarr", "--out", tmp_path / "t1.zarr" / "d.tif") == 2
    assert _run("depth", tmp_path / "t1.zarr", "--out", tif) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    g = PSFModel("gaussian1", OPTICS)
    write_psf_map(
        tmp_path / "g.zarr",
        PSFMap(
            g,
            np.ones((1, 2, 2), np.float32),
            np.zeros((2, 2), np.float32),
            np.ones((2, 2), bool),
            64,
            64,
            (128, 128),
            (0.325, 0.325),
        ),
    )
    assert _run("depth", tmp_path / "g.zarr", "--out", tmp_path / "g.tif") == 2
    assert "needs a zernike3 PSF map" in capsys.readouterr().err
