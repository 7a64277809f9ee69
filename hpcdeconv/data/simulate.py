"""Synthetic training data: phantoms blurred by a PSF with Poisson+Gaussian noise.

Writes the dataset layout of :mod:`hpcdeconv.data.zarr_io`: paired ``sharp/<id>`` and
``blurred/<id>`` images, the ``psf`` used, the split and the generation parameters. A 3D
``shape`` gives (Z, Y, X) volumes and a 3D PSF; a 2D ``shape`` gives (Y, X) images and a
2D PSF.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hpcdeconv.config import SimulateConfig, dump_config
from hpcdeconv.data.zarr_io import BLURRED, PSF_KEY, SHARP, create_dataset, set_split, write_volume
from hpcdeconv.metrics import snr
from hpcdeconv.physics.forward import convolve
from hpcdeconv.physics.noise import add_noise
from hpcdeconv.physics.phantoms import microtubules, texture_2d
from hpcdeconv.physics.psf import make_psf

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulatedVolume:
    """One simulated pair, ``(Z, Y, X)`` or ``(Y, X)``, kept in memory for figures."""

    id: str
    sharp: np.ndarray
    blurred: np.ndarray
    snr_db: float
    #: µm per axis of ``sharp``.
    voxel_size: tuple[float, ...]


def simulate_volume(
    cfg: SimulateConfig, psf: np.ndarray, index: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Draw phantom ``index``, blur it and add noise.

    Each image has its own generator seeded by ``(cfg.seed, index)``, so any single
    image can be regenerated without the others.

    Parameters
    ----------
    cfg
        Validated simulation configuration.
    psf
        Normalised PSF with the axes of ``cfg.shape``.
    index
        Position of the image in the dataset (train, then val, then test).

    Returns
    -------
    sharp, blurred : np.ndarray
        ``cfg.shape`` ((Z, Y, X) or (Y, X)) float32; ``blurred = n(h * x)``.
    snr_db : float
        Measured SNR of the noise component (``inf`` without noise).
    """
    rng = np.random.default_rng([cfg.seed, index])
    ph = cfg.phantom
    if ph.kind == "microtubules":
        sharp = microtubules(
            cfg.shape,
            rng,
            filaments_per_mvoxel=ph.filaments_per_mvoxel,
            radius=ph.radius,
            intensity_range=ph.intensity_range,
            stiffness=ph.stiffness,
        )
    else:
        sharp = texture_2d((cfg.shape[0], cfg.shape[1]), rng, kind=ph.kind)
    clean = convolve(sharp, psf)
    if cfg.noise.snr_db is None:
        return sharp, clean, float("inf")
    noisy = add_noise(clean, cfg.noise.snr_db, rng, poisson_weight=cfg.noise.poisson_weight)
    return sharp, noisy, snr(clean, noisy)


def simulate(
    cfg: SimulateConfig, output: Path, overwrite: bool = False, progress: bool = False
) -> SimulatedVolume:
    """Write a synthetic dataset and return its first test (or last) image pair.

    Parameters
    ----------
    cfg
        Validated simulation configuration.
    output
        Path of the zarr group to create; refused if it exists unless ``overwrite``.
    overwrite
        Replace an existing dataset.
    progress
        Show a progress bar over volumes.
    """
    psf = make_psf(cfg.psf)
    group = create_dataset(output, overwrite=overwrite)
    storage = {"chunks": cfg.storage.chunks, "codec": cfg.storage.codec}
    write_volume(group, PSF_KEY, psf.data, psf.voxel_size, **storage)
    names = {
        split: [f"{split}{i:03d}" for i in range(getattr(cfg.split, split))]
        for split in ("train", "val", "test")
    }
    ordered = [n for split in ("train", "val", "test") for n in names[split]]
    measured: dict[str, float] = {}
    shown: SimulatedVolume | None = None
    for index, name in enumerate(tqdm(ordered, desc="simulate", disable=not progress)):
        sharp, blurred, snr_db = simulate_volume(cfg, psf.data, index)
        write_volume(group, f"{SHARP}/{name}", sharp, psf.voxel_size, **storage)
        write_volume(group, f"{BLURRED}/{name}", blurred, psf.voxel_size, **storage)
        measured[name] = snr_db
        if shown is None or (name.startswith("test") and not shown.id.startswith("test")):
            shown = SimulatedVolume(name, sharp, blurred, snr_db, psf.voxel_size)
    set_split(group, names)
    meta = dict(group.attrs["hpcdeconv"])
    meta["simulation"] = {
        "config": cfg.model_dump(mode="json"),
        "measured_snr_db": measured,
    }
    group.attrs["hpcdeconv"] = meta
    # Beside the store, not inside it: zarr warns about foreign files in a hierarchy.
    dump_config(cfg, output.with_suffix(".config.yaml"))
    log.info("wrote %d %dD image pairs to %s", len(ordered), len(cfg.shape), output)
    assert shown is not None  # SimulateConfig guarantees at least one volume
    return shown
