"""Read one input volume (any format of :mod:`hpcdeconv.data.opener`) and write one output."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from hpcdeconv.data.ngff import VoxelSize
from hpcdeconv.data.opener import TIFF_SUFFIXES, Image, open_image
from hpcdeconv.data.safety import SOFTWARE, refuse_existing
from hpcdeconv.data.zarr_io import create_dataset, write_volume
from hpcdeconv.errors import InputError

__all__ = ["TIFF_SUFFIXES", "InputVolume", "open_input", "write_output", "write_tiff"]

#: An opened input: lazy ``(Z, Y, X)`` data, voxel size (µm, None where unknown), name.
InputVolume = Image


def open_input(path: Path, voxel_size: Sequence[float] | None = None) -> Image:
    """Open a 3D image lazily through :func:`hpcdeconv.data.opener.open_image`.

    Parameters
    ----------
    path
        TIFF / OME-TIFF, ``.npy``, zarr array, OME-Zarr image or a volume of a dataset.
    voxel_size
        ``(dz, dy, dx)`` in µm overriding the file's metadata (``--voxel-size``).

    Raises
    ------
    InputError
        Missing file, unreadable data, unsupported unit or axes that are not (Z, Y, X).
    """
    return open_image(path, voxel_size=voxel_size)


def check_finite(volume: np.ndarray, what: str) -> None:
    """Refuse NaN or Inf voxels instead of silently propagating them."""
    bad = int(np.count_nonzero(~np.isfinite(volume)))
    if bad:
        raise InputError(f"{what}: {bad} voxel(s) are NaN or Inf")


def write_tiff(path: Path, data: np.ndarray, voxel_size: VoxelSize) -> None:
    """Write ``data`` (Z, Y, X) as float32 TIFF recording only the voxel sizes that are known.

    Fully known sizes give an ImageJ hyperstack (calibrated in Fiji as it opens). With an
    unknown axis the file is an OME-TIFF whose ``PhysicalSize`` is written for the known
    axes only: ImageJ metadata cannot leave one axis uncalibrated (Fiji would show 1 µm).
    """
    dz, dy, dx = voxel_size
    volume = np.asarray(data, dtype=np.float32)
    if dz is not None and dy is not None and dx is not None:
        tifffile.imwrite(
            path,
            volume,
            imagej=True,
            software=SOFTWARE,  # lets --overwrite tell our files from a user's
            photometric="minisblack",  # never guess RGB from a last axis of 3 or 4
            resolution=(1.0 / dx, 1.0 / dy),
            metadata={"spacing": dz, "unit": "um", "axes": "ZYX"},
        )
        return
    metadata: dict[str, Any] = {"axes": "ZYX"}
    for axis, size in zip("ZYX", voxel_size, strict=True):
        if size is not None:
            metadata[f"PhysicalSize{axis}"] = float(size)
            metadata[f"PhysicalSize{axis}Unit"] = "\u00b5m"
    tifffile.imwrite(
        path, volume, ome=True, software=SOFTWARE, photometric="minisblack", metadata=metadata
    )


def write_output(
    path: Path,
    data: np.ndarray,
    voxel_size: VoxelSize,
    name: str,
    attrs: dict[str, Any],
    overwrite: bool,
) -> str:
    """Write ``data`` (Z, Y, X) to ``.tif``/``.tiff``/``.npy`` or into a new zarr store.

    A ``.zarr`` output holds the OME-NGFF 0.5 image ``deconvolved/<name>``; voxel sizes
    that are None stay unknown in every format (no size is invented).

    Returns a description of where it went.
    """
    suffix = path.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        refuse_existing(path, "file", overwrite)
        write_tiff(path, data, voxel_size)
        return str(path)
    if suffix == ".npy":
        refuse_existing(path, "file", overwrite)
        np.save(path, data.astype(np.float32))
        return str(path)
    if suffix == ".zarr":
        group = create_dataset(path, overwrite=overwrite)
        write_volume(group, f"deconvolved/{name}", data, voxel_size, attrs=attrs)
        return f"{path}/deconvolved/{name}"
    raise InputError(f"--output must end in .tif, .tiff, .npy or .zarr, got {path.name}")
