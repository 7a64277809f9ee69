"""Open a zarr v2/v3 array or an OME-Zarr image (NGFF 0.4/0.5) as an :class:`Image`.

Axes come from the ``multiscales`` axes of an OME-Zarr image (a level ``IMAGE.zarr/0`` is
read with its parent image's metadata, its voxel size scaled by the level's shape), else
from the array's ``dimension_names`` (zarr v3) or ``_ARRAY_DIMENSIONS`` (zarr v2, xarray);
an unnamed 3D array is taken as ``(Z, Y, X)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import dask.array as da
import zarr
import zarr.errors

from hpcdeconv.data.axes import view
from hpcdeconv.data.image import SPATIAL, Image, image_name
from hpcdeconv.data.ngff import VoxelSize, is_image, read_image_meta
from hpcdeconv.errors import InputError

__all__ = ["is_zarr", "open_zarr"]


def _open_node(path: Path) -> zarr.Array | zarr.Group:
    try:
        return zarr.open(store=str(path), mode="r")
    except (FileNotFoundError, zarr.errors.BaseZarrError):
        raise InputError(f"{path}: not a readable zarr array or group") from None
    except (ValueError, TypeError, KeyError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: corrupt zarr metadata ({reason})") from None


def _parent_image(path: Path) -> zarr.Group | None:
    """The OME-NGFF image group holding the array at ``path`` (``IMAGE.zarr/0``), if any."""
    parent = path.parent
    if not any((parent / f).is_file() for f in ("zarr.json", ".zattrs", ".zgroup")):
        return None
    try:
        group = zarr.open_group(str(parent), mode="r")
    except (FileNotFoundError, ValueError, TypeError, KeyError, zarr.errors.ContainsArrayError):
        return None
    return group if is_image(group) else None


def _array_axes(array: zarr.Array) -> str | None:
    """Axis letters named by a bare array, or None when it names none."""
    names = getattr(array.metadata, "dimension_names", None)
    if names is None:
        names = array.attrs.get("_ARRAY_DIMENSIONS")  # xarray's convention on zarr v2
    if not names or any(n is None for n in names):
        return None
    letters = "".join(str(n)[:1].upper() for n in names)
    return letters if len(set(letters)) == len(letters) else None


def _legacy_voxel_size(array: zarr.Array) -> VoxelSize | None:
    """``voxel_size`` attribute of arrays written by hpcdeconv before OME-NGFF, if present."""
    value = array.attrs.get("voxel_size")
    if not isinstance(value, list) or len(value) != array.ndim:
        return None
    return tuple(None if v is None else float(v) for v in value)


def _image_axes(meta_axes: Sequence[str], types: Sequence[str | None]) -> str:
    letters = []
    for name, kind in zip(meta_axes, types, strict=True):
        if kind == "time":
            letters.append("T")
        elif kind == "channel":
            letters.append("C")
        else:
            letters.append(name[:1].upper())
    return "".join(letters)


def _image_from_group(
    group: zarr.Group,
    path: Path,
    level: str | None,
    select: Mapping[str, int] | None,
    kind: str,
    any_rank: bool,
) -> Image:
    where = str(path)
    try:
        meta = read_image_meta(group)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    level = meta.paths[0] if level is None else level
    array = group[level]
    if not isinstance(array, zarr.Array):
        raise InputError(f"{path}: level '{level}' is not an array")
    axes = _image_axes(meta.axes, meta.axis_types)
    data, plain, dims = view(da.from_zarr(array), axes, where, select, kind, any_rank)
    by_axis = dict(zip(axes, meta.voxel_size, strict=True))
    if level != meta.paths[0]:
        by_axis = _level_voxel_size(group, level, axes, by_axis)
    voxel = tuple(by_axis.get(a) for a in SPATIAL)
    name = image_name(path) if path.name != level else image_name(path.parent)
    return Image(data, voxel, name, path, axes, plain, dims)


def _level_voxel_size(
    group: zarr.Group, level: str, axes: str, base: dict[str, float | None]
) -> dict[str, float | None]:
    """Voxel size of a lower-resolution level: level 0's times the shape ratio."""
    meta = read_image_meta(group)
    full = group[meta.paths[0]]
    low = group[level]
    ratio = [f / max(1, n) for f, n in zip(full.shape, low.shape, strict=True)]
    return {
        a: None if base.get(a) is None else base[a] * r
        for a, r in zip(axes, ratio, strict=True)  # type: ignore[operator]
    }


def open_zarr(
    path: Path, select: Mapping[str, int] | None, kind: str, any_rank: bool = False
) -> Image:
    """Open the zarr array or OME-Zarr image at ``path`` lazily as a ``(Z, Y, X)`` image.

    Parameters
    ----------
    path
        An OME-Zarr image group (or a ``bioformats2raw`` store holding one as ``0``), one of
        its levels (``IMAGE.zarr/0``), or a bare zarr v2/v3 array.
    select
        Index per non-spatial axis, as in :func:`~hpcdeconv.data.axes.spatial_view`.
    kind
        What the image is for (``"stack"``, ``"PSF"``), named in messages.
    any_rank
        Also accept ``(Y, X)`` images and a channel axis (:func:`~hpcdeconv.data.axes.image_view`).

    Raises
    ------
    InputError
        Unreadable or corrupt zarr metadata, a group that is no image (the message names the
        images inside it), or axes that do not reduce to ``(Z, Y, X)``.
    """
    where = str(path)
    node = _open_node(path)
    if isinstance(node, zarr.Group):
        if is_image(node):
            return _image_from_group(node, path, None, select, kind, any_rank)
        attrs = node.attrs.asdict()
        if "bioformats2raw.layout" in attrs and "0" in node:
            child = node["0"]
            if isinstance(child, zarr.Group) and is_image(child):
                return _image_from_group(child, path, None, select, kind, any_rank)
        from hpcdeconv.data.zarr_io import image_names

        inside = ", ".join(image_names(node)[:5]) or "none"
        raise InputError(
            f"{path}: a zarr group without OME-NGFF image metadata; name an image or array "
            f"inside it (found: {inside})"
        )
    image = _parent_image(path)
    if image is not None:
        return _image_from_group(image, path, path.name, select, kind, any_rank)
    axes = _array_axes(node)
    if axes is None:
        axes = "ZYX" if node.ndim == 3 else "Q" * node.ndim
    voxel = _legacy_voxel_size(node)
    if voxel is not None and len(voxel) == node.ndim:
        by_axis = dict(zip(axes, voxel, strict=True))
        voxel = tuple(by_axis.get(a) for a in SPATIAL)
    else:
        voxel = (None, None, None)
    data, plain, dims = view(da.from_zarr(node), axes, where, select, kind, any_rank)
    return Image(data, voxel, image_name(path), path, axes, plain, dims)


def is_zarr(path: Path) -> bool:
    """Whether ``path`` is a directory holding zarr v2 or v3 metadata."""
    return path.is_dir() and any(
        (path / f).is_file() for f in ("zarr.json", ".zarray", ".zgroup", ".zattrs")
    )
