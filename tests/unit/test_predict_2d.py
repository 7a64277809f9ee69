"""``hpcdeconv predict`` with checkpoints in the artefact format: 2D generators of one and of
three channels on a 2D TIFF, a 3-channel TIFF (channel axis first, and RGB last), a 2D zarr
array and a stack of planes; legacy checkpoints; refused artefacts and layouts."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

from hpcdeconv.cli import main
from hpcdeconv.config import ExperimentConfig, UNetConfig, load_config
from hpcdeconv.inference.model import load_model
from hpcdeconv.models.factory import build_generator, generator_record
from hpcdeconv.training.checkpoint import save_checkpoint
from hpcdeconv.training.engine import CHECKPOINT_FORMAT

#: Depth 1 without normalisation: strictly local, receptive-field radius 9, sizes even.
UNET = UNetConfig(channels=4, depth=1, norm="none", final_activation="none")
#: One tile per image side and constant blending: the stitched output is G on the whole image.
WHOLE = ["--set", "tile=[64, 96]", "--set", "overlap=0", "--set", "blend=constant"]
#: Several tiles per side whose cores see only real data (radius 9 <= overlap // 2).
TILED = ["--set", "tile=[32, 32]", "--set", "overlap=20", "--set", "blend=constant"]


def save_generator(
    run_dir: Path, spatial_dims: int, channels: int, seed: int = 0, kind: str = "image_to_image"
) -> torch.nn.Module:
    """Save an untrained generator in the checkpoint contract format; returns the network."""
    torch.manual_seed(seed)
    net = build_generator(
        UNET, spatial_dims=spatial_dims, in_channels=channels, out_channels=channels
    )
    record = generator_record(
        UNET, spatial_dims=spatial_dims, in_channels=channels, out_channels=channels
    )
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": load_config(ExperimentConfig, None, []).model_dump(mode="json"),
        "step": 0,
        "artefact": {"kind": kind, "key": "deblur", **record},
        "deblur": net.state_dict(),
    }
    save_checkpoint(run_dir, 0, state)
    return net.eval()


def run_whole(net: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """G on a whole ``(C, *S)`` image."""
    with torch.inference_mode():
        return net(torch.from_numpy(image)[None])[0].numpy()


@pytest.fixture(scope="module")
def gray(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    run = tmp_path_factory.mktemp("gray") / "run"
    return run, save_generator(run, spatial_dims=2, channels=1)


@pytest.fixture(scope="module")
def rgb(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    run = tmp_path_factory.mktemp("rgb") / "run"
    return run, save_generator(run, spatial_dims=2, channels=3, seed=1)


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(0).random((64, 96), dtype=np.float32)


def predict(checkpoint: Path, source: Path, output: Path, *extra: str) -> int:
    return main(["predict", str(source), "--checkpoint", str(checkpoint), "--output", str(output),
                 *extra])  # fmt: skip


@pytest.mark.parametrize("settings", [WHOLE, TILED], ids=["whole", "tiled"])
def test_2d_tiff_prediction_equals_the_generator_on_the_whole_image(
    gray: tuple[Path, torch.nn.Module], image: np.ndarray, tmp_path: Path, settings: list[str]
) -> None:
    run, net = gray
    tifffile.imwrite(tmp_path / "in.tif", image)
    assert predict(run, tmp_path / "in.tif", tmp_path / "out.tif", *settings) == 0
    out = tifffile.imread(tmp_path / "out.tif")
    assert out.shape == image.shape
    np.testing.assert_allclose(out, run_whole(net, image[None])[0], atol=1e-5)


def test_3_channel_tiff_runs_a_3_channel_generator_whole(
    rgb: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    run, net = rgb
    image = np.random.default_rng(1).random((3, 64, 96), dtype=np.float32)
    expected = run_whole(net, image)
    tifffile.imwrite(tmp_path / "cyx.tif", image, imagej=True, metadata={"axes": "CYX"})
    assert predict(run, tmp_path / "cyx.tif", tmp_path / "a.tif", *TILED) == 0
    np.testing.assert_allclose(tifffile.imread(tmp_path / "a.tif"), expected, atol=1e-5)
    # An RGB file (Y, X, 3), 8 bits: the samples axis is read as the channels.
    pixels = (image * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", np.moveaxis(pixels, 0, -1), photometric="rgb")
    assert predict(run, tmp_path / "rgb.tif", tmp_path / "b.npy", *WHOLE) == 0
    expected = run_whole(net, pixels.astype(np.float32))
    np.testing.assert_allclose(np.load(tmp_path / "b.npy"), expected, rtol=1e-5, atol=1e-4)
    # Into zarr: an OME-NGFF image with a channel axis "c".
    assert predict(run, tmp_path / "rgb.tif", tmp_path / "c.zarr", *WHOLE) == 0
    group = zarr.open_group(str(tmp_path / "c.zarr" / "deconvolved" / "rgb"), mode="r")
    assert [a["name"] for a in group.attrs["ome"]["multiscales"][0]["axes"]] == ["c", "y", "x"]
    np.testing.assert_allclose(group["0"][...], expected, rtol=1e-5, atol=1e-4)


def test_1_channel_generator_runs_per_channel_and_says_so(
    gray: tuple[Path, torch.nn.Module], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run, net = gray
    image = np.random.default_rng(2).random((3, 64, 96), dtype=np.float32)
    tifffile.imwrite(tmp_path / "cyx.tif", image, imagej=True, metadata={"axes": "CYX"})
    with caplog.at_level(logging.INFO):
        assert predict(run, tmp_path / "cyx.tif", tmp_path / "out.tif", *WHOLE) == 0
    assert "per channel (3 channels, 1-channel generator)" in caplog.text
    expected = np.stack([run_whole(net, c[None])[0] for c in image])
    np.testing.assert_allclose(tifffile.imread(tmp_path / "out.tif"), expected, atol=1e-5)


def test_2d_zarr_array_to_zarr(
    gray: tuple[Path, torch.nn.Module], image: np.ndarray, tmp_path: Path
) -> None:
    run, net = gray
    zarr.create_array(str(tmp_path / "in.zarr"), shape=image.shape, dtype="float32")[:] = image
    assert predict(run, tmp_path / "in.zarr", tmp_path / "out.zarr", *TILED) == 0
    out = zarr.open_array(str(tmp_path / "out.zarr" / "deconvolved" / "in" / "0"), mode="r")
    assert out.shape == image.shape
    np.testing.assert_allclose(out[...], run_whole(net, image[None])[0], atol=1e-5)


def test_2d_generator_runs_a_stack_plane_by_plane(
    gray: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    run, net = gray
    stack = np.random.default_rng(3).random((4, 64, 96), dtype=np.float32)
    tifffile.imwrite(tmp_path / "zyx.tif", stack, photometric="minisblack")
    assert predict(run, tmp_path / "zyx.tif", tmp_path / "out.tif", *TILED) == 0
    expected = np.stack([run_whole(net, plane[None])[0] for plane in stack])
    np.testing.assert_allclose(tifffile.imread(tmp_path / "out.tif"), expected, atol=1e-5)


def test_unset_3d_tile_adapts_to_a_2d_generator_and_a_set_one_is_refused(
    gray: tuple[Path, torch.nn.Module],
    image: np.ndarray,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run, net = gray
    tifffile.imwrite(tmp_path / "in.tif", image)
    assert predict(run, tmp_path / "in.tif", tmp_path / "a.tif") == 0  # default tile (64, 64)
    np.testing.assert_allclose(
        tifffile.imread(tmp_path / "a.tif"), run_whole(net, image[None])[0], atol=1e-3
    )
    capsys.readouterr()
    assert predict(run, tmp_path / "in.tif", tmp_path / "b.tif", "--set", "tile=[8,32,32]") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "hpcdeconv predict: error: tile (8, 32, 32) has 3 axes but the checkpoint's generator "
        "is 2D: give 2 sizes (Y, X)"
    ]
    assert not (tmp_path / "b.tif").exists()


def test_refused_layouts_and_artefacts_are_one_line(
    gray: tuple[Path, torch.nn.Module],
    rgb: tuple[Path, torch.nn.Module],
    image: np.ndarray,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tifffile.imwrite(tmp_path / "in.tif", image)
    volume = tmp_path / "vol.tif"
    tifffile.imwrite(volume, np.zeros((4, 16, 16), np.float32), photometric="minisblack")
    save_generator(tmp_path / "regressor", spatial_dims=2, channels=1, kind="psf_regression")
    save_generator(tmp_path / "three_d", spatial_dims=3, channels=1)
    cases = [
        (tmp_path / "regressor", tmp_path / "in.tif", "is a psf_regression model; "
         "predict/deconvolve need an image-to-image generator"),
        (tmp_path / "three_d", tmp_path / "in.tif", "a 2D image (axes YX); the checkpoint's "
         "generator is 3D and needs (Z, Y, X) volumes"),
        (rgb[0], tmp_path / "in.tif", "1 channel(s) (axes YX, shape (64, 96)) but the "
         "checkpoint's generator takes 3"),
        (rgb[0], volume, "1 channel(s) (axes ZYX, shape (4, 16, 16)) but the "
         "checkpoint's generator takes 3"),
    ]  # fmt: skip
    for checkpoint, source, message in cases:
        capsys.readouterr()
        assert predict(checkpoint, source, tmp_path / "out.tif") == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("hpcdeconv predict: error: ") and message in line
        assert not (tmp_path / "out.tif").exists()


def test_legacy_checkpoint_is_a_3d_one_channel_unet(tmp_path: Path) -> None:
    """A checkpoint without ``artefact`` (written before it existed) still loads."""
    cfg = load_config(
        ExperimentConfig, None, ["method.generator.channels=4", "method.generator.depth=1"]
    )
    torch.manual_seed(0)
    net = build_generator(cfg.method.generator, spatial_dims=3, in_channels=1, out_channels=1)
    state = {
        "format": CHECKPOINT_FORMAT,
        "deblur": net.state_dict(),
        "config": cfg.model_dump(mode="json"),
        "step": 7,
    }
    save_checkpoint(tmp_path / "run", 7, state)
    model = load_model(tmp_path / "run")
    assert (model.spatial_dims, model.channels, model.step) == (3, 1, 7)
    x = torch.rand(1, 1, 8, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(model.net(x), net.eval()(x))


def save_validated_run(run_dir: Path) -> None:
    """A 2D instance-norm generator whose run validated with tiles 48² overlapping by 8."""
    cfg = load_config(
        ExperimentConfig,
        None,
        ["data.patch=[64, 64]", "train.val_tile=[48, 48]", "train.val_overlap=8"],
    )
    unet = UNetConfig(channels=4, depth=1, norm="instance", final_activation="none")
    torch.manual_seed(0)
    net = build_generator(unet, spatial_dims=2, in_channels=1, out_channels=1)
    record = generator_record(unet, spatial_dims=2, in_channels=1, out_channels=1)
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": cfg.model_dump(mode="json"),
        "step": 0,
        "artefact": {"kind": "image_to_image", "key": "deblur", **record},
        "deblur": net.state_dict(),
    }
    save_checkpoint(run_dir, 0, state)


def test_unset_tile_and_overlap_are_the_runs_validation_tiling(tmp_path: Path) -> None:
    # Instance normalisation: each tile is normalised by its own statistics, so the output
    # depends on the tile; predict runs the checkpoint as its validation did.
    run = tmp_path / "run"
    save_validated_run(run)
    image = np.random.default_rng(1).random((80, 112), dtype=np.float32) * np.linspace(
        0, 4, 112, dtype=np.float32
    )
    tifffile.imwrite(tmp_path / "in.tif", image)
    assert predict(run, tmp_path / "in.tif", tmp_path / "default.zarr") == 0
    assert predict(run, tmp_path / "in.tif", tmp_path / "val.tif",
                   "--set", "tile=[48, 48]", "--set", "overlap=8") == 0  # fmt: skip
    assert predict(run, tmp_path / "in.tif", tmp_path / "small.tif",
                   "--set", "tile=[32, 32]", "--set", "overlap=8") == 0  # fmt: skip
    group = zarr.open_group(str(tmp_path / "default.zarr"), mode="r")
    default = group["deconvolved/in/0"][...]
    np.testing.assert_array_equal(default, tifffile.imread(tmp_path / "val.tif"))
    assert np.abs(default - tifffile.imread(tmp_path / "small.tif")).max() > 1e-2
    # What ran is what the output records.
    recorded = group["deconvolved/in"].attrs["predict"]
    assert (recorded["tile"], recorded["overlap"]) == ([48, 48], 8)
