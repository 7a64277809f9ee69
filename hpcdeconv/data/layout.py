"""Axes, voxel size and layout of a stored image array, from its metadata.

An array is described by the OME-NGFF ``multiscales`` metadata of the image group that
holds it (:mod:`hpcdeconv.data.ngff`), or by the ``axes``/``voxel_size`` attributes of
arrays written before OME-NGFF. Its layout is ``(*S)`` or ``(C, *S)``: spatial axes
``S`` = ``(Z, Y, X)`` or ``(Y, X)``, after an optional leading channel axis ``"c"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import zarr
import zarr.errors

from hpcdeconv.data.ngff import CHANNEL_AXIS, SPACE_AXES, UNIT, is_image, read_image_meta
from hpcdeconv.errors import InputError


@dataclass(frozen=True)
class VolumeMeta:
    """Physical description of a stored array.

    Attributes
    ----------
    voxel_size
        Sampling distance per axis in ``unit``, ordered like ``axes`` (e.g. ``(dz, dy, dx)``);
        None for an axis whose size is not known and for the channel axis.
    axes
        Axis names, e.g. ``("z", "y", "x")`` or ``("c", "y", "x")``.
    unit
        Length unit of ``voxel_size``.
    """

    voxel_size: tuple[float | None, ...]
    axes: tuple[str, ...]
    unit: str = UNIT

    @property
    def has_channels(self) -> bool:
        """Whether the first axis is the channel axis ``"c"``."""
        return self.axes[:1] == (CHANNEL_AXIS,)

    @property
    def spatial_voxel_size(self) -> tuple[float | None, ...]:
        """``voxel_size`` of the spatial axes only (the channel axis dropped)."""
        return self.voxel_size[int(self.has_channels) :]


def _parent_group(array: zarr.Array) -> tuple[zarr.Group | None, str]:
    """The group holding ``array`` and the array's name in it (None if not reachable)."""
    path = array.path.rstrip("/")
    try:
        if "/" in path:
            parent, name = path.rsplit("/", 1)
            return zarr.open_group(store=array.store, path=parent, mode="r"), name
        root = getattr(array.store, "root", None)
        if root is None:
            return None, path
        # The array was opened at its own directory: its parent is the directory above.
        where = Path(root) / path if path else Path(root)
        return zarr.open_group(str(where.parent), mode="r"), where.name
    except (FileNotFoundError, ValueError, KeyError, TypeError, zarr.errors.ContainsArrayError):
        return None, path


def volume_meta(array: zarr.Array) -> VolumeMeta:
    """Voxel size and axes of a stored volume.

    Read from the OME-NGFF metadata of the image group holding ``array`` (a level), or
    from the ``axes``/``voxel_size`` attributes of arrays written before OME-NGFF.

    Raises
    ------
    InputError
        Neither kind of metadata, or metadata that does not match the array.
    """
    attrs = array.attrs.asdict()
    if "voxel_size" in attrs:
        try:
            voxel_size = tuple(None if v is None else float(v) for v in attrs["voxel_size"])
            axes = tuple(str(a["name"]) for a in attrs["axes"])
            units = {str(a.get("unit", UNIT)) for a in attrs["axes"]}
        except (KeyError, TypeError, ValueError):
            raise InputError(
                f"array '{array.path}' lacks valid 'axes'/'voxel_size' attributes"
            ) from None
        if len(voxel_size) != array.ndim or len(axes) != array.ndim or len(units) != 1:
            raise InputError(f"array '{array.path}': axes/voxel_size do not match its shape")
        return VolumeMeta(voxel_size=voxel_size, axes=axes, unit=units.pop())
    parent, level = _parent_group(array)
    if parent is None or not is_image(parent):
        raise InputError(f"array '{array.path}' has no OME-NGFF image metadata")
    meta = read_image_meta(parent)
    if level not in meta.paths or len(meta.axes) != array.ndim:
        raise InputError(f"array '{array.path}' does not match its image's multiscales")
    voxel = meta.voxel_size
    if level != meta.paths[0]:
        full = parent[meta.paths[0]]
        voxel = tuple(
            None if v is None else v * f / n
            for v, f, n in zip(voxel, full.shape, array.shape, strict=True)
        )
    return VolumeMeta(voxel_size=voxel, axes=meta.axes, unit=UNIT)


def array_layout(array: zarr.Array) -> tuple[int, int]:
    """``(spatial_dims, channels)`` of a stored image array, from its NGFF axes.

    An array with OME-NGFF (or former ``axes`` attribute) metadata has as many spatial
    dimensions as spatial axes, and its channels along a leading axis ``"c"`` (1 without
    one). An array without any metadata (bare arrays of other tools) is read as ``ndim``
    spatial axes and one channel.

    Returns
    -------
    tuple[int, int]
        ``(2 or 3, C)``.

    Raises
    ------
    InputError
        Neither 2 nor 3 spatial axes, or axes other than one leading channel axis and the
        spatial ones (e.g. time).
    """
    if _has_metadata(array):
        meta = volume_meta(array)
        axes = meta.axes
        channels = int(array.shape[0]) if meta.has_channels else 1
        spatial = axes[int(meta.has_channels) :]
        if any(a not in SPACE_AXES for a in spatial):
            raise InputError(
                f"array '{array.path}' has axes {''.join(axes)}; expected an optional "
                "leading channel axis c and spatial axes (zyx or yx)"
            )
    else:
        channels, spatial = 1, tuple(range(array.ndim))
    if len(spatial) not in (2, 3):
        raise InputError(
            f"array '{array.path}' of shape {tuple(array.shape)} has {len(spatial)} spatial "
            "axes; expected 2 (Y, X) or 3 (Z, Y, X)"
        )
    return len(spatial), channels


def _has_metadata(array: zarr.Array) -> bool:
    if "voxel_size" in array.attrs or "axes" in array.attrs:
        return True
    parent, _ = _parent_group(array)
    return parent is not None and is_image(parent)
