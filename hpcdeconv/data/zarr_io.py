"""Zarr v3 datasets: layout and volume I/O as OME-NGFF 0.5 images.

A dataset is a zarr v3 group::

    <root>/zarr.json        attribute "hpcdeconv": {"format": 1, "split": {...}, ...}
    <root>/sharp/<id>/      OME-NGFF image, ground truth (simulated data only)
    <root>/blurred/<id>/    OME-NGFF image, the microscope images
    <root>/psf/             OME-NGFF image, optional, the PSF used

Each image holds its full-resolution float32 array at ``0`` (plus downsampled levels
``1``, ``2``, ... for large volumes): ``(*S)`` with ``S`` the spatial axes ``(Z, Y, X)`` or
``(Y, X)``, or ``(C, *S)`` with the channel axis ``"c"`` first (NGFF axis order; absent for
one channel). Its ``multiscales`` metadata gives axes, units and scale
(:mod:`hpcdeconv.data.ngff`), so napari, Fiji and neuroglancer show it at its physical
size; :mod:`hpcdeconv.data.layout` reads it back. Readers also accept the arrays of datasets
written before (``<root>/sharp/<id>`` with ``axes``/``voxel_size`` attributes). Arrays are
never sharded, so any worker may write any whole chunk without coordinating with the
others. The text summary of a store (``hpcdeconv info``) is :mod:`hpcdeconv.data.summary`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr
import zarr.errors
from zarr.codecs import BloscCodec

from hpcdeconv.config import CodecConfig
from hpcdeconv.data.intensity import INTENSITY_KEY, IntensityMap
from hpcdeconv.data.layout import VolumeMeta, volume_meta
from hpcdeconv.data.ngff import (
    PYRAMID_MIN_SIZE,
    add_pyramid,
    create_image,
    is_image,
    read_image_meta,
)
from hpcdeconv.data.safety import empty_output
from hpcdeconv.errors import InputError, OutputExistsError

logger = logging.getLogger(__name__)

SHARP = "sharp"
BLURRED = "blurred"
PSF_KEY = "psf"
DOMAINS = (SHARP, BLURRED)
SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1
ROOT_KEY = "hpcdeconv"


def create_dataset(path: str | Path, overwrite: bool = False) -> zarr.Group:
    """Create an empty dataset group with the root ``hpcdeconv`` attribute.

    Parameters
    ----------
    path
        Directory of the new zarr v3 group.
    overwrite
        Replace a store that hpcdeconv wrote at ``path`` (see
        :func:`~hpcdeconv.data.safety.check_replaceable`). Without it an existing path is
        left untouched.

    Returns
    -------
    zarr.Group
        The new group, open for writing.

    Raises
    ------
    OutputExistsError
        ``path`` exists and ``overwrite`` is False, or it holds anything hpcdeconv did not
        write (it is then left untouched).
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it")
        empty_output(path, "zarr")
        logger.info("overwriting %s", path)
    root = {"format": FORMAT_VERSION, "split": {name: [] for name in SPLITS}}
    # Whatever was at path has been emptied above (a linked directory is kept, and zarr's
    # mode "w" cannot clear through a link), so the group is created, not replaced.
    return zarr.open_group(path, mode="w-", zarr_format=3, attributes={ROOT_KEY: root})


def blosc_codec(codec: CodecConfig) -> BloscCodec:
    """The zarr v3 Blosc codec described by ``codec``."""
    return BloscCodec(cname=codec.cname, clevel=codec.clevel, shuffle=codec.shuffle)


def clip_chunks(chunks: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
    """Chunk shape no larger than ``shape`` (and at least 1) along every axis."""
    if len(chunks) != len(shape):
        raise ValueError(f"chunks {tuple(chunks)} and shape {tuple(shape)} differ in length")
    return tuple(max(1, min(int(c), int(s))) for c, s in zip(chunks, shape, strict=True))


def write_volume(
    group: zarr.Group,
    name: str,
    data: np.ndarray | da.Array,
    voxel_size: Sequence[float | None],
    chunks: Sequence[int] = (64, 64, 64),
    codec: CodecConfig = CodecConfig(),  # noqa: B008 - frozen pydantic model, safe default
    attrs: Mapping[str, Any] | None = None,
    pyramid_min_size: int = PYRAMID_MIN_SIZE,
) -> zarr.Array:
    """Store one image as an OME-NGFF 0.5 image of float32 arrays with Blosc compression.

    Parameters
    ----------
    group
        Dataset group open for writing.
    name
        Path of the image group inside ``group``, e.g. ``"sharp/v000"`` or ``"psf"``.
    data
        ``(*S)`` array, ``S`` = ``(Z, Y, X)`` or ``(Y, X)``, or ``(C, *S)`` with channels
        first (stored with an NGFF axis ``"c"`` of type ``"channel"``). A dask array is
        rechunked to the storage chunks and stored block by block, so it is never loaded
        whole.
    voxel_size
        Sampling per spatial axis in micrometres, one entry per axis of ``S``: ``data``
        with one axis more has channels. None where unknown (written as an axis without
        unit, see :mod:`hpcdeconv.data.ngff`).
    chunks
        Spatial storage chunk shape; its trailing ``len(S)`` entries are used, clipped to the
        shape. All channels of a place share one chunk (a patch reads every channel).
    codec
        Blosc settings.
    attrs
        hpcdeconv attributes (provenance, source) stored beside the ``ome`` metadata.
    pyramid_min_size
        Downsampled levels are added while an axis is longer than this.

    Returns
    -------
    zarr.Array
        The full-resolution array (``<name>/0``).

    Raises
    ------
    OutputExistsError
        ``name`` already exists in ``group``.
    """
    spatial = len(voxel_size)
    if data.ndim not in (spatial, spatial + 1):
        raise ValueError(f"voxel_size {tuple(voxel_size)} does not match {data.ndim}D data")
    channel = (int(data.shape[0]),) if data.ndim > spatial else ()
    chunk_shape = channel + clip_chunks(tuple(chunks)[-spatial:], data.shape[-spatial:])
    try:
        array = create_image(
            group, name, data.shape, chunk_shape, blosc_codec(codec), tuple(voxel_size), attrs
        )
    except (zarr.errors.ContainsArrayError, zarr.errors.ContainsGroupError):
        raise OutputExistsError(f"'{name}' already exists in {group.store}") from None
    if isinstance(data, da.Array):
        # Blocks equal to storage chunks: every task writes whole chunks, none shares one.
        blocks = data.astype(np.float32).rechunk(chunk_shape)
        da.store(blocks, array, lock=False, compute=True)
    else:
        array[...] = np.asarray(data, dtype=np.float32)
    image = group[name]
    assert isinstance(image, zarr.Group)
    add_pyramid(image, pyramid_min_size)
    return array


def open_dataset(path: str | Path, mode: str = "r") -> zarr.Group:
    """Open a dataset group, turning every way it can be unreadable into :class:`InputError`.

    Parameters
    ----------
    path
        Directory of the zarr v3 group.
    mode
        zarr access mode: ``"r"`` (read only) or ``"r+"`` / ``"a"`` (read and write).
    """
    if mode not in ("r", "r+", "a"):
        raise ValueError(f"mode must be 'r', 'r+' or 'a', got {mode!r}")
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    try:
        group = zarr.open_group(path, mode=mode)
        attrs = group.attrs.asdict()
    except zarr.errors.ContainsArrayError:
        raise InputError(f"{path}: is a zarr array, expected a dataset group") from None
    except FileNotFoundError:
        raise InputError(f"{path}: not a zarr group (no zarr.json found)") from None
    except (ValueError, TypeError, KeyError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: corrupt zarr metadata ({reason})") from None
    check_root_attrs(path, attrs)
    return group


def check_root_attrs(path: Path, attrs: Mapping[str, Any]) -> None:
    """Reject a malformed or newer ``hpcdeconv`` root attribute; its absence is allowed."""
    root = attrs.get(ROOT_KEY)
    if root is None:
        return
    if not isinstance(root, Mapping) or not isinstance(root.get("format"), int):
        raise InputError(f"{path}: root attribute '{ROOT_KEY}' is malformed")
    if root["format"] > FORMAT_VERSION:
        raise InputError(
            f"{path}: dataset format {root['format']} is newer than this hpcdeconv "
            f"(reads format {FORMAT_VERSION})"
        )


def _as_group(group_or_path: zarr.Group | str | Path) -> zarr.Group:
    if isinstance(group_or_path, zarr.Group):
        return group_or_path
    return open_dataset(group_or_path)


def image_names(group: zarr.Group) -> list[str]:
    """Paths of every volume below ``group``, sorted, e.g. ``["blurred/v0", "psf"]``.

    A volume is an OME-NGFF image group (its levels are not listed) or an array outside
    any image (datasets written before OME-NGFF, bare arrays of other tools).
    """
    members = dict(group.members(max_depth=None))
    images = {
        key for key, node in members.items() if isinstance(node, zarr.Group) and is_image(node)
    }
    names = set(images)
    for key, node in members.items():
        inside = any(key.startswith(image + "/") for image in images)
        if isinstance(node, zarr.Array) and not inside:
            names.add(key)
    return sorted(names)


def open_array(group: zarr.Group, name: str) -> zarr.Array:
    """The full-resolution array of volume ``name`` of ``group``.

    ``name`` is an OME-NGFF image group (its level ``0`` is returned) or an array; a
    missing name raises InputError listing what exists.
    """
    try:
        node = group[name]
        if isinstance(node, zarr.Group) and is_image(node):
            node = node[read_image_meta(node).paths[0]]
    except KeyError:
        node = None
    except (ValueError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"array '{name}' in {group.store}: corrupt metadata ({reason})") from None
    if not isinstance(node, zarr.Array):
        existing = ", ".join(image_names(group)) or "none"
        raise InputError(f"no volume '{name}' in {group.store}; volumes present: {existing}")
    return node


def read_volume(group_or_path: zarr.Group | str | Path, name: str) -> tuple[da.Array, VolumeMeta]:
    """Lazy view of a stored volume.

    Returns
    -------
    volume
        ``(*S)`` or ``(C, *S)`` dask array (see ``meta.axes``) whose chunks are the storage
        chunks; nothing is read yet.
    meta
        Voxel size and axes.
    """
    array = open_array(_as_group(group_or_path), name)
    meta = volume_meta(array)
    return da.from_zarr(array), meta


def _root(group: zarr.Group) -> dict[str, Any]:
    root = group.attrs.asdict().get(ROOT_KEY)
    if not isinstance(root, Mapping):
        raise InputError(f"{group.store} is not an hpcdeconv dataset (no '{ROOT_KEY}' attribute)")
    return dict(root)


def get_split(group: zarr.Group) -> dict[str, list[str]]:
    """Volume ids per split: ``{"train": [...], "val": [...], "test": [...]}``."""
    split = _root(group).get("split", {})
    if not isinstance(split, Mapping):
        raise InputError(f"{group.store}: the dataset split is malformed")
    return {name: [str(i) for i in split.get(name, [])] for name in SPLITS}


def get_intensity(group: zarr.Group) -> IntensityMap | None:
    """The dataset's intensity mapping (raw → stored values), None if it records none.

    Raises
    ------
    InputError
        A malformed record.
    """
    record = _root(group).get(INTENSITY_KEY)
    return None if record is None else IntensityMap.from_record(record)


def set_split(group: zarr.Group, split: Mapping[str, Sequence[str]]) -> None:
    """Record which volume ids belong to train/val/test; every id must exist in a domain."""
    unknown_splits = set(split) - set(SPLITS)
    if unknown_splits:
        raise InputError(f"unknown split names {sorted(unknown_splits)}; use {list(SPLITS)}")
    known = {i for domain in DOMAINS for i in volume_ids(group, domain)}
    missing = sorted({i for ids in split.values() for i in ids} - known)
    if missing:
        raise InputError(f"split names volumes that are not stored: {', '.join(missing)}")
    root = _root(group)
    root["split"] = {name: [str(i) for i in split.get(name, [])] for name in SPLITS}
    group.attrs[ROOT_KEY] = root


def update_root_attrs(group: zarr.Group, **values: Any) -> None:
    """Add keys (e.g. ``simulation=...``) to the root ``hpcdeconv`` attribute."""
    root = _root(group)
    root.update(values)
    group.attrs[ROOT_KEY] = root


def volume_ids(group: zarr.Group, domain: str) -> list[str]:
    """Sorted ids of the arrays in ``domain`` (``"sharp"`` or ``"blurred"``); [] if absent."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    try:
        sub = group[domain]
    except KeyError:
        return []
    if not isinstance(sub, zarr.Group):
        return []
    ids = [key for key, node in sub.arrays()]
    ids += [key for key, node in sub.groups() if is_image(node)]
    return sorted(ids)
