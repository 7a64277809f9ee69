"""Ingest: voxel sizes from ImageJ/OME metadata, shape checks, value round trip."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tifffile

from hpcdeconv.config import StorageConfig
from hpcdeconv.data.ingest import ingest_images
from hpcdeconv.data.opener import open_image
from hpcdeconv.data.zarr_io import get_split, open_dataset, read_volume
from hpcdeconv.errors import InputError, OutputExistsError
from tests.conftest import assert_one_line_error, run_cli


def _imagej(path: Path, data: np.ndarray, dz: float, dxy: float, unit: str = "um") -> Path:
    tifffile.imwrite(
        path,
        data,
        imagej=True,
        resolution=(1 / dxy, 1 / dxy),
        metadata={"spacing": dz, "unit": unit, "axes": "ZYX"},
    )
    return path


def _plain(path: Path, data: np.ndarray) -> Path:
    tifffile.imwrite(path, data, photometric="minisblack")
    return path


def test_imagej_voxel_size_and_values(tmp_path: Path, rng: np.random.Generator) -> None:
    data = rng.integers(0, 60000, size=(5, 12, 9), dtype=np.uint16)
    tif = _imagej(tmp_path / "cell_01.tif", data, dz=0.5, dxy=0.125)
    ids = ingest_images([tif], tmp_path / "out.zarr", storage=StorageConfig(chunks=(2, 8, 8)))

    assert ids == ["cell_01"]
    volume, meta = read_volume(tmp_path / "out.zarr", "blurred/cell_01")
    assert meta.voxel_size == pytest.approx((0.5, 0.125, 0.125))
    assert volume.dtype == np.float32
    assert volume.chunksize == (2, 8, 8)
    np.testing.assert_array_equal(volume.compute(), data.astype(np.float32))  # unscaled
    assert get_split(open_dataset(tmp_path / "out.zarr"))["train"] == ["cell_01"]


def test_imagej_nanometres_are_converted(tmp_path: Path) -> None:
    tif = _imagej(tmp_path / "a.tif", np.zeros((3, 4, 4), np.float32), dz=250, dxy=40, unit="nm")
    assert open_image(tif).voxel_size == pytest.approx((0.25, 0.04, 0.04))


def test_ome_physical_sizes(tmp_path: Path) -> None:
    path = tmp_path / "stack.ome.tif"
    meta = {
        "axes": "ZYX",
        "PhysicalSizeX": 65.0,
        "PhysicalSizeXUnit": "nm",
        "PhysicalSizeY": 65.0,
        "PhysicalSizeYUnit": "nm",
        "PhysicalSizeZ": 0.2,
    }
    tifffile.imwrite(path, np.ones((3, 4, 5), np.uint8), ome=True, metadata=meta)
    info = open_image(path)
    assert info.voxel_size == pytest.approx((0.2, 0.065, 0.065))
    assert info.name == "stack"


def test_explicit_voxel_size_wins_and_sets_split(tmp_path: Path) -> None:
    tif = _imagej(tmp_path / "a.tif", np.ones((3, 4, 4), np.uint16), dz=0.5, dxy=0.1)
    out = tmp_path / "out.zarr"
    ingest_images([tif], out, voxel_size=(1.0, 0.2, 0.2), domain="sharp", split="test")
    _, meta = read_volume(out, "sharp/a")
    assert meta.voxel_size == (1.0, 0.2, 0.2)
    assert get_split(open_dataset(out)) == {"train": [], "val": [], "test": ["a"]}


def test_missing_voxel_size_asks_for_it(tmp_path: Path) -> None:
    tif = _plain(tmp_path / "raw.tif", np.zeros((3, 4, 5), np.uint16))
    with pytest.raises(InputError, match="--voxel-size"):
        ingest_images([tif], tmp_path / "out.zarr")
    assert not (tmp_path / "out.zarr").exists()


def test_singleton_axes_are_squeezed(tmp_path: Path, rng: np.random.Generator) -> None:
    data = rng.random((1, 4, 1, 6, 7)).astype(np.float32)
    tif = _plain(tmp_path / "t.tif", data)
    ingest_images([tif], tmp_path / "out.zarr", voxel_size=(0.3, 0.1, 0.1))
    volume, _ = read_volume(tmp_path / "out.zarr", "blurred/t")
    np.testing.assert_array_equal(volume.compute(), data[0, :, 0])


@pytest.mark.parametrize("shape", [(6, 7), (2, 3, 6, 7)])
def test_wrong_dimensions_name_file_and_shape(tmp_path: Path, shape: tuple[int, ...]) -> None:
    tif = _plain(tmp_path / "bad.tif", np.zeros(shape, np.float32))
    with pytest.raises(InputError, match=rf"bad\.tif.*{re.escape(str(shape))}"):
        ingest_images([tif], tmp_path / "out.zarr", voxel_size=(1.0, 1.0, 1.0))
    assert not (tmp_path / "out.zarr").exists()


def test_existing_output_is_refused(tmp_path: Path) -> None:
    tif = _imagej(tmp_path / "a.tif", np.ones((3, 4, 4), np.uint16), dz=0.5, dxy=0.1)
    out = tmp_path / "out.zarr"
    ingest_images([tif], out)
    with pytest.raises(OutputExistsError):
        ingest_images([tif], out)
    assert ingest_images([tif], out, overwrite=True) == ["a"]


def test_duplicate_ids_are_refused(tmp_path: Path) -> None:
    (tmp_path / "d1").mkdir()
    (tmp_path / "d2").mkdir()
    tifs = [_plain(tmp_path / d / "same.tif", np.zeros((2, 3, 4), np.uint8)) for d in ("d1", "d2")]
    with pytest.raises(InputError, match="'same'"):
        ingest_images(tifs, tmp_path / "out.zarr", voxel_size=(1.0, 1.0, 1.0))


def test_unreadable_file(tmp_path: Path) -> None:
    bogus = tmp_path / "x.tif"
    bogus.write_bytes(b"not a tiff at all")
    with pytest.raises(InputError, match=r"x\.tif"):
        ingest_images([bogus], tmp_path / "out.zarr", voxel_size=(1.0, 1.0, 1.0))


# --------------------------------------------------------------------------------------
# 2D images and channels (issue 14): the layout the training feed reads
# --------------------------------------------------------------------------------------


def _imagej_2d(path: Path, data: np.ndarray, dxy: float, axes: str = "YX") -> Path:
    tifffile.imwrite(
        path,
        data,
        imagej=True,
        resolution=(1 / dxy, 1 / dxy),
        metadata={"axes": axes, "unit": "um"},
    )
    return path


def test_2d_pair_is_read_by_the_training_feed(tmp_path: Path, rng: np.random.Generator) -> None:
    from hpcdeconv.config import PairedImagesData
    from hpcdeconv.training.feed import TrainingFeed

    sharp = rng.random((40, 48)).astype(np.float32)
    blurred = (sharp * 0.5 + 0.1).astype(np.float32)
    (tmp_path / "s").mkdir()
    (tmp_path / "b").mkdir()
    out = tmp_path / "pair.zarr"
    ingest_images([_plain(tmp_path / "b" / "cell.tif", blurred)], out, voxel_size=(0.1, 0.1))
    ids = ingest_images(
        [_plain(tmp_path / "s" / "cell.tif", sharp)],
        out,
        voxel_size=(0.1, 0.1),
        domain="sharp",
        append=True,
    )
    assert ids == ["cell"]
    assert get_split(open_dataset(out))["train"] == ["cell"]
    volume, meta = read_volume(out, "sharp/cell")
    assert meta.axes == ("y", "x") and meta.voxel_size == pytest.approx((0.1, 0.1))
    np.testing.assert_array_equal(volume.compute(), sharp)

    feed = TrainingFeed(PairedImagesData(path=out, patch=(16, 16), batch_size=2), seed=0)
    info = feed.info()
    assert (info.spatial_dims, info.channels) == (2, 1)
    assert info.voxel_size == pytest.approx((0.1, 0.1))
    batch = next(iter(feed.loader(0)))
    assert tuple(batch["x"].shape) == (2, 1, 16, 16) == tuple(batch["y"].shape)
    # Paired: the blurred patch is the blurred image at the sharp patch's place.
    np.testing.assert_allclose(batch["y"].numpy(), batch["x"].numpy() * 0.5 + 0.1, rtol=1e-6)


def test_2d_voxel_size_is_read_from_the_file(tmp_path: Path) -> None:
    tif = _imagej_2d(tmp_path / "plane.tif", np.ones((8, 9), np.uint16), dxy=0.065)
    ingest_images([tif], tmp_path / "out.zarr")
    _, meta = read_volume(tmp_path / "out.zarr", "blurred/plane")
    assert meta.axes == ("y", "x") and meta.voxel_size == pytest.approx((0.065, 0.065))


@pytest.mark.parametrize(
    ("axes", "shape", "stored"),
    [("CYX", (3, 10, 12), (3, 10, 12)), ("YXS", (10, 12, 3), (3, 10, 12))],
)
def test_channel_images_store_an_ngff_channel_axis(
    tmp_path: Path,
    rng: np.random.Generator,
    axes: str,
    shape: tuple[int, ...],
    stored: tuple[int, ...],
) -> None:
    from hpcdeconv.data.layout import array_layout
    from hpcdeconv.data.zarr_io import open_array

    data = rng.integers(0, 255, size=shape, dtype=np.uint8)
    tif = tmp_path / "rgb.tif"
    if axes == "YXS":
        tifffile.imwrite(tif, data, photometric="rgb")
    else:
        _imagej_2d(tif, data, dxy=0.2, axes=axes)
    out = tmp_path / "out.zarr"
    ingest_images([tif], out, voxel_size=(0.2, 0.2), storage=StorageConfig(chunks=(4, 8, 8)))
    volume, meta = read_volume(out, "blurred/rgb")
    assert meta.axes == ("c", "y", "x") and meta.spatial_voxel_size == pytest.approx((0.2, 0.2))
    assert volume.shape == stored and volume.chunksize == (3, 8, 8)
    expected = data if axes == "CYX" else np.moveaxis(data, -1, 0)
    np.testing.assert_array_equal(volume.compute(), expected.astype(np.float32))
    assert array_layout(open_array(open_dataset(out), "blurred/rgb/0")) == (2, 3)


def test_czyx_volume_keeps_its_channels(tmp_path: Path, rng: np.random.Generator) -> None:
    data = rng.random((4, 2, 6, 7)).astype(np.float32)
    tif = tmp_path / "two.tif"
    tifffile.imwrite(tif, data, imagej=True, metadata={"axes": "ZCYX"})
    ingest_images([tif], tmp_path / "out.zarr", voxel_size=(0.3, 0.1, 0.1))
    volume, meta = read_volume(tmp_path / "out.zarr", "blurred/two")
    assert meta.axes == ("c", "z", "y", "x")
    np.testing.assert_array_equal(volume.compute(), np.moveaxis(data, 1, 0))


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (np.zeros((3, 8, 8), np.float32), r"3D \(Z, Y, X\) with 1 channel image but .*2D"),
        (np.zeros((8, 8, 3), np.uint8), r"2D \(Y, X\) with 3 channels image but .*1 channel"),
    ],
)
def test_mixed_layouts_are_refused_in_one_line(
    tmp_path: Path, second: np.ndarray, message: str
) -> None:
    first = _plain(tmp_path / "a.tif", np.zeros((8, 8), np.float32))
    other = tmp_path / "b.tif"
    if second.ndim == 3 and second.shape[-1] == 3:
        tifffile.imwrite(other, second, photometric="rgb")
    else:
        tifffile.imwrite(other, second, imagej=True, metadata={"axes": "ZYX"})
    before = [p.read_bytes() for p in (first, other)]
    # The layouts are compared first: the voxel size fits the first image only.
    with pytest.raises(InputError, match=message) as caught:
        ingest_images([first, other], tmp_path / "out.zarr", voxel_size=(1.0, 1.0))
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out.zarr").exists()
    assert [p.read_bytes() for p in (first, other)] == before


def test_append_refuses_another_layout_and_keeps_the_dataset(tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    ingest_images([_plain(tmp_path / "a.tif", np.ones((8, 8), np.float32))], out, (1.0, 1.0))
    vol = _plain(tmp_path / "v.tif", np.ones((3, 8, 8), np.float32))
    with pytest.raises(InputError, match=r"v\.tif is a 3D .*out\.zarr holds 2D"):
        ingest_images([vol], out, (1.0, 1.0, 1.0), domain="sharp", append=True)
    assert get_split(open_dataset(out))["train"] == ["a"]
    assert "sharp" not in open_dataset(out)
    np.testing.assert_array_equal(read_volume(out, "blurred/a")[0].compute(), np.ones((8, 8)))


def test_voxel_size_must_match_the_image_dims(tmp_path: Path) -> None:
    vol = _plain(tmp_path / "v.tif", np.ones((3, 8, 8), np.float32))
    with pytest.raises(InputError, match=r"v\.tif, a 3D \(Z, Y, X\) image .*three .*DZ DY DX"):
        ingest_images([vol], tmp_path / "out.zarr", voxel_size=(1.0, 1.0))
    with pytest.raises(InputError, match="positive sizes"):
        ingest_images([vol], tmp_path / "out.zarr", voxel_size=(1.0,))
    assert not (tmp_path / "out.zarr").exists()


def test_cli_builds_a_2d_pair_with_append(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rng: np.random.Generator
) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "b").mkdir()
    sharp = _plain(tmp_path / "s" / "p.tif", rng.random((20, 24)).astype(np.float32))
    blurred = _plain(tmp_path / "b" / "p.tif", rng.random((20, 24)).astype(np.float32))
    out = str(tmp_path / "pair.zarr")
    common = ["--output", out, "--voxel-size", "0.1", "0.1", "--chunks", "8", "8"]
    code, stdout, _ = run_cli(["ingest", str(blurred), *common], capsys)
    assert code == 0 and "blurred/p" in stdout
    code, _, err = run_cli(["ingest", str(sharp), *common, "--domain", "sharp"], capsys)
    assert_one_line_error(code, err, "exists; pass --overwrite")
    code, stdout, _ = run_cli(
        ["ingest", str(sharp), *common, "--domain", "sharp", "--append"], capsys
    )
    assert code == 0 and "sharp/p" in stdout
    volume, meta = read_volume(out, "sharp/p")
    assert meta.axes == ("y", "x") and volume.chunksize == (8, 8)
    code, _, err = run_cli(["ingest", str(sharp), *common, "--domain", "sharp", "--append"], capsys)
    assert_one_line_error(code, err, "'p' is already in the dataset")
    bad = [
        "ingest",
        str(sharp),
        "--output",
        str(tmp_path / "x.zarr"),
        "--chunks",
        "4",
        "4",
        "4",
        "4",
    ]
    code, _, err = run_cli([*bad, "--voxel-size", "1", "1"], capsys)
    assert_one_line_error(code, err, "--chunks takes 3 (Z Y X) or 2 (Y X) sizes")
    assert not (tmp_path / "x.zarr").exists()


@pytest.mark.parametrize(
    ("sizes", "fragment"),
    [
        (["0.1", "0.1"], "needs three positive sizes DZ DY DX"),
        (["0.5", "0", "0.1"], "must be positive"),
        (["0.5", "0.1", "0.1", "0.1"], "takes DZ DY DX (a volume) or DY DX"),
    ],
)
def test_cli_voxel_size_checked_as_every_verb_checks_it(
    sizes: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ingest shares the other verbs' --voxel-size: 2 or 3 positive sizes, matched to the
    image's axes, one line, nothing written."""
    from hpcdeconv.cli import main

    tif = _plain(tmp_path / "raw.tif", np.zeros((3, 4, 5), np.uint16))
    out = tmp_path / "out.zarr"
    try:
        code = main(["ingest", str(tif), "--output", str(out), "--voxel-size", *sizes])
    except SystemExit as exc:  # argparse refuses the count or value before running
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert fragment in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1
    assert not out.exists()
