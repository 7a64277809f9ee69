"""Inputs of ``predict``, ``deconvolve`` and ``rl``: images described by path, read anywhere.

Every input is opened once on the client through the one opener of the project,
:func:`hpcdeconv.data.opener.open_image`, which reads the axes, the voxel size and the
name the file declares. A :class:`VolumeSource` keeps only what describes it (path,
shape, axes, voxel size), so it travels to dask workers cheaply and each worker reads
its own regions (:meth:`VolumeSource.read`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from hpcdeconv.data.opener import TIFF_SUFFIXES, open_image, read_region
from hpcdeconv.errors import InputError
from hpcdeconv.inference.tiling import Slices

#: Group inside a ``deconvolve``/``rl`` output store that holds one array per input.
OUTPUT_GROUP = "deconvolved"


@dataclass(frozen=True)
class VolumeSource:
    """One input image, described by path so that any worker can open it.

    Attributes
    ----------
    path
        Absolute path of a TIFF or ``.npy`` file, or of an array or image inside a zarr store.
    name
        Name of the output (``deconvolved/<name>``, or in messages).
    shape
        Shape of the image along ``dims``, e.g. ``(Z, Y, X)``.
    voxel_size
        ``(dz, dy, dx)`` in micrometres as the file states it; None where unknown.
    plain
        Whether the stored data reshaped to ``shape`` is the image (singleton axes only).
    dims
        Axes of the image: ``"ZYX"``, ``"YX"``, ``"CYX"`` or ``"CZYX"`` (channels first).
    rgb
        Whether its channels are the colour samples of an RGB image (a stored ``S`` axis,
        e.g. a bright-field photograph) rather than separate fluorescence channels.
    """

    path: Path
    name: str
    shape: tuple[int, ...]
    voxel_size: tuple[float | None, ...]
    plain: bool = True
    dims: str = "ZYX"
    rgb: bool = False

    @property
    def is_tiff(self) -> bool:
        """Whether the image is a TIFF file (else a zarr array or ``.npy``)."""
        return self.path.suffix.lower() in TIFF_SUFFIXES

    @property
    def spatial_voxel_size(self) -> tuple[float | None, ...]:
        """Voxel size (µm) of the spatial axes of ``dims``: ``(dz, dy, dx)`` or ``(dy, dx)``."""
        by_axis = dict(zip("ZYX", self.voxel_size, strict=True))
        return tuple(by_axis[a] for a in self.dims if a != "C")

    def read(self, region: Slices) -> np.ndarray:
        """``image[region]`` as float32, read on whichever process calls it."""
        if self.is_tiff and self.plain:
            stat = self.path.stat()
            image = _tiff_image(str(self.path), stat.st_mtime_ns, self.shape)
            return np.asarray(image[region], dtype=np.float32)
        return read_region(self.path, region)

    def load(self) -> np.ndarray:
        """The whole image as float32."""
        return self.read(tuple(slice(0, n) for n in self.shape))


@functools.lru_cache(maxsize=2)
def _tiff_image(path: str, mtime_ns: int, shape: tuple[int, ...]) -> np.ndarray:
    """A TIFF file as an array of ``shape``, memory-mapped where the file allows it.

    Cached per process (``mtime_ns`` keys out a rewritten file), so a worker reads a
    compressed stack once rather than once per block.
    """
    try:
        data = tifffile.memmap(path, mode="r")
    except ValueError:  # compressed or not contiguous: decode it once
        data = tifffile.imread(path)
    return data.reshape(shape)


def open_source(
    path: Path,
    voxel_size: Sequence[float] | None = None,
    warn: bool = True,
    any_rank: bool = False,
) -> VolumeSource:
    """Describe one input (any image :func:`~hpcdeconv.data.opener.open_image` reads).

    Parameters
    ----------
    path
        TIFF / OME-TIFF, ``.npy``, zarr array, OME-Zarr image or an image of a dataset.
    voxel_size
        ``(dz, dy, dx)`` in µm overriding the file's; an unknown size stays None.
    warn
        Log a warning when a voxel size is unknown.
    any_rank
        Also accept 2D ``(Y, X)`` images and a channel axis (``dims`` tells them apart);
        by default only ``(Z, Y, X)`` volumes.

    Raises
    ------
    InputError
        Missing or unreadable input, or axes that do not reduce to the accepted ones.
    """
    path = Path(path).absolute()
    image = open_image(path, voxel_size=voxel_size, warn=warn, any_rank=any_rank)
    shape = tuple(int(n) for n in image.data.shape)
    # The channel axis of the view is the stored S axis when the file has no C axis.
    rgb = "C" in image.dims and "S" in image.axes and "C" not in image.axes
    return VolumeSource(
        path, image.name, shape, tuple(image.voxel_size), image.plain, image.dims, rgb
    )


def open_sources(
    paths: Sequence[Path], voxel_size: Sequence[float] | None = None, any_rank: bool = False
) -> list[VolumeSource]:
    """:func:`open_source` for each path; two inputs may not share an output name.

    Raises
    ------
    InputError
        As :func:`open_source`, or two inputs of the same name.
    """
    sources = [open_source(p, voxel_size, any_rank=any_rank) for p in paths]
    seen: dict[str, Path] = {}
    for source in sources:
        if source.name in seen:
            raise InputError(
                f"{source.path} and {seen[source.name]} would both be written to "
                f"'{OUTPUT_GROUP}/{source.name}'"
            )
        seen[source.name] = source.path
    return sources


def check_finite(image: np.ndarray, what: str) -> None:
    """Refuse NaN or Inf voxels instead of silently propagating them.

    Raises
    ------
    InputError
        Naming ``what`` and the number of bad voxels.
    """
    bad = int(np.count_nonzero(~np.isfinite(image)))
    if bad:
        raise InputError(f"{what}: {bad} voxel(s) are NaN or Inf")


def check_layout(
    dims: str,
    shape: Sequence[int],
    spatial_dims: int,
    channels: int,
    where: str,
    rgb: bool = False,
) -> str:
    """Whether a generator of ``spatial_dims`` and ``channels`` can run on an image.

    A 2D generator runs on each Z plane of a volume; a 1-channel generator runs on each
    channel of a multichannel (fluorescence) image; a C-channel generator takes C-channel
    images whole. A colour (RGB) image is refused by a 1-channel generator: its samples
    are not independent channels but one colour, which a network trained on grey images
    has never seen.

    Parameters
    ----------
    dims, shape
        Axes and shape of the image (:attr:`VolumeSource.dims`).
    rgb
        Whether the channels are an RGB image's colour samples (:attr:`VolumeSource.rgb`).
    spatial_dims, channels
        The generator's dimensionality (2 or 3) and input channels.
    where
        The input, for messages.

    Returns
    -------
    str
        How the image is taken apart, e.g. ``"per channel, plane by plane"``; ``""`` when
        the generator takes it whole.

    Raises
    ------
    InputError
        A 2D image for a 3D generator, channels that do not match the generator's, or an
        RGB image for a 1-channel generator.
    """
    size = dict(zip(dims, shape, strict=True))
    if rgb and channels == 1:
        raise InputError(
            f"{where}: an RGB image ({size.get('C')} colour samples) but the checkpoint's "
            "generator was trained on 1-channel (grey) images; convert the image to grey or "
            "train on RGB images"
        )
    if spatial_dims == 3 and "Z" not in dims:
        raise InputError(
            f"{where}: a 2D image (axes {dims}); the checkpoint's generator is 3D and needs "
            "(Z, Y, X) volumes"
        )
    if channels > 1 and size.get("C", 1) != channels:
        raise InputError(
            f"{where}: {size.get('C', 1)} channel(s) (axes {dims}, shape {tuple(shape)}) but "
            f"the checkpoint's generator takes {channels}"
        )
    how = []
    if channels == 1 and "C" in dims:
        how.append(f"per channel ({size['C']} channels, 1-channel generator)")
    if spatial_dims == 2 and "Z" in dims:
        how.append(f"plane by plane ({size['Z']} Z planes, 2D generator)")
    return ", ".join(how)
