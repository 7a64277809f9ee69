"""The one opener of images: TIFF / ImageJ / OME-TIFF, ``.npy``, zarr v2/v3 arrays, OME-Zarr.

Every command that reads an image (``ingest``, ``rl`` and its ``--psf``, ``deconvolve``,
``predict`` and its ``--truth``) goes through :func:`open_image`, which

1. reads the axes the file declares: tifffile's ``series.axes`` for TIFF (ImageJ
   hyperstacks, OME-TIFF), ``multiscales`` axes for OME-Zarr 0.4/0.5, ``dimension_names``
   (zarr v3) or ``_ARRAY_DIMENSIONS`` (zarr v2, xarray) for bare arrays;
2. drops singleton axes and the axes fixed by an index (``--time``/``--channel``), and
   refuses any other non-spatial axis with one line naming it;
3. reads the voxel size per axis in micrometres (OME ``PhysicalSize*`` in any OME length
   unit, ImageJ ``spacing``/resolution/``unit``, NGFF ``scale`` with the axis ``unit``),
   keeping an axis it cannot find as None rather than inventing a size.

Axes a file does not name (a plain multi-page TIFF, an unnamed zarr array) are taken as
``(Z, Y, X)`` only when exactly three non-singleton axes remain.

This module reads TIFF and ``.npy`` files and dispatches the rest; the pieces live beside
it: :mod:`~hpcdeconv.data.axes` (step 2), :mod:`~hpcdeconv.data.tiff_meta` (a TIFF's voxel
size), :mod:`~hpcdeconv.data.zarr_image` (zarr arrays and OME-Zarr images) and
:mod:`~hpcdeconv.data.image` (the :class:`Image` every format gives).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import dask.array as da
import numpy as np
import tifffile
import zarr

from hpcdeconv.data.axes import spatial_view, view
from hpcdeconv.data.image import Image, image_name
from hpcdeconv.data.tiff_meta import tiff_voxel_size
from hpcdeconv.data.units import sizes_given_by_user
from hpcdeconv.data.zarr_image import is_zarr, open_zarr
from hpcdeconv.errors import InputError

# Image, image_name, spatial_view and tiff_voxel_size are part of the opener's API: what it
# returns, and the pieces readers of other formats built on it use.
__all__ = [
    "TIFF_SUFFIXES",
    "Image",
    "check_voxel_size",
    "describe_image",
    "image_name",
    "load",
    "open_image",
    "read_region",
    "spatial_view",
    "tiff_voxel_size",
]

logger = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")


def check_voxel_size(
    voxel_size: Sequence[float], axes: str = "ZYX", where: str = "the image"
) -> tuple[float | None, float, float]:
    """A ``--voxel-size`` given by the user, checked against the image's spatial ``axes``.

    Parameters
    ----------
    voxel_size
        Sizes in µm, one per spatial axis: ``(dz, dy, dx)`` for ``axes="ZYX"``, ``(dy, dx)``
        for ``"YX"``.
    axes
        The spatial axes of the image, ``"ZYX"`` or ``"YX"``.
    where
        The image, named in the error.

    Returns
    -------
    tuple
        ``(dz, dy, dx)`` in µm, ``dz`` None for a 2D image.

    Raises
    ------
    InputError
        Not one positive, finite size per spatial axis.
    """
    sizes = tuple(float(v) for v in voxel_size)
    names = " ".join(f"D{a}" for a in axes)
    count = {2: "two", 3: "three"}.get(len(axes), str(len(axes)))
    if len(sizes) != len(axes) or not all(np.isfinite(sizes)) or min(sizes) <= 0:
        raise InputError(
            f"--voxel-size for {where} (axes {axes}) needs {count} positive sizes "
            f"{names} in µm, got {' '.join(f'{v:g}' for v in sizes)}"
        )
    return (None, *sizes) if len(sizes) == 2 else sizes  # type: ignore[return-value]


def open_image(
    path: str | Path,
    voxel_size: Sequence[float] | None = None,
    select: Mapping[str, int] | None = None,
    warn: bool = True,
    kind: str = "stack",
    any_rank: bool = False,
) -> Image:
    """Open a 3D image lazily, reading its axes and voxel size from the file.

    Parameters
    ----------
    path
        A TIFF (``.tif``/``.tiff``, ImageJ or OME), a ``.npy`` array, a zarr v2/v3 array
        directory, an OME-Zarr image group (NGFF 0.4 or 0.5) or one of its levels
        (``IMAGE.zarr/0``), or an image/array inside an hpcdeconv dataset
        (``data.zarr/blurred/<id>``).
    voxel_size
        ``(dz, dy, dx)`` (a 2D image: ``(dy, dx)``) in µm replacing whatever the file says
        (``--voxel-size``).
    select
        Index per non-spatial axis, e.g. ``{"T": 0}`` (``--time``), ``{"C": 1}`` (``--channel``).
    warn
        Log a warning when a voxel size is unknown (the user is told once per file).
    kind
        What the image is for (``"stack"``, ``"PSF"``), named in messages.
    any_rank
        Also accept a 2D ``(Y, X)`` image and one channel axis
        (:func:`~hpcdeconv.data.axes.image_view`); ``Image.dims`` names the axes of ``data``.

    Returns
    -------
    Image
        ``(Z, Y, X)`` (``any_rank``: ``(C?, Z?, Y, X)``) lazy data, voxel size (None where
        unknown), name and axes.

    Raises
    ------
    InputError
        Missing or unreadable file, unsupported length unit, or axes that do not reduce to
        ``(Z, Y, X)`` (the message names the offending axis).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    suffix = path.suffix.lower()
    given = sizes_given_by_user() if voxel_size is not None else contextlib.nullcontext()
    with given:
        if suffix in TIFF_SUFFIXES:
            image = _open_tiff(path, select, kind, any_rank)
        elif suffix == ".npy":
            image = _open_npy(path, select, kind, any_rank)
        elif is_zarr(path):
            image = open_zarr(path, select, kind, any_rank)
        else:
            raise InputError(f"{path}: not a TIFF (.tif/.tiff), .npy, zarr array or OME-Zarr image")
    if voxel_size is not None:
        sizes = check_voxel_size(voxel_size, image.spatial_axes, str(path))
        image = dataclasses.replace(image, voxel_size=sizes, source=path)
    elif warn and not image.voxel_size_known:
        logger.warning(
            "%s: voxel size along %s not in the file's metadata; it stays unknown in the "
            "output (pass --voxel-size %s to set it)",
            path,
            image.unknown_axes,
            " ".join(f"D{a}" for a in image.spatial_axes),
        )
    return image


def _open_tiff(path: Path, select: Mapping[str, int] | None, kind: str, any_rank: bool) -> Image:
    where = str(path)
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes = series.axes.upper()
            voxel = tiff_voxel_size(tif, where)
        store = tifffile.imread(path, aszarr=True, series=0, level=0)
        stored = da.from_zarr(zarr.open_array(store, mode="r"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (tifffile.TiffFileError, OSError, ValueError, IndexError) as exc:
        raise InputError(f"{path}: not a readable TIFF ({exc})") from None
    data, plain, dims = view(stored, axes, where, select, kind, any_rank)
    return Image(data, voxel, image_name(path), path, axes, plain, dims)


def _open_npy(path: Path, select: Mapping[str, int] | None, kind: str, any_rank: bool) -> Image:
    try:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InputError(f"{path}: not a readable .npy array ({exc})") from None
    # .npy stores no axis names; a 3D array is read as (Z, Y, X).
    axes = "ZYX" if data.ndim == 3 else "Q" * data.ndim
    reduced, plain, dims = view(da.from_array(data), axes, str(path), select, kind, any_rank)
    return Image(reduced, (None, None, None), image_name(path), path, axes, plain, dims)


def load(image: Image, region: tuple[slice, ...] | None = None) -> np.ndarray:
    """``image.data[region]`` (all of it by default) as a float32 numpy array.

    Computed with this process's threads: inside a dask-distributed worker, or under a
    default distributed client, the lazy file handles must not be shipped elsewhere.
    """
    data = image.data if region is None else image.data[region]
    return np.asarray(data.compute(scheduler="threads"), dtype=np.float32)


@functools.lru_cache(maxsize=4)
def _cached(path: str, mtime_ns: int) -> da.Array:
    return open_image(path, warn=False, any_rank=True).data


def read_region(path: Path, region: tuple[slice, ...]) -> np.ndarray:
    """``image[region]`` of the image at ``path`` as float32 (cached open per process).

    The image is opened with ``any_rank`` (:func:`open_image`): ``region`` covers its
    ``(C?, Z?, Y, X)`` axes.
    """
    mtime = Path(path).stat().st_mtime_ns
    data = _cached(str(path), mtime)[region]
    return np.asarray(data.compute(scheduler="synchronous"), dtype=np.float32)


def describe_image(image: Image) -> str:
    """One line: name, stored axes, the axes read (``ZYX``, ``YX``, ``CYX``, ``CZYX``) with
    their shape, dtype and the voxel size of the spatial axes (µm, ``?`` if unknown)."""
    by_axis = dict(zip("ZYX", image.voxel_size, strict=True))
    voxel = "x".join("?" if by_axis[a] is None else f"{by_axis[a]:g}" for a in image.spatial_axes)
    shape = tuple(int(n) for n in image.data.shape)
    return (
        f"{image.source}: axes {image.axes} -> {image.dims} {shape} {image.data.dtype} "
        f"voxel={voxel} um"
    )
