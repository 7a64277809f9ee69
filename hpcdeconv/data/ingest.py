"""Convert images (TIFF, OME-TIFF, zarr, OME-Zarr) into a dataset (layout: :mod:`.zarr_io`).

Each input goes through :func:`hpcdeconv.data.opener.open_image` (with ``any_rank``), which
reads its axes and voxel size; a 2D ``(Y, X)`` image, a 3D ``(Z, Y, X)`` volume, each with
or without a channel axis (``C``, or ``S`` of an RGB image), is stored with its channels
first as the OME-NGFF axis ``"c"``. Its pixels are streamed chunk by chunk (dask) into an
OME-NGFF image of the dataset instead of being loaded whole. The images of one dataset
share one layout (spatial dims and channel count), since the training feed draws patches
of one shape from all of them. A training dataset needs the physical sampling of every
spatial axis (PSFs are computed on it), so an input with an unknown voxel size is refused
unless ``--voxel-size`` gives it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import zarr

from hpcdeconv.config import StorageConfig
from hpcdeconv.data.image import SPATIAL
from hpcdeconv.data.layout import array_layout
from hpcdeconv.data.opener import Image, check_voxel_size, open_image
from hpcdeconv.data.units import sizes_given_by_user
from hpcdeconv.data.zarr_io import (
    DOMAINS,
    SPLITS,
    create_dataset,
    get_split,
    open_array,
    open_dataset,
    set_split,
    volume_ids,
    write_volume,
)
from hpcdeconv.errors import InputError

logger = logging.getLogger(__name__)

_NAMES = {2: "2D (Y, X)", 3: "3D (Z, Y, X)"}


def _spatial_dims(image: Image) -> int:
    """2 or 3: the axes of ``image.data`` besides its channel axis."""
    return len(image.dims.replace("C", ""))


def _channels(image: Image) -> int:
    return int(image.data.shape[0]) if image.dims.startswith("C") else 1


def _layout_text(spatial_dims: int, channels: int) -> str:
    return f"{_NAMES[spatial_dims]} with {channels} channel{'s' if channels > 1 else ''}"


def _open(path: Path, given: bool, select: Mapping[str, int] | None) -> Image:
    """Open one input as ``(C?, Z?, Y, X)``.

    Raises
    ------
    InputError
        Unreadable input, or axes that are not an image.
    """
    # The opener's --voxel-size takes three sizes; ours is set by _with_voxel_size for 2D
    # images too, and a unit of the file we cannot convert must not stop the read then.
    with sizes_given_by_user() if given else contextlib.nullcontext():
        return open_image(path, None, select, warn=False, any_rank=True)


def _with_voxel_size(image: Image, voxel_size: Sequence[float] | None) -> Image:
    """``image`` with ``voxel_size`` (2 or 3 entries, µm) replacing its own.

    Raises
    ------
    InputError
        ``voxel_size`` is not one positive size per spatial axis of the image.
    """
    if voxel_size is None:
        return image
    dims = _spatial_dims(image)
    shape = tuple(int(n) for n in image.data.shape)
    where = f"{image.source}, a {_NAMES[dims]} image of shape {shape}"
    # Kept in the opener's (dz, dy, dx) order; a 2D image has no Z sampling.
    sizes = check_voxel_size(voxel_size, "".join(SPATIAL[-dims:]), where)
    return dataclasses.replace(image, voxel_size=sizes)


def _voxel_size(image: Image) -> tuple[float | None, ...]:
    """The voxel size of the spatial axes of ``image`` (µm), as stored."""
    return tuple(image.voxel_size[-_spatial_dims(image) :])


def _check_layouts(images: Sequence[Image]) -> None:
    """All images share spatial dims and channel count (one patch shape fits them all)."""
    first = images[0]
    for image in images[1:]:
        if (_spatial_dims(image), _channels(image)) != (_spatial_dims(first), _channels(first)):
            raise InputError(
                f"{image.source} is a {_layout_text(_spatial_dims(image), _channels(image))} "
                f"image but {first.source} is a "
                f"{_layout_text(_spatial_dims(first), _channels(first))} image; the images of "
                "one dataset share spatial dims and channel count"
            )


def _validate(images: Sequence[Image], taken: set[str]) -> None:
    """Unknown voxel sizes or duplicate ids fail before anything is written."""
    seen: dict[str, Path] = {}
    for image in images:
        if image.name in taken:
            raise InputError(f"{image.source}: volume '{image.name}' is already in the dataset")
        if image.name in seen:
            raise InputError(
                f"{image.source} and {seen[image.name]} would both be volume '{image.name}'"
            )
        seen[image.name] = image.source
        axes = SPATIAL[-_spatial_dims(image) :]
        unknown = [a for a, v in zip(axes, _voxel_size(image), strict=True) if v is None]
        if unknown:
            raise InputError(
                f"{image.source}: no voxel size along {', '.join(unknown)} in its metadata; "
                f"pass --voxel-size {' '.join(f'D{a}' for a in axes)} (µm)"
            )


def _check_dataset_layout(group: zarr.Group, output: Path, image: Image) -> None:
    """An appended image has the layout of the images already in the dataset."""
    for domain in DOMAINS:
        for vid in volume_ids(group, domain):
            stored = array_layout(open_array(group, f"{domain}/{vid}"))
            new = (_spatial_dims(image), _channels(image))
            if stored != new:
                raise InputError(
                    f"{image.source} is a {_layout_text(*new)} image but {output} holds "
                    f"{_layout_text(*stored)} images ({domain}/{vid}); the images of one "
                    "dataset share spatial dims and channel count"
                )
            return


def _write_one(group: zarr.Group, image: Image, domain: str, storage: StorageConfig) -> None:
    """Stream one image into ``<domain>/<id>`` as float32."""
    write_volume(
        group,
        f"{domain}/{image.name}",
        image.data,
        _voxel_size(image),
        chunks=storage.chunks,
        codec=storage.codec,
        attrs={
            "source": str(Path(image.source).resolve()),
            "source_axes": image.axes,
            "source_dtype": str(image.data.dtype),
        },
    )


def ingest_images(
    paths: Sequence[Path],
    output: Path,
    voxel_size: Sequence[float] | None = None,
    domain: str = "blurred",
    split: str = "train",
    storage: StorageConfig = StorageConfig(),  # noqa: B008 - frozen pydantic model
    overwrite: bool = False,
    select: Mapping[str, int] | None = None,
    append: bool = False,
) -> list[str]:
    """Write images into a new dataset at ``output``, or add them to one (``append``).

    Parameters
    ----------
    paths
        Images, each reducing to one ``(C?, Z?, Y, X)`` image: TIFF/OME-TIFF, ``.npy``,
        zarr arrays or OME-Zarr images (see :func:`~hpcdeconv.data.opener.open_image`).
        All share spatial dims (2 or 3) and channel count.
    output
        Path of the zarr dataset.
    voxel_size
        ``(dz, dy, dx)`` for volumes or ``(dy, dx)`` for 2D images, in micrometres, for
        every file; ``None`` reads it from each file.
    domain
        ``"blurred"`` (microscope images) or ``"sharp"``.
    split
        Split the new volumes are listed under.
    storage
        Chunk shape and codec of the stored arrays (a 2D image takes the trailing two
        entries of 3D chunks).
    overwrite
        Replace an existing ``output``.
    select
        Index per non-spatial axis, e.g. ``{"T": 3}`` for the fourth time point.
    append
        Add the images to the existing hpcdeconv dataset ``output`` (e.g. the sharp
        images of a pair whose blurred images are in it); its images keep their place.

    Returns
    -------
    list of str
        Volume ids written (file names without extension), in input order.

    Raises
    ------
    InputError
        Bad domain/split, unreadable input, non-spatial axes other than one channel axis,
        unknown voxel size, a voxel size or chunks of the wrong length, duplicate ids,
        images of different layouts (also against ``output`` with ``append``), or
        ``append`` with ``overwrite``; nothing is written then.
    OutputExistsError
        ``output`` exists (without ``overwrite`` or ``append``).
    """
    if domain not in DOMAINS:
        raise InputError(f"domain must be one of {', '.join(DOMAINS)}, got '{domain}'")
    if split not in SPLITS:
        raise InputError(f"split must be one of {', '.join(SPLITS)}, got '{split}'")
    if not paths:
        raise InputError("no input images given")
    if append and overwrite:
        raise InputError("--append adds to a dataset and --overwrite replaces it; give one")
    if voxel_size is not None:
        sizes = np.asarray(voxel_size, dtype=float)
        if len(sizes) not in (2, 3) or not np.all(np.isfinite(sizes)) or sizes.min() <= 0:
            raise InputError(
                "--voxel-size needs positive sizes DZ DY DX (volumes) or DY DX (2D images) "
                f"in µm, got {tuple(float(v) for v in sizes)}"
            )
    opened = [_open(Path(p), voxel_size is not None, select) for p in paths]
    _check_layouts(opened)
    images = [_with_voxel_size(image, voxel_size) for image in opened]
    existing = open_dataset(output, mode="r+") if append else None
    _validate(images, set(volume_ids(existing, domain)) if existing is not None else set())
    if len(storage.chunks) < _spatial_dims(images[0]):
        raise InputError(
            f"--chunks {' '.join(map(str, storage.chunks))} has fewer entries than the "
            f"{_NAMES[_spatial_dims(images[0])]} images have axes"
        )
    if existing is not None:
        _check_dataset_layout(existing, output, images[0])
        group = existing
    else:
        group = create_dataset(output, overwrite=overwrite)
    for image in images:
        logger.info("ingesting %s as %s/%s", image.source, domain, image.name)
        _write_one(group, image, domain, storage)
    ids = [image.name for image in images]
    splits = get_split(group)
    splits[split] = [*splits.get(split, []), *(i for i in ids if i not in splits.get(split, []))]
    set_split(group, splits)
    return ids
