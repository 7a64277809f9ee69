"""An opened image: lazy ``(Z, Y, X)`` data and what its file says about it.

:class:`Image` is what :func:`hpcdeconv.data.opener.open_image` returns for every format;
:func:`image_name` names outputs after the file or store an image came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dask.array as da

from hpcdeconv.data.ngff import VoxelSize

__all__ = ["SPATIAL", "Image", "image_name"]

#: The spatial axes of an opened image, in the order of its data and voxel size.
SPATIAL = ("Z", "Y", "X")


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
    dims
        Axes of ``data``: ``"ZYX"``, or when opened with ``any_rank``
        (:func:`~hpcdeconv.data.opener.open_image`) also ``"YX"``, ``"CYX"`` or ``"CZYX"``
        (the channel axis first, OME-NGFF order).
    """

    data: da.Array
    voxel_size: VoxelSize
    name: str
    source: Path
    axes: str
    plain: bool = True
    dims: str = "ZYX"

    @property
    def spatial_axes(self) -> str:
        """The spatial axes the image has: ``"ZYX"``, or ``"YX"`` for a 2D image."""
        return "".join(a for a in self.dims if a in SPATIAL)

    @property
    def unknown_axes(self) -> str:
        """The axes of the image whose voxel size is unknown, for messages, e.g. ``"Z, Y"``
        ("" if none); a 2D image has no Z to know."""
        by_axis = dict(zip(SPATIAL, self.voxel_size, strict=True))
        return ", ".join(a for a in self.spatial_axes if by_axis[a] is None)

    @property
    def voxel_size_known(self) -> bool:
        """Whether the voxel size along every spatial axis of the image is known."""
        return not self.unknown_axes


def image_name(path: Path) -> str:
    """File or store name without its extension (``.ome.tif``, ``.tiff``, ``.zarr``, ``.npy``)."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".ome.zarr", ".zarr", ".npy"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name
