"""Reading measured PSFs from files and writing learned ones.

One reader serves every command and method that takes a PSF file (``rl --psf``,
``kernel.file`` of the cycleGANs): it opens the file like every image
(:func:`hpcdeconv.data.opener.open_image`: TIFF, OME-TIFF, ``.npy``, zarr), so axes are
checked and voxel sizes converted to micrometres the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hpcdeconv.data.opener import load, open_image
from hpcdeconv.errors import InputError
from hpcdeconv.metrics import pcc

if TYPE_CHECKING:
    from hpcdeconv.models.psf_layer import PSFLayer


def read_psf(
    path: Path,
    voxel_size: Sequence[float] | None = None,
    *,
    source: str = "PSF file",
) -> tuple[np.ndarray, tuple[float | None, ...]]:
    """A measured PSF as float32 ``(Z, Y, X)`` and its voxel size.

    The file's axes must reduce to Z, Y, X once singleton axes are dropped (a ``.npy``
    array of three axes is read as ``(Z, Y, X)``); its length units are converted to µm.
    The PSF centre is expected at index ``n // 2`` along every axis; the data are not
    normalised.

    Parameters
    ----------
    path
        TIFF / OME-TIFF (``.tif``, ``.tiff``), ``.npy`` or zarr array / OME-Zarr image.
    voxel_size
        ``(dz, dy, dx)`` in µm replacing what the file says (e.g. ``--psf-voxel-size``).
    source
        Where the path was given (``"--psf"``, ``"kernel.file"``), starting every message.

    Returns
    -------
    data, voxel_size
        ``(Z, Y, X)`` float32 array and ``(dz, dy, dx)`` in µm, None where unknown.

    Raises
    ------
    InputError
        Missing or unreadable file, non-spatial axes, not three spatial axes, or an
        unsupported length unit: one line naming ``source`` and the file.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{source} {path}: no such PSF file")
    try:
        image = open_image(path, voxel_size=voxel_size, warn=False, kind="PSF")
        data = load(image)
    except InputError as exc:
        raise InputError(f"{source} {exc}") from None
    return data, image.voxel_size


def centre_crop(volume: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Crop (or zero-pad) ``volume`` around index ``n // 2`` to ``shape``, per axis."""
    out = np.zeros(shape, dtype=volume.dtype)
    src, dst = [], []
    for n, m in zip(volume.shape, shape, strict=True):
        k = min(n, m)
        s0, d0 = n // 2 - k // 2, m // 2 - k // 2
        src.append(slice(s0, s0 + k))
        dst.append(slice(d0, d0 + k))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def export_kernel(
    layer: PSFLayer,
    out_dir: Path,
    voxel_size: tuple[float, ...],
    true_psf: np.ndarray | None,
) -> dict[str, float | str]:
    """Write a learned PSF raw and σ=1 smoothed (``.tif``, ``.npy``, orthoview PNG).

    Parameters
    ----------
    layer
        The blur layer whose kernel ``(Z, Y, X)`` is written.
    out_dir
        Directory to write into (created).
    voxel_size
        ``(dz, dy, dx)`` in µm, stored in the TIFFs and used for the figure.
    true_psf
        The PSF the data were made with, when known; centre-cropped to the kernel's size.

    Returns
    -------
    dict
        File names and, when the true PSF is known, the Pearson correlation
        (:func:`hpcdeconv.metrics.pcc`, zero-mean NCC) of both versions to it.
    """
    # Figures and TIFF writing pull in matplotlib and the inference I/O: only on export.
    from hpcdeconv.inference.output import write_tiff
    from hpcdeconv.viz import save_orthoviews

    out_dir.mkdir(parents=True, exist_ok=True)
    raw, smooth = layer.export(smooth_sigma=1.0)
    result: dict[str, float | str] = {}
    for tag, kernel in (("raw", raw), ("smoothed", smooth)):
        np.save(out_dir / f"psf_learned_{tag}.npy", kernel)
        # Calibrated like every TIFF we write: Fiji opens the kernel at its voxel size.
        write_tiff(out_dir / f"psf_learned_{tag}.tif", kernel, tuple(voxel_size))
        result[f"psf_{tag}"] = f"psf_learned_{tag}.tif"
    panels = [("learned (σ=1 smoothed)", smooth), ("learned (raw)", raw)]
    if true_psf is not None:
        truth = centre_crop(np.asarray(true_psf, dtype=np.float32), smooth.shape)
        truth = truth / max(float(truth.sum()), 1e-12)
        panels.append(("true PSF", truth))
        result["ncc_raw"] = pcc(raw, truth)
        result["ncc_smoothed"] = pcc(smooth, truth)
    save_orthoviews(out_dir / "psf_learned.png", panels, voxel_size)
    return result
