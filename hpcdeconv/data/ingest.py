"""Convert TIFF stacks into a dataset (see :mod:`hpcdeconv.data.zarr_io` for the layout).

Stacks are read through tifffile's zarr view and dask, so a stack is streamed chunk by chunk
into the output instead of being loaded whole. Voxel sizes come from the caller or, failing
that, from ImageJ metadata (``spacing`` plus X/YResolution and ``unit``) or OME-XML
(``PhysicalSizeX/Y/Z`` with their units); they are stored in micrometres.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import tifffile
import zarr

from hpcdeconv.config import StorageConfig
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

# Micrometres per unit, keyed by the spellings found in ImageJ and OME files.
_MICROMETRES_PER_UNIT = {
    "nm": 1e-3,
    "nanometer": 1e-3,
    "um": 1.0,
    "µm": 1.0,  # micro sign, as written by OME
    "μm": 1.0,  # greek mu, as written by some ImageJ versions
    "\\u00b5m": 1.0,  # ImageJ escapes the micro sign in its ASCII description
    "micron": 1.0,
    "microns": 1.0,
    "micrometer": 1.0,
    "mm": 1e3,
    "millimeter": 1e3,
    "cm": 1e4,
    "centimeter": 1e4,
    "m": 1e6,
    "meter": 1e6,
}


@dataclass(frozen=True)
class TiffInfo:
    """What ingest needs to know about one TIFF before reading its pixels.

    Attributes
    ----------
    path
        The file.
    shape
        Shape of its first series as stored, e.g. ``(1, 40, 512, 512)``.
    voxel_size
        ``(dz, dy, dx)`` in micrometres from the file's metadata, ``None`` if incomplete.
    """

    path: Path
    shape: tuple[int, ...]
    voxel_size: tuple[float, float, float] | None

    @property
    def volume_id(self) -> str:
        """File name without ``.tif``/``.tiff`` (and ``.ome``), used as the volume id."""
        name = self.path.name
        for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
            if name.lower().endswith(suffix):
                return name[: -len(suffix)]
        return self.path.stem

    @property
    def squeezed_shape(self) -> tuple[int, ...]:
        """Shape without singleton axes."""
        return tuple(n for n in self.shape if n != 1)


def _to_micrometres(value: float, unit: str | None) -> float | None:
    if unit is None:
        return None
    factor = _MICROMETRES_PER_UNIT.get(unit.strip().lower())
    return None if factor is None else float(value) * factor


def _resolution_spacing(page: tifffile.TiffPage, tag: str) -> float | None:
    """Pixel spacing in file units from an X/YResolution tag (pixels per unit)."""
    item = page.tags.get(tag)
    if item is None:
        return None
    numerator, denominator = item.value
    if numerator == 0:
        return None
    return denominator / numerator


def imagej_voxel_size(tif: tifffile.TiffFile) -> tuple[float, float, float] | None:
    """``(dz, dy, dx)`` in micrometres from ImageJ metadata, or None if any part is missing."""
    meta = tif.imagej_metadata or {}
    unit = meta.get("unit")
    page = tif.pages.first
    values = (
        meta.get("spacing"),
        _resolution_spacing(page, "YResolution"),
        _resolution_spacing(page, "XResolution"),
    )
    if unit is None or any(v is None for v in values):
        return None
    sizes = tuple(_to_micrometres(float(v), str(unit)) for v in values)
    if any(s is None or s <= 0 for s in sizes):
        return None
    return sizes  # type: ignore[return-value]


def ome_voxel_size(tif: tifffile.TiffFile) -> tuple[float, float, float] | None:
    """``(dz, dy, dx)`` in micrometres from the first OME ``Pixels`` element, or None."""
    try:
        root = ET.fromstring(tif.ome_metadata or "")
    except ET.ParseError:
        return None
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    sizes = []
    for axis in ("Z", "Y", "X"):
        value = pixels.get(f"PhysicalSize{axis}")
        # OME's schema default unit is the micrometre.
        unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
        size = None if value is None else _to_micrometres(float(value), unit)
        if size is None or size <= 0:
            return None
        sizes.append(size)
    return sizes[0], sizes[1], sizes[2]


def inspect_tiff(path: Path) -> TiffInfo:
    """Shape and metadata voxel size of a TIFF's first series, without reading pixels."""
    try:
        with tifffile.TiffFile(path) as tif:
            shape = tuple(int(n) for n in tif.series[0].shape)
            voxel = None
            if tif.is_ome:
                voxel = ome_voxel_size(tif)
            if voxel is None and tif.is_imagej:
                voxel = imagej_voxel_size(tif)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (tifffile.TiffFileError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable TIFF ({exc})") from None
    return TiffInfo(path=Path(path), shape=shape, voxel_size=voxel)


def _validate(
    infos: Sequence[TiffInfo], voxel_size: tuple[float, float, float] | None
) -> list[tuple[float, float, float]]:
    """Voxel size of every file; wrong dimensionality or duplicate ids fail before writing."""
    seen: dict[str, Path] = {}
    sizes = []
    for info in infos:
        if len(info.squeezed_shape) != 3:
            raise InputError(f"{info.path}: expected a 3D (Z, Y, X) stack, got shape {info.shape}")
        if info.volume_id in seen:
            raise InputError(
                f"{info.path} and {seen[info.volume_id]} would both be volume '{info.volume_id}'"
            )
        seen[info.volume_id] = info.path
        size = voxel_size if voxel_size is not None else info.voxel_size
        if size is None:
            raise InputError(
                f"{info.path}: no voxel size in the TIFF metadata; pass --voxel-size DZ DY DX"
            )
        sizes.append(size)
    return sizes


def _write_one(
    group: zarr.Group,
    info: TiffInfo,
    domain: str,
    voxel_size: tuple[float, float, float],
    storage: StorageConfig,
) -> None:
    """Stream one TIFF's first series into ``<domain>/<id>`` as float32."""
    with tifffile.imread(info.path, aszarr=True, series=0, level=0) as store:
        stack = da.from_zarr(zarr.open_array(store, mode="r"))
        squeeze = tuple(0 if n == 1 else slice(None) for n in stack.shape)
        volume = stack[squeeze]
        write_volume(
            group,
            f"{domain}/{info.volume_id}",
            volume,
            voxel_size,
            chunks=storage.chunks,
            codec=storage.codec,
            attrs={"source": str(info.path.resolve()), "source_dtype": str(stack.dtype)},
        )


def ingest_tiff(
    paths: Sequence[Path],
    output: Path,
    voxel_size: tuple[float, float, float] | None = None,
    domain: str = "blurred",
    split: str = "train",
    storage: StorageConfig = StorageConfig(),  # noqa: B008 - frozen pydantic model
    overwrite: bool = False,
) -> list[str]:
    """Write TIFF stacks into a new dataset at ``output``.

    Parameters
    ----------
    paths
        TIFF files, each holding one ``(Z, Y, X)`` stack (singleton axes are squeezed).
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

    Returns
    -------
    list of str
        Volume ids written (file names without extension), in input order.
    """
    if domain not in DOMAINS:
        raise InputError(f"domain must be one of {', '.join(DOMAINS)}, got '{domain}'")
    if split not in SPLITS:
        raise InputError(f"split must be one of {', '.join(SPLITS)}, got '{split}'")
    if not paths:
        raise InputError("no TIFF files given")
    infos = [inspect_tiff(Path(p)) for p in paths]
    sizes = _validate(infos, voxel_size)
    group = create_dataset(output, overwrite=overwrite)
    for info, size in zip(infos, sizes, strict=True):
        logger.info("ingesting %s as %s/%s", info.path, domain, info.volume_id)
        _write_one(group, info, domain, size, storage)
    ids = [info.volume_id for info in infos]
    splits = get_split(group)
    splits[split] = ids
    set_split(group, splits)
    return ids
