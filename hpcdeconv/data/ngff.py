"""OME-NGFF image groups: 0.5 metadata written, 0.4 and 0.5 read, through ``ome-zarr-models``.

An image is a zarr group whose ``multiscales`` metadata lists its resolution levels::

    <image>/zarr.json   attributes {"ome": {"version": "0.5", "multiscales": [...]}, ...}
    <image>/0           (Z, Y, X), (Y, X), (C, Z, Y, X) or (C, Y, X) full resolution
    <image>/1, /2, ...  mean-downsampled levels for viewers (only for large volumes)

The metadata is built and validated by the pydantic models of ``ome-zarr-models`` (the
OME-Zarr community's reference models of the specification), never written as hand-made
JSON. A voxel size that is not known is written as scale 1 on an axis *without* a unit:
NGFF makes ``unit`` optional, so such an axis is measured in voxels and no physical length
is claimed (see docs/formats.md). hpcdeconv's own attributes (provenance, source) sit in
the same ``zarr.json`` beside ``ome``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import pydantic
import zarr
from ome_zarr_models.v04.image import ImageAttrs as ImageAttrsV04
from ome_zarr_models.v05.axes import Axis
from ome_zarr_models.v05.image import ImageAttrs
from ome_zarr_models.v05.multiscales import Dataset, Multiscale

from hpcdeconv.data.units import to_micrometres
from hpcdeconv.errors import InputError

#: Path of the full-resolution level inside an image group.
LEVEL0 = "0"
#: NGFF unit of every length hpcdeconv writes.
UNIT = "micrometer"
SPACE_AXES = ("z", "y", "x")
#: Name of the channel axis; it comes before the spatial axes (NGFF axis order).
CHANNEL_AXIS = "c"
#: Levels are added while an axis is longer than this many voxels (halving those axes).
PYRAMID_MIN_SIZE = 64
_MAX_LEVELS = 8

VoxelSize = tuple[float | None, ...]


@dataclass(frozen=True)
class ImageMeta:
    """What a reader needs from an image group's ``multiscales`` metadata.

    Attributes
    ----------
    version
        ``"0.4"`` or ``"0.5"``.
    axes
        Axis names of the stored arrays, e.g. ``("t", "c", "z", "y", "x")``.
    axis_types
        NGFF axis types (``"space"``, ``"time"``, ``"channel"``, or None).
    voxel_size
        Scale of the full-resolution level per axis in micrometres; None for an axis whose
        unit is missing or is not a length.
    paths
        Array paths of the levels, full resolution first.
    """

    version: str
    axes: tuple[str, ...]
    axis_types: tuple[str | None, ...]
    voxel_size: VoxelSize
    paths: tuple[str, ...]


def _multiscale(
    voxel_size: VoxelSize, factors: Sequence[Sequence[int]], name: str | None, channel: bool
) -> Multiscale:
    axes = [
        Axis(name=n, type="space", unit=None if v is None else UNIT)
        for n, v in zip(SPACE_AXES[-len(voxel_size) :], voxel_size, strict=True)
    ]
    base = [1.0 if v is None else float(v) for v in voxel_size]
    if channel:
        # A channel axis has no physical size: scale 1, never downsampled.
        axes.insert(0, Axis(name=CHANNEL_AXIS, type="channel"))
        base.insert(0, 1.0)
    datasets = []
    for level, factor in enumerate(factors):
        scale = [b * f for b, f in zip(base, factor, strict=True)]
        # A mean over f voxels is centred (f - 1) / 2 voxels after the first one.
        shift = [b * (f - 1) / 2 for b, f in zip(base, factor, strict=True)]
        translation = shift if any(shift) else None
        datasets.append(Dataset.build(path=str(level), scale=scale, translation=translation))
    return Multiscale(
        axes=axes,
        datasets=tuple(datasets),
        name=name,
        type="mean" if len(factors) > 1 else None,
        metadata={"method": "dask.array.coarsen(numpy.mean)"} if len(factors) > 1 else None,
    )


def ome_attributes(
    voxel_size: VoxelSize,
    factors: Sequence[Sequence[int]] | None = None,
    name: str | None = None,
    channel: bool = False,
) -> dict[str, Any]:
    """The validated ``ome`` attribute (NGFF 0.5) of an image with these levels.

    Parameters
    ----------
    voxel_size
        ``(dz, dy, dx)`` (or ``(dy, dx)``) of the full-resolution level in µm; None = unknown.
        One entry per spatial axis.
    factors
        Per level, the downsampling factor of each stored axis relative to level 0 (the
        channel axis included, always 1); default: the full-resolution level alone.
    name
        Name of the image, shown by viewers.
    channel
        The arrays have a leading channel axis ``"c"`` (type ``"channel"``).
    """
    factors = factors or [(1,) * (len(voxel_size) + int(channel))]
    multiscale = _multiscale(voxel_size, factors, name, channel)
    attrs = ImageAttrs(multiscales=[multiscale], version="0.5")
    return attrs.model_dump(mode="json", exclude_none=True)


def create_image(
    group: zarr.Group,
    name: str,
    shape: Sequence[int],
    chunks: Sequence[int],
    compressors: Any,
    voxel_size: VoxelSize,
    attrs: Mapping[str, Any] | None = None,
) -> zarr.Array:
    """Create an empty OME-NGFF image group ``name`` and its full-resolution array.

    A ``shape`` with one axis more than ``voxel_size`` has a leading channel axis.

    Parameters
    ----------
    group
        Parent group, open for writing.
    name
        Path of the image group inside ``group``, e.g. ``"deconvolved/v0"``.
    shape, chunks
        ``(*S)`` or ``(C, *S)`` shape and storage chunks of level 0, ``S`` = ``(Z, Y, X)``
        or ``(Y, X)``.
    compressors
        zarr v3 compressors of the arrays.
    voxel_size
        Per spatial axis in µm, None where unknown.
    attrs
        hpcdeconv's attributes stored beside ``ome`` (provenance, source).

    Returns
    -------
    zarr.Array
        Level ``0``, float32, filled with zeros until written.

    Raises
    ------
    zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError
        ``name`` already exists.
    """
    channel = len(shape) == len(voxel_size) + 1
    if not channel and len(voxel_size) != len(shape):
        raise ValueError(f"voxel_size {tuple(voxel_size)} does not match shape {tuple(shape)}")
    image_name = name.rsplit("/", 1)[-1]
    ome = ome_attributes(voxel_size, name=image_name, channel=channel)
    attributes = {"ome": ome, **(attrs or {})}
    image = group.create_group(name, attributes=attributes)
    return image.create_array(
        LEVEL0,
        shape=tuple(shape),
        dtype="float32",
        chunks=tuple(chunks),
        compressors=compressors,
        dimension_names=(CHANNEL_AXIS,) * channel + SPACE_AXES[-len(voxel_size) :],
    )


def pyramid_factors(
    shape: Sequence[int], min_size: int = PYRAMID_MIN_SIZE
) -> list[tuple[int, ...]]:
    """Downsampling factors per level: each level halves the axes still longer than ``min_size``.

    ``(64, 256, 256)`` gives ``[(1, 1, 1), (1, 2, 2), (1, 4, 4)]``; a volume no axis of
    which exceeds ``min_size`` has the full-resolution level only.
    """
    factors = [(1,) * len(shape)]
    while len(factors) < _MAX_LEVELS:
        current = [s // f for s, f in zip(shape, factors[-1], strict=True)]
        step = tuple(2 if n > min_size else 1 for n in current)
        if step == (1,) * len(shape):
            break
        factors.append(tuple(f * s for f, s in zip(factors[-1], step, strict=True)))
    return factors


def add_pyramid(image: zarr.Group, min_size: int = PYRAMID_MIN_SIZE) -> int:
    """Add mean-downsampled levels to an image group whose level 0 is written.

    Each level is a lazy ``dask`` coarsening of the one before, stored chunk by chunk; the
    ``multiscales`` metadata is rewritten to list every level.

    Returns
    -------
    int
        Number of levels, level 0 included.
    """
    meta = read_image_meta(image)
    base = image[meta.paths[0]]
    assert isinstance(base, zarr.Array)
    channel = meta.axis_types[:1] == ("channel",)
    # Only spatial axes are downsampled; the channel axis keeps factor 1.
    spatial = pyramid_factors(base.shape[int(channel) :], min_size)
    factors = [(1,) * channel + f for f in spatial]
    previous = da.from_zarr(base)
    for level in range(1, len(factors)):
        step = {
            axis: f // p
            for axis, (f, p) in enumerate(zip(factors[level], factors[level - 1], strict=True))
        }
        lower = da.coarsen(np.mean, previous, step, trim_excess=True).astype(np.float32)
        chunks = tuple(min(c, n) for c, n in zip(base.chunks, lower.shape, strict=True))
        array = image.create_array(
            str(level),
            shape=lower.shape,
            dtype="float32",
            chunks=chunks,
            compressors=base.compressors,
            dimension_names=base.metadata.dimension_names,
            overwrite=True,
        )
        # Threads of this process: under a distributed client the store must not travel.
        da.store(lower.rechunk(chunks), array, lock=False, compute=True, scheduler="threads")
        previous = da.from_zarr(array)
    name = image.attrs.get("ome", {}).get("multiscales", [{}])[0].get("name")
    voxel = meta.voxel_size[int(channel) :]
    image.attrs["ome"] = ome_attributes(voxel, factors, name=name, channel=channel)
    return len(factors)


def _validated(attrs: Mapping[str, Any]) -> tuple[str, Any] | None:
    """(version, validated model) of a group's NGFF image attributes; None when it has none."""
    try:
        if "ome" in attrs and "multiscales" in attrs["ome"]:
            return "0.5", ImageAttrs.model_validate(attrs["ome"])
        if "multiscales" in attrs:
            return "0.4", ImageAttrsV04.model_validate(dict(attrs))
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InputError(f"invalid OME-NGFF metadata ({where}: {first['msg']})") from None
    return None


def is_image(group: zarr.Group) -> bool:
    """Whether ``group`` carries OME-NGFF ``multiscales`` metadata (0.4 or 0.5)."""
    attrs = group.attrs.asdict()
    return "multiscales" in attrs or "multiscales" in attrs.get("ome", {})


def _scale(transforms: Sequence[Any] | None, ndim: int) -> list[float]:
    scale = [1.0] * ndim
    for transform in transforms or ():
        if getattr(transform, "type", None) == "scale":
            values = getattr(transform, "scale", None)
            if values is None:
                raise InputError("OME-NGFF scale given by path is not supported")
            scale = [a * float(b) for a, b in zip(scale, values, strict=True)]
    return scale


def read_image_meta(group: zarr.Group) -> ImageMeta:
    """Axes, units and full-resolution scale of an OME-NGFF 0.4 or 0.5 image group.

    The first ``multiscales`` entry is used (as the specification says readers should);
    its first dataset is the full resolution.

    Raises
    ------
    InputError
        No or invalid ``multiscales`` metadata, or an axis unit that is not a length.
    """
    found = _validated(group.attrs.asdict())
    if found is None:
        raise InputError(f"zarr group '{group.path or '/'}' has no OME-NGFF multiscales metadata")
    version, model = found
    multiscale = model.multiscales[0]
    ndim = len(multiscale.axes)
    first = multiscale.datasets[0]
    scale = _scale(first.coordinateTransformations, ndim)
    global_scale = _scale(multiscale.coordinateTransformations, ndim)
    voxel: list[float | None] = []
    for axis, s, g in zip(multiscale.axes, scale, global_scale, strict=True):
        unit = axis.unit if isinstance(axis.unit, str) else None
        # NGFF 0.4 allows axes without a type; z, y and x are then spatial by name.
        spatial = axis.type == "space" or (axis.type is None and axis.name in SPACE_AXES)
        if spatial and unit is not None:
            voxel.append(to_micrometres(s * g, unit, f"OME-NGFF axis '{axis.name}'"))
        else:
            voxel.append(None)
    return ImageMeta(
        version=version,
        axes=tuple(str(a.name) for a in multiscale.axes),
        axis_types=tuple(a.type for a in multiscale.axes),
        voxel_size=tuple(voxel),
        paths=tuple(d.path for d in multiscale.datasets),
    )
