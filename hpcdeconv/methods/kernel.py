"""The linear blur path ``h`` of the proposed cycleGANs: construction and export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from hpcdeconv.config import KernelConfig
from hpcdeconv.errors import InputError
from hpcdeconv.models.psf_layer import PSFLayer


def read_kernel_file(path: Path) -> np.ndarray:
    """Read a PSF from ``.npy`` or ``.tif``/``.tiff`` as a float32 (Z, Y, X) array."""
    if not path.is_file():
        raise InputError(f"PSF file not found: {path}")
    try:
        data = np.load(path) if path.suffix == ".npy" else tifffile.imread(path)
    except Exception as exc:
        raise InputError(f"cannot read PSF file {path}: {exc}") from None
    data = np.squeeze(np.asarray(data, dtype=np.float32))
    if data.ndim != 3:
        raise InputError(f"PSF file {path} has shape {data.shape}; a 3D (Z, Y, X) PSF is needed")
    return data


def build_psf_layer(cfg: KernelConfig, dataset_psf: np.ndarray | None, learnable: bool) -> PSFLayer:
    """The blur layer initialised as configured.

    ``init: dataset`` takes the PSF stored with the training data; ``file`` reads
    ``cfg.file``; ``delta`` and ``gaussian`` start blind.
    """
    layer = PSFLayer(
        kernel_size=cfg.size,
        init="gaussian" if cfg.init == "gaussian" else "delta",
        sigma=cfg.sigma,
        constraint=cfg.constraint,
        learnable=learnable,
    )
    if cfg.init == "file":
        assert cfg.file is not None
        layer.load_kernel(read_kernel_file(cfg.file))
    elif cfg.init == "dataset":
        if dataset_psf is None:
            raise InputError(
                "kernel.init is 'dataset' but the dataset has no 'psf' array; "
                "give kernel.init=file and kernel.file"
            )
        layer.load_kernel(np.asarray(dataset_psf, dtype=np.float32))
    return layer


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Zero-mean normalised cross-correlation of two equally shaped arrays."""
    a = a.astype(np.float64) - a.mean()
    b = b.astype(np.float64) - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def centre_crop(volume: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Crop (or zero-pad) ``volume`` around index n//2 to ``shape``."""
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
    """Write the learned kernel raw and σ=1 smoothed (``.tif``, ``.npy``, orthoview PNG).

    Returns file names and, when the true PSF is known, the NCC of both versions to it.
    """
    from hpcdeconv.inference.volume_io import write_tiff
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
        result["ncc_raw"] = ncc(raw, truth)
        result["ncc_smoothed"] = ncc(smooth, truth)
    save_orthoviews(out_dir / "psf_learned.png", panels, voxel_size)
    return result
