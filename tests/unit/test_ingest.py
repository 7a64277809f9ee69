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
