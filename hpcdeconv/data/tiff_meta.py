"""The voxel size a TIFF declares: OME-XML, else ImageJ calibration, else resolution tags.

Sizes are read in µm from any OME length unit, the ImageJ ``unit``/``spacing`` or the TIFF
``ResolutionUnit``; an axis the file does not calibrate stays None rather than being given an
invented size.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import tifffile

from hpcdeconv.data.image import SPATIAL
from hpcdeconv.data.ngff import VoxelSize
from hpcdeconv.data.units import to_micrometres

__all__ = ["tiff_voxel_size"]


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
