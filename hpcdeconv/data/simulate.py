"""Synthetic training data: microtubule phantoms blurred by a PSF with Poisson+Gaussian noise.

Writes the dataset layout of :mod:`hpcdeconv.data.zarr_io`: paired ``sharp/<id>`` and
``blurred/<id>`` volumes, the ``psf`` used, the split and the generation parameters.
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
from hpcdeconv.physics.phantoms import microtubules
from hpcdeconv.physics.psf import make_psf

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulatedVolume:
    """One simulated pair, kept in memory for figures and summaries."""

    id: str
    sharp: np.ndarray
    blurred: np.ndarray
    snr_db: float


def simulate_volume(
    cfg: SimulateConfig, psf: np.ndarray, index: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Draw phantom ``index``, blur it and add noise.

    Each volume has its own generator seeded by ``(cfg.seed, index)``, so any single
    volume can be regenerated without the others.

    Returns
    -------
    sharp, blurred : np.ndarray
        ``(Z, Y, X)`` float32; ``blurred = n(h * x)``.
    snr_db : float
        Measured SNR of the noise component (``inf`` without noise).
    """
    rng = np.random.default_rng([cfg.seed, index])
    ph = cfg.phantom
    sharp = microtubules(
        cfg.shape,
        rng,
        filaments_per_mvoxel=ph.filaments_per_mvoxel,
        radius=ph.radius,
        intensity_range=ph.intensity_range,
        stiffness=ph.stiffness,
    )
    clean = convolve(sharp, psf)
    if cfg.noise.snr_db is None:
        return sharp, clean, float("inf")
    noisy = add_noise(clean, cfg.noise.snr_db, rng, poisson_weight=cfg.noise.poisson_weight)
    return sharp, noisy, snr(clean, noisy)


def simulate(
    cfg: SimulateConfig, output: Path, overwrite: bool = False, progress: bool = False
) -> SimulatedVolume:
    """Write a synthetic dataset and return its first test (or last) volume pair.

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
            shown = SimulatedVolume(name, sharp, blurred, snr_db)
    set_split(group, names)
    meta = dict(group.attrs["hpcdeconv"])
    meta["simulation"] = {
        "config": cfg.model_dump(mode="json"),
        "measured_snr_db": measured,
    }
    group.attrs["hpcdeconv"] = meta
    # Beside the store, not inside it: zarr warns about foreign files in a hierarchy.
    dump_config(cfg, output.with_suffix(".config.yaml"))
    log.info("wrote %d volume pairs to %s", len(ordered), output)
    assert shown is not None  # SimulateConfig guarantees at least one volume
    return shown
