"""Zarr v3 dataset layout: writing, lazy reading, metadata, codecs, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr
from dask.callbacks import Callback

from hpcdeconv.config import CodecConfig
from hpcdeconv.data.layout import VolumeMeta
from hpcdeconv.data.summary import describe
from hpcdeconv.data.zarr_io import (
    BLURRED,
    PSF_KEY,
    SHARP,
    create_dataset,
    get_split,
    open_dataset,
    read_volume,
    set_split,
    update_root_attrs,
    volume_ids,
    write_volume,
)
from hpcdeconv.errors import InputError, OutputExistsError

VOXEL = (0.3, 0.1, 0.1)


def _blosc_config(path: Path, name: str) -> dict:
    """Codec list as written to disk, read from the array's zarr.json independently of zarr."""
    meta = json.loads((path / name / "zarr.json").read_text())
    return {c["name"]: c.get("configuration", {}) for c in meta["codecs"]}


def test_round_trip_values_metadata_and_codec(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "ds.zarr"
    data = rng.normal(size=(10, 20, 30)).astype(np.float64)
    group = create_dataset(path)
    codec = CodecConfig(cname="lz4", clevel=5, shuffle="shuffle")
    write_volume(group, "sharp/v000", data, VOXEL, chunks=(4, 8, 64), codec=codec, attrs={"k": 1})

    volume, meta = read_volume(path, "sharp/v000")
    np.testing.assert_array_equal(volume.compute(), data.astype(np.float32))
    assert volume.dtype == np.float32
    assert meta == VolumeMeta(voxel_size=VOXEL, axes=("z", "y", "x"), unit="micrometer")

    blosc = _blosc_config(path, "sharp/v000/0")["blosc"]
    assert (blosc["cname"], blosc["clevel"], blosc["shuffle"]) == ("lz4", 5, "shuffle")
    on_disk = json.loads((path / "sharp/v000/0/zarr.json").read_text())
    assert on_disk["chunk_grid"]["configuration"]["chunk_shape"] == [4, 8, 30]  # clipped
    assert on_disk["dimension_names"] == ["z", "y", "x"]
    image = json.loads((path / "sharp/v000/zarr.json").read_text())["attributes"]
    assert image["k"] == 1  # hpcdeconv's attributes sit beside the OME-NGFF metadata
    multiscale = image["ome"]["multiscales"][0]
    assert image["ome"]["version"] == "0.5"
    assert multiscale["axes"][0] == {"name": "z", "type": "space", "unit": "micrometer"}
    assert multiscale["datasets"] == [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": list(VOXEL)}]}
    ]
    assert "sharding_indexed" not in _blosc_config(path, "sharp/v000/0")


def test_lazy_read_has_storage_chunks(tmp_path: Path, rng: np.random.Generator) -> None:
    group = create_dataset(tmp_path / "ds.zarr")
    write_volume(group, "blurred/a", rng.random((9, 16, 16)), VOXEL, chunks=(4, 8, 16))
    volume, _ = read_volume(group, "blurred/a")
    assert isinstance(volume, da.Array)
    assert volume.chunks == ((4, 4, 1), (8, 8), (16,))


def test_dask_write_is_chunk_by_chunk(tmp_path: Path, rng: np.random.Generator) -> None:
    data = rng.random((12, 20, 20)).astype(np.float32)
    largest = [0]

    def posttask(key: object, result: object, *args: object) -> None:
        if isinstance(result, np.ndarray):
            largest[0] = max(largest[0], result.nbytes)

    # Input blocks deliberately misaligned with the storage chunks (6, 10, 10).
    lazy = da.from_array(data, chunks=(12, 5, 20))
    group = create_dataset(tmp_path / "ds.zarr")
    with Callback(posttask=posttask):
        write_volume(group, "sharp/big", lazy, VOXEL, chunks=(6, 10, 10))

    stored, _ = read_volume(group, "sharp/big")
    np.testing.assert_array_equal(stored.compute(), data)
    assert 0 < largest[0] <= data.nbytes // 4  # no task ever held more than one input block
    assert len([p for p in (tmp_path / "ds.zarr/sharp/big/0/c").rglob("*") if p.is_file()]) == 8


def test_refusal_keeps_old_data_and_overwrite_replaces(tmp_path: Path) -> None:
    path = tmp_path / "ds.zarr"
    group = create_dataset(path)
    write_volume(group, "sharp/v0", np.ones((2, 3, 4)), VOXEL)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        create_dataset(path)
    volume, _ = read_volume(path, "sharp/v0")
    np.testing.assert_array_equal(volume.compute(), np.ones((2, 3, 4)))

    create_dataset(path, overwrite=True)
    assert volume_ids(open_dataset(path), SHARP) == []


def test_writing_an_existing_array_is_refused(tmp_path: Path) -> None:
    group = create_dataset(tmp_path / "ds.zarr")
    write_volume(group, "psf", np.ones((3, 3, 3)), VOXEL)
    with pytest.raises(OutputExistsError, match="psf"):
        write_volume(group, "psf", np.zeros((3, 3, 3)), VOXEL)


def test_corrupt_metadata_raises_input_error(tmp_path: Path) -> None:
    path = tmp_path / "ds.zarr"
    create_dataset(path)
    (path / "zarr.json").write_text("{not json")
    with pytest.raises(InputError, match="corrupt zarr metadata"):
        open_dataset(path)


def test_corrupt_array_metadata_raises_input_error(tmp_path: Path) -> None:
    path = tmp_path / "ds.zarr"
    write_volume(create_dataset(path), "sharp/v0", np.ones((2, 2, 2)), VOXEL)
    (path / "sharp/v0/0/zarr.json").write_text("")
    with pytest.raises(InputError, match=r"sharp/v0.*corrupt"):
        read_volume(path, "sharp/v0")


def test_not_a_zarr_or_missing_raises_input_error(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="not a zarr group"):
        open_dataset(tmp_path / "plain")
    with pytest.raises(InputError, match="no such file"):
        open_dataset(tmp_path / "missing.zarr")
    zarr.create_array(tmp_path / "array.zarr", shape=(2,), dtype="f4")
    with pytest.raises(InputError, match="is a zarr array"):
        open_dataset(tmp_path / "array.zarr")


def test_newer_format_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "ds.zarr"
    group = create_dataset(path)
    update_root_attrs(group, format=99)
    with pytest.raises(InputError, match="newer"):
        open_dataset(path)


def test_missing_array_lists_existing(tmp_path: Path) -> None:
    group = create_dataset(tmp_path / "ds.zarr")
    write_volume(group, "blurred/a", np.zeros((2, 2, 2)), VOXEL)
    with pytest.raises(InputError, match="blurred/a"):
        read_volume(group, "blurred/b")


def test_split_ids_and_describe(tmp_path: Path) -> None:
    path = tmp_path / "ds.zarr"
    group = create_dataset(path)
    for i in ("v0", "v1", "v2"):
        write_volume(group, f"{SHARP}/{i}", np.zeros((4, 4, 4)), VOXEL)
        write_volume(group, f"{BLURRED}/{i}", np.ones((4, 4, 4)), VOXEL)
    write_volume(group, PSF_KEY, np.ones((3, 5, 5)), VOXEL)
    assert get_split(group) == {"train": [], "val": [], "test": []}
    set_split(group, {"train": ["v0", "v1"], "val": ["v2"]})
    update_root_attrs(group, simulation={"seed": 7})

    reopened = open_dataset(path)
    assert get_split(reopened) == {"train": ["v0", "v1"], "val": ["v2"], "test": []}
    assert volume_ids(reopened, BLURRED) == ["v0", "v1", "v2"]
    with pytest.raises(InputError, match="v9"):
        set_split(group, {"train": ["v9"]})

    text = describe(path)
    assert "psf: shape=(3, 5, 5) float32" in text
    assert "blosc(zstd,3,bitshuffle)" in text
    assert "voxel=0.3x0.1x0.1 um" in text
    assert "train: v0, v1" in text
    assert '"simulation":{"seed":7}' in text
    assert len(text.splitlines()) == 1 + 7 + 1 + 2 + 1
