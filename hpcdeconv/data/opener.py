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
"""

from __future__ import annotations

import contextlib
import functools
import logging
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import tifffile
import zarr
import zarr.errors

from hpcdeconv.data.ngff import VoxelSize, is_image, read_image_meta
from hpcdeconv.data.units import sizes_given_by_user, to_micrometres
from hpcdeconv.errors import InputError

logger = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")
SPATIAL = ("Z", "Y", "X")
#: tifffile's letters for axes whose meaning the file does not state (page sequences).
_UNNAMED = ("Q", "I")
_WHAT = {
    "T": "time points",
    "C": "channels",
    "S": "samples per pixel (an RGB image)",
    "A": "angles",
    "P": "phases",
    "R": "tiles",
    "H": "lifetime bins",
    "E": "lambda bins",
    "L": "exposures",
    "V": "views",
}


@dataclass(frozen=True)
class Image:
    """A lazily readable 3D image and what its file says about it.

    Attributes
    ----------
    data
        ``(Z, Y, X)`` dask array in the stored dtype; nothing is read yet.
    voxel_size
        ``(dz, dy, dx)`` in µm, None for an axis whose size is not known.
    name
        Name for outputs (file name without extension, zarr array or image name).
    source
        The path as given.
    axes
        Axes of the stored array, e.g. ``"TZCYX"``.
    plain
        Whether ``data`` is the stored array with singleton axes dropped (no index, no
        transposition), so a reshape of the stored data gives it.
    """

    data: da.Array
    voxel_size: VoxelSize
    name: str
    source: Path
    axes: str
    plain: bool = True

    @property
    def unknown_axes(self) -> str:
        """The axes whose voxel size is unknown, for messages, e.g. ``"Z, Y"`` ("" if none)."""
        return ", ".join(a for a, v in zip(SPATIAL, self.voxel_size, strict=True) if v is None)

    @property
    def voxel_size_known(self) -> bool:
        """Whether all three voxel sizes are known."""
        return not self.unknown_axes


def image_name(path: Path) -> str:
    """File or store name without its extension (``.ome.tif``, ``.tiff``, ``.zarr``, ``.npy``)."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".ome.zarr", ".zarr", ".npy"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


# --------------------------------------------------------------------------------------
# Axes
# --------------------------------------------------------------------------------------


def _describe_axis(letter: str, size: int) -> str:
    return f"axis {letter} ({size} {_WHAT.get(letter, 'planes')})"


def _hint(letter: str, has_z: bool) -> str:
    """How to process one plane of a non-spatial axis (or why that cannot help)."""
    if not has_z:
        # Taking one time point or channel of a (T|C, Y, X) file leaves a 2D image.
        return (
            "each of its planes is a 2D (Y, X) image and the file has no Z axis; "
            "the 3D methods need a z-stack"
        )
    option = {"T": "time", "C": "channel", "S": "channel"}.get(letter)
    if option is None:
        return "split the file (e.g. in Fiji) and process each volume separately"
    return (
        f"take one with `hpcdeconv ingest --{option} N` (or split the file, e.g. in Fiji) "
        "and process each separately"
    )


def spatial_view(
    data: da.Array,
    axes: str,
    where: str,
    select: Mapping[str, int] | None = None,
    kind: str = "stack",
) -> tuple[da.Array, bool]:
    """``data`` reduced to ``(Z, Y, X)`` using its axis letters.

    Parameters
    ----------
    data
        The stored array.
    axes
        One upper-case letter per axis of ``data`` (tifffile convention: T, C, Z, Y, X, S, Q...).
    where
        The file, for messages.
    select
        Index to take along non-spatial axes, e.g. ``{"T": 3, "C": 0}``; ``"C"`` also
        selects the sample of an RGB (``S``) axis when there is no ``C`` axis.
    kind
        What the image is (``"stack"``, ``"PSF"``), for messages.

    Returns
    -------
    view, plain
        The ``(Z, Y, X)`` view and whether it is a plain squeeze of ``data``.

    Raises
    ------
    InputError
        A non-spatial axis longer than one is left, an index is out of range or names an
        axis the file lacks, or fewer/more than three spatial axes remain.
    """
    if len(axes) != data.ndim:
        raise InputError(f"{where}: axes {axes!r} do not match the shape {data.shape}")
    select = dict(select or {})
    if "C" in select and "C" not in axes and "S" in axes:
        select["S"] = select.pop("C")
    for letter in select:
        if letter not in axes:
            raise InputError(f"{where}: has no axis {letter} to index (axes {axes})")
    index: list[int | slice] = []
    kept: list[str] = []
    plain = True
    for letter, size in zip(axes, data.shape, strict=True):
        if letter in select:
            i = select[letter]
            if not 0 <= i < size:
                raise InputError(f"{where}: index {i} out of range for axis {letter} of {size}")
            index.append(i)
            plain = plain and size == 1
        elif size == 1:
            index.append(0)
        else:
            index.append(slice(None))
            kept.append(letter)
    unnamed = [a for a in kept if a in _UNNAMED]
    if unnamed and "Z" not in kept and len(unnamed) == 1:
        # A page sequence without stated meaning: the only reading a 3D method can take.
        logger.info("%s: axis %s (unnamed) taken as Z", where, unnamed[0])
        kept = ["Z" if a in _UNNAMED else a for a in kept]
    for letter in kept:
        if letter not in SPATIAL and letter not in _UNNAMED:
            n = data.shape[axes.index(letter)] if letter in axes else 0
            raise InputError(
                f"{where}: {_describe_axis(letter, n)} is not spatial; hpcdeconv deconvolves "
                f"3D (Z, Y, X) volumes: {_hint(letter, 'Z' in kept)}"
            )
    if sorted(kept) != sorted(SPATIAL) or len(kept) != 3:
        shape = tuple(int(n) for n in data.shape)
        raise InputError(
            f"{where}: expected a 3D (Z, Y, X) {kind}, got axes {''.join(kept) or '-'} after "
            f"dropping singleton axes (stored axes {axes}, shape {shape})"
        )
    view = data[tuple(index)]
    order = [kept.index(a) for a in SPATIAL]
    if order != [0, 1, 2]:
        view = view.transpose(order)
        plain = False
    return view, plain


# --------------------------------------------------------------------------------------
# TIFF
# --------------------------------------------------------------------------------------


def _ome_voxel_size(tif: tifffile.TiffFile, where: str) -> dict[str, float | None]:
    """``{"Z": dz, "Y": dy, "X": dx}`` (µm, None where absent) of the first OME ``Pixels``."""
    try:
        root = ET.fromstring(tif.ome_metadata or "")
    except ET.ParseError:
        return {}
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return {}
    sizes: dict[str, float | None] = {}
    for axis in SPATIAL:
        value = pixels.get(f"PhysicalSize{axis}")
        if value is None:
            continue
        # The OME schema's default unit is the micrometre.
        unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
        sizes[axis] = to_micrometres(float(value), unit, f"{where}: PhysicalSize{axis}")
    return sizes


def _resolution_spacing(page: tifffile.TiffPage, tag: str) -> float | None:
    """Pixel spacing in file units from an X/YResolution tag (pixels per unit)."""
    item = page.tags.get(tag)
    if item is None:
        return None
    numerator, denominator = item.value
    return None if numerator == 0 else denominator / numerator


def _imagej_voxel_size(tif: tifffile.TiffFile, where: str) -> dict[str, float | None]:
    """``{"Z": dz, "Y": dy, "X": dx}`` (µm) from ImageJ calibration; uncalibrated axes omitted."""
    meta = tif.imagej_metadata or {}
    page = tif.pages.first
    values = {
        "Z": meta.get("spacing"),
        "Y": _resolution_spacing(page, "YResolution"),
        "X": _resolution_spacing(page, "XResolution"),
    }
    units = {"Z": meta.get("zunit"), "Y": meta.get("yunit"), "X": None}
    sizes: dict[str, float | None] = {}
    for axis, value in values.items():
        unit = units[axis] or meta.get("unit")
        if value is None or unit is None:
            continue
        sizes[axis] = to_micrometres(float(value), str(unit), f"{where}: ImageJ unit")
    return sizes


# TIFF ResolutionUnit values with a length: 3 = centimetre (baseline TIFF); 4 and 5
# (millimetre, micrometre) are the extensions tifffile writes. 2 (inch) is left out: it
# is the 72/96 dpi default of screen software and says nothing about a microscope.
_RESOLUTION_UNIT_UM = {3: 1e4, 4: 1e3, 5: 1.0}


def _tiff_resolution_voxel_size(tif: tifffile.TiffFile) -> dict[str, float | None]:
    page = tif.pages.first
    unit = page.tags.get("ResolutionUnit")
    factor = _RESOLUTION_UNIT_UM.get(int(unit.value)) if unit is not None else None
    if factor is None:
        return {}
    sizes: dict[str, float | None] = {}
    for axis, tag in (("Y", "YResolution"), ("X", "XResolution")):
        spacing = _resolution_spacing(page, tag)
        if spacing is not None:
            sizes[axis] = spacing * factor
    return sizes


def tiff_voxel_size(tif: tifffile.TiffFile, where: str) -> VoxelSize:
    """``(dz, dy, dx)`` in µm from OME-XML, else ImageJ, else TIFF resolution tags."""
    if tif.is_ome:
        sizes = _ome_voxel_size(tif, where)
    elif tif.is_imagej:
        sizes = _imagej_voxel_size(tif, where)
    else:
        sizes = _tiff_resolution_voxel_size(tif)
    return tuple(v if v is not None and v > 0 else None for v in (sizes.get(a) for a in SPATIAL))


def _open_tiff(path: Path, select: Mapping[str, int] | None, kind: str) -> Image:
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
    view, plain = spatial_view(stored, axes, where, select, kind)
    return Image(view, voxel, image_name(path), path, axes, plain)


# --------------------------------------------------------------------------------------
# zarr and OME-Zarr
# --------------------------------------------------------------------------------------


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
    view, plain = spatial_view(da.from_zarr(array), axes, where, select, kind)
    by_axis = dict(zip(axes, meta.voxel_size, strict=True))
    if level != meta.paths[0]:
        by_axis = _level_voxel_size(group, level, axes, by_axis)
    voxel = tuple(by_axis.get(a) for a in SPATIAL)
    name = image_name(path) if path.name != level else image_name(path.parent)
    return Image(view, voxel, name, path, axes, plain)


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


def _open_zarr(path: Path, select: Mapping[str, int] | None, kind: str) -> Image:
    where = str(path)
    node = _open_node(path)
    if isinstance(node, zarr.Group):
        if is_image(node):
            return _image_from_group(node, path, None, select, kind)
        attrs = node.attrs.asdict()
        if "bioformats2raw.layout" in attrs and "0" in node:
            child = node["0"]
            if isinstance(child, zarr.Group) and is_image(child):
                return _image_from_group(child, path, None, select, kind)
        from hpcdeconv.data.zarr_io import image_names

        inside = ", ".join(image_names(node)[:5]) or "none"
        raise InputError(
            f"{path}: a zarr group without OME-NGFF image metadata; name an image or array "
            f"inside it (found: {inside})"
        )
    image = _parent_image(path)
    if image is not None:
        return _image_from_group(image, path, path.name, select, kind)
    axes = _array_axes(node)
    if axes is None:
        axes = "ZYX" if node.ndim == 3 else "Q" * node.ndim
    voxel = _legacy_voxel_size(node)
    if voxel is not None and len(voxel) == node.ndim:
        by_axis = dict(zip(axes, voxel, strict=True))
        voxel = tuple(by_axis.get(a) for a in SPATIAL)
    else:
        voxel = (None, None, None)
    view, plain = spatial_view(da.from_zarr(node), axes, where, select, kind)
    return Image(view, voxel, image_name(path), path, axes, plain)


def _is_zarr(path: Path) -> bool:
    return path.is_dir() and any(
        (path / f).is_file() for f in ("zarr.json", ".zarray", ".zgroup", ".zattrs")
    )


# --------------------------------------------------------------------------------------
# The opener
# --------------------------------------------------------------------------------------


def check_voxel_size(voxel_size: Sequence[float]) -> tuple[float, float, float]:
    """A ``--voxel-size DZ DY DX`` given by the user, checked to be three positive sizes."""
    sizes = tuple(float(v) for v in voxel_size)
    if len(sizes) != 3 or not all(np.isfinite(sizes)) or min(sizes) <= 0:
        raise InputError(f"--voxel-size needs three positive sizes DZ DY DX in µm, got {sizes}")
    return sizes  # type: ignore[return-value]


def open_image(
    path: str | Path,
    voxel_size: Sequence[float] | None = None,
    select: Mapping[str, int] | None = None,
    warn: bool = True,
    kind: str = "stack",
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
        ``(dz, dy, dx)`` in µm replacing whatever the file says (``--voxel-size``).
    select
        Index per non-spatial axis, e.g. ``{"T": 0}`` (``--time``), ``{"C": 1}`` (``--channel``).
    warn
        Log a warning when a voxel size is unknown (the user is told once per file).
    kind
        What the image is for (``"stack"``, ``"PSF"``), named in messages.

    Returns
    -------
    Image
        ``(Z, Y, X)`` lazy data, voxel size (None where unknown), name and axes.

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
            image = _open_tiff(path, select, kind)
        elif suffix == ".npy":
            image = _open_npy(path, select, kind)
        elif _is_zarr(path):
            image = _open_zarr(path, select, kind)
        else:
            raise InputError(f"{path}: not a TIFF (.tif/.tiff), .npy, zarr array or OME-Zarr image")
    if voxel_size is not None:
        image = Image(
            image.data, check_voxel_size(voxel_size), image.name, path, image.axes, image.plain
        )
    elif warn and not image.voxel_size_known:
        logger.warning(
            "%s: voxel size along %s not in the file's metadata; it stays unknown in the "
            "output (pass --voxel-size DZ DY DX to set it)",
            path,
            image.unknown_axes,
        )
    return image


def _open_npy(path: Path, select: Mapping[str, int] | None, kind: str) -> Image:
    try:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InputError(f"{path}: not a readable .npy array ({exc})") from None
    # .npy stores no axis names; a 3D array is read as (Z, Y, X).
    axes = "ZYX" if data.ndim == 3 else "Q" * data.ndim
    view, plain = spatial_view(da.from_array(data), axes, str(path), select, kind)
    return Image(view, (None, None, None), image_name(path), path, axes, plain)


def load(image: Image, region: tuple[slice, ...] | None = None) -> np.ndarray:
    """``image.data[region]`` (all of it by default) as a float32 numpy array.

    Computed with this process's threads: inside a dask-distributed worker, or under a
    default distributed client, the lazy file handles must not be shipped elsewhere.
    """
    data = image.data if region is None else image.data[region]
    return np.asarray(data.compute(scheduler="threads"), dtype=np.float32)


@functools.lru_cache(maxsize=4)
def _cached(path: str, mtime_ns: int) -> da.Array:
    return open_image(path, warn=False).data


def read_region(path: Path, region: tuple[slice, ...]) -> np.ndarray:
    """``volume[region]`` of the image at ``path`` as float32 (cached open per process)."""
    mtime = Path(path).stat().st_mtime_ns
    data = _cached(str(path), mtime)[region]
    return np.asarray(data.compute(scheduler="synchronous"), dtype=np.float32)


def describe_image(image: Image) -> str:
    """One line: name, stored axes, (Z, Y, X) shape, dtype and voxel size."""
    voxel = "x".join("?" if v is None else f"{v:g}" for v in image.voxel_size)
    shape = tuple(int(n) for n in image.data.shape)
    return f"{image.source}: axes {image.axes} -> ZYX {shape} {image.data.dtype} voxel={voxel} um"


def as_float_tuple(voxel: VoxelSize) -> tuple[Any, ...]:
    """Voxel size as JSON-friendly values (None stays None)."""
    return tuple(None if v is None else float(v) for v in voxel)
