"""Convert images (TIFF, OME-TIFF, zarr, OME-Zarr) into a dataset (layout: :mod:`.zarr_io`).

Each input goes through :func:`hpcdeconv.data.opener.open_image`, which reads its axes and
voxel size; its pixels are streamed chunk by chunk (dask) into an OME-NGFF image of the new
dataset instead of being loaded whole. A training dataset needs the physical sampling of
every axis (PSFs are computed on it), so an input with an unknown voxel size is refused
unless ``--voxel-size`` gives it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import zarr

from hpcdeconv.config import StorageConfig
from hpcdeconv.data.opener import Image, open_image
from hpcdeconv.data.zarr_io import (
    DOMAINS,
    SPLITS,
    create_dataset,
    get_split,
    set_split,
    write_volume,
)
from hpcdeconv.errors import InputError

logger = logging.getLogger(__name__)


def _validate(images: Sequence[Image]) -> None:
    """Unknown voxel sizes or duplicate ids fail before anything is written."""
    seen: dict[str, Path] = {}
    for image in images:
        if image.name in seen:
            raise InputError(
                f"{image.source} and {seen[image.name]} would both be volume '{image.name}'"
            )
        seen[image.name] = image.source
        if not image.voxel_size_known:
            raise InputError(
                f"{image.source}: no voxel size along {image.unknown_axes} in its metadata; "
                "pass --voxel-size DZ DY DX (µm)"
            )


def _write_one(group: zarr.Group, image: Image, domain: str, storage: StorageConfig) -> None:
    """Stream one image into ``<domain>/<id>`` as float32."""
    write_volume(
        group,
        f"{domain}/{image.name}",
        image.data,
        image.voxel_size,
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
    voxel_size: tuple[float, float, float] | None = None,
    domain: str = "blurred",
    split: str = "train",
    storage: StorageConfig = StorageConfig(),  # noqa: B008 - frozen pydantic model
    overwrite: bool = False,
    select: Mapping[str, int] | None = None,
) -> list[str]:
    """Write images into a new dataset at ``output``.

    Parameters
    ----------
    paths
        Images, each reducing to one ``(Z, Y, X)`` volume: TIFF/OME-TIFF, ``.npy``, zarr
        arrays or OME-Zarr images (see :func:`~hpcdeconv.data.opener.open_image`).
    output
        Path of the new zarr dataset.
    voxel_size
        ``(dz, dy, dx)`` in micrometres for every file; ``None`` reads it from each file.
    domain
        ``"blurred"`` (microscope images) or ``"sharp"``.
    split
        Split the new volumes are listed under.
    storage
        Chunk shape and codec of the stored arrays.
    overwrite
        Replace an existing ``output``.
    select
        Index per non-spatial axis, e.g. ``{"T": 3}`` for the fourth time point.

    Returns
    -------
    list of str
        Volume ids written (file names without extension), in input order.

    Raises
    ------
    InputError
        Bad domain/split, unreadable input, non-spatial axes, unknown voxel size or
        duplicate ids; nothing is written then.
    """
    if domain not in DOMAINS:
        raise InputError(f"domain must be one of {', '.join(DOMAINS)}, got '{domain}'")
    if split not in SPLITS:
        raise InputError(f"split must be one of {', '.join(SPLITS)}, got '{split}'")
    if not paths:
        raise InputError("no input images given")
    images = [open_image(Path(p), voxel_size, select, warn=False) for p in paths]
    _validate(images)
    group = create_dataset(output, overwrite=overwrite)
    for image in images:
        logger.info("ingesting %s as %s/%s", image.source, domain, image.name)
        _write_one(group, image, domain, storage)
    ids = [image.name for image in images]
    splits = get_split(group)
    splits[split] = ids
    set_split(group, splits)
    return ids
