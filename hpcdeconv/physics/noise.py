"""Seeded camera noise: a Poisson + Gaussian mixture at a target SNR, and the photon model.

The SNR of a noisy image ``y`` of a noise-free image ``b`` is, as in the seed paper,

    SNR = 10 log10( sum(b^2) / sum((y - b)^2) )    [dB].

:func:`add_noise` draws ``y = Poisson(lam * b) / lam + N(0, sigma^2)`` with the photon
scale ``lam`` and read-noise ``sigma`` solved in closed form from the expected noise powers
``E sum((Poisson(lam b)/lam - b)^2) = sum(b) / lam`` and ``E sum(N^2) = N_vox sigma^2``,
so the Poisson part carries a chosen share of the noise power and the total hits the SNR.
"""

from __future__ import annotations

import numpy as np

from hpcdeconv.errors import ConfigError, InputError

__all__ = ["add_noise", "photon_noise"]


def _noise_power(blurred: np.ndarray, snr_db: float) -> float:
    """Total noise power ``sum((y - b)^2)`` that gives ``snr_db`` on ``blurred``."""
    signal_power = float(np.sum(np.square(blurred, dtype=np.float64)))
    if signal_power == 0.0:
        raise InputError("cannot add noise at a target SNR to an all-zero image")
    return signal_power / 10.0 ** (snr_db / 10.0)


def add_noise(
    blurred: np.ndarray,
    snr_db: float,
    rng: np.random.Generator,
    poisson_weight: float = 0.5,
) -> np.ndarray:
    """Add Poisson + Gaussian noise to a blurred image at an average SNR.

    Parameters
    ----------
    blurred
        Noise-free image, any shape ``(*spatial)``, non-negative up to FFT round-off
        (negative values count as zero photons).
    snr_db
        Requested SNR in dB, measured on ``noisy - blurred``.
    rng
        Source of randomness; the same generator state gives the same output.
    poisson_weight
        Share of the noise power carried by shot noise, in ``[0, 1]``; the rest is Gaussian
        read noise. 0 gives pure Gaussian noise and 1 pure Poisson noise.

    Returns
    -------
    numpy.ndarray
        Noisy image, shape of ``blurred``, float32, in the units of ``blurred``.
    """
    if not 0.0 <= poisson_weight <= 1.0:
        raise ConfigError(f"poisson_weight must lie in [0, 1], got {poisson_weight}")
    b = np.asarray(blurred, dtype=np.float64)
    noise_power = _noise_power(b, snr_db)
    noisy = b.copy()
    if poisson_weight > 0.0:
        rate = np.clip(b, 0.0, None)
        total = float(rate.sum())
        if total == 0.0:
            raise InputError("Poisson noise needs a positive image; all values are <= 0")
        photons_per_unit = total / (poisson_weight * noise_power)
        noisy = rng.poisson(rate * photons_per_unit) / photons_per_unit
        # Negative round-off voxels had rate 0; keep their value so only noise is added.
        noisy += b - rate
    if poisson_weight < 1.0:
        sigma = np.sqrt((1.0 - poisson_weight) * noise_power / b.size)
        noisy += rng.normal(0.0, sigma, size=b.shape)
    return noisy.astype(np.float32)


def photon_noise(
    psi: np.ndarray, beta: float, sigma: float, rng: np.random.Generator
) -> np.ndarray:
    """Camera model of the PSF-regression paper: ``beta * Poisson(psi) + N(0, sigma^2)``.

    Parameters
    ----------
    psi
        Expected photon counts per pixel, any shape, non-negative.
    beta
        Camera gain (output units per photon).
    sigma
        Standard deviation of the additive Gaussian read noise, in output units.
    rng
        Source of randomness.

    Returns
    -------
    numpy.ndarray
        Noisy image, shape of ``psi``, float32, with mean ``beta * psi`` and variance
        ``beta^2 psi + sigma^2``.
    """
    psi = np.asarray(psi, dtype=np.float64)
    if np.any(psi < 0):
        raise InputError("photon counts psi must be non-negative")
    if sigma < 0:
        raise ConfigError(f"read-noise sigma must be non-negative, got {sigma}")
    counts = rng.poisson(psi)
    return (beta * counts + rng.normal(0.0, sigma, size=psi.shape)).astype(np.float32)
