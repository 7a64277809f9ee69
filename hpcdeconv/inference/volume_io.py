"""Read one input volume (TIFF or a zarr array) and write one output volume."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import tifffile
import zarr

from hpcdeconv.data.ingest import inspect_tiff
from hpcdeconv.data.safety import check_replaceable
from hpcdeconv.data.zarr_io import create_dataset, open_dataset, volume_meta, write_volume
from hpcdeconv.errors import InputError, OutputExistsError

TIFF_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class InputVolume:
    """A lazily readable input: its data, voxel size (µm) and a name for outputs."""

    data: da.Array
    voxel_size: tuple[float, ...]
    name: str
    source: Path


def _split_zarr_path(path: Path) -> tuple[Path, str]:
    """``data.zarr/blurred/test000`` → (``data.zarr``, ``blurred/test000``)."""
    parts = path.parts
    prefixes = [(Path(*parts[:i]), "/".join(parts[i:])) for i in range(1, len(parts) + 1)]
    for root, name in prefixes:
        if root.suffix == ".zarr":
            return root, name
    for root, name in prefixes:
        if (root / "zarr.json").is_file():
            return root, name
    raise InputError(f"{path}: not a TIFF file or a path inside a .zarr store")


def open_input(path: Path) -> InputVolume:
    """Open a 3D TIFF stack or a 3D array inside a zarr store, lazily.

    Raises
    ------
    InputError
        Missing file, unreadable data or not three-dimensional.
    """
    path = Path(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        info = inspect_tiff(path)
        if len(info.squeezed_shape) != 3:
            raise InputError(f"{path}: expected a 3D (Z, Y, X) stack, got shape {info.shape}")
        data = tifffile.imread(path).astype(np.float32).reshape(info.squeezed_shape)
        voxel = info.voxel_size or (1.0, 1.0, 1.0)
        return InputVolume(da.from_array(data), voxel, info.volume_id, path)
    root, name = _split_zarr_path(path)
    group = open_dataset(root)
    if not name:
        raise InputError(f"{path}: name an array inside the store, e.g. {root}/blurred/<id>")
    try:
        array = group[name]
    except KeyError:
        raise InputError(f"{path}: no array '{name}' in {root}") from None
    if not isinstance(array, zarr.Array):
        raise InputError(f"{path}: '{name}' is a group, not an array")
    if array.ndim != 3:
        raise InputError(f"{path}: expected a 3D (Z, Y, X) array, got shape {array.shape}")
    meta = volume_meta(array)
    return InputVolume(da.from_zarr(array), meta.voxel_size, name.split("/")[-1], path)


def check_finite(volume: np.ndarray, what: str) -> None:
    """Refuse NaN or Inf voxels instead of silently propagating them."""
    bad = int(np.count_nonzero(~np.isfinite(volume)))
    if bad:
        raise InputError(f"{what}: {bad} voxel(s) are NaN or Inf")


def refuse_existing(path: Path, overwrite: bool) -> None:
    """Existing outputs are only replaced on request, and only files of their own kind."""
    if overwrite:
        check_replaceable(path, "file")
    elif path.exists():
        raise OutputExistsError(f"{path} exists; pass --overwrite to replace it")


def write_output(
    path: Path,
    data: np.ndarray,
    voxel_size: tuple[float, ...],
    name: str,
    attrs: dict[str, Any],
    overwrite: bool,
) -> str:
    """Write ``data`` (Z, Y, X) to ``.tif``/``.tiff``/``.npy`` or into a new zarr dataset.

    Returns a description of where it went.
    """
    suffix = path.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        refuse_existing(path, overwrite)
        tifffile.imwrite(
            path,
            data.astype(np.float32),
            imagej=True,
            resolution=(1.0 / voxel_size[2], 1.0 / voxel_size[1]),
            metadata={"spacing": voxel_size[0], "unit": "um", "axes": "ZYX"},
        )
        return str(path)
    if suffix == ".npy":
        refuse_existing(path, overwrite)
        np.save(path, data.astype(np.float32))
        return str(path)
    if suffix == ".zarr":
        group = create_dataset(path, overwrite=overwrite)
        write_volume(group, f"deconvolved/{name}", data, voxel_size, attrs=attrs)
        return f"{path}/deconvolved/{name}"
    raise InputError(f"--output must end in .tif, .tiff, .npy or .zarr, got {path.name}")
