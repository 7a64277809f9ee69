"""Noise models: SNR targeting, reproducibility, and the photon model's moments."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from hpcdeconv.errors import ConfigError, InputError
from hpcdeconv.physics.noise import add_noise, photon_noise
from hpcdeconv.physics.phantoms import microtubules


def measured_snr(clean: np.ndarray, noisy: np.ndarray) -> float:
    clean = clean.astype(np.float64)
    residual = noisy.astype(np.float64) - clean
    return float(10.0 * np.log10(np.sum(clean**2) / np.sum(residual**2)))


@pytest.fixture(scope="module")
def blurred_tubes() -> np.ndarray:
    volume = microtubules((24, 48, 48), np.random.default_rng(0))
    return ndimage.gaussian_filter(volume, (2.0, 1.0, 1.0)).astype(np.float32)


@pytest.fixture(scope="module")
def smooth_volume() -> np.ndarray:
    noise = np.random.default_rng(1).random((24, 48, 48))
    return ndimage.gaussian_filter(noise, 3.0).astype(np.float32)


@pytest.mark.parametrize("snr_db", [10.0, 20.0, 30.0])
@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("image", ["blurred_tubes", "smooth_volume"])
def test_measured_snr_hits_request(image, weight, snr_db, request) -> None:
    clean = request.getfixturevalue(image)
    noisy = add_noise(clean, snr_db, np.random.default_rng(2), poisson_weight=weight)
    assert noisy.dtype == np.float32
    assert noisy.shape == clean.shape
    assert measured_snr(clean, noisy) == pytest.approx(snr_db, abs=0.5)


def test_same_seed_same_noise(blurred_tubes) -> None:
    a = add_noise(blurred_tubes, 15.0, np.random.default_rng(9))
    b = add_noise(blurred_tubes, 15.0, np.random.default_rng(9))
    c = add_noise(blurred_tubes, 15.0, np.random.default_rng(10))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_pure_poisson_noise_vanishes_where_signal_is_zero() -> None:
    clean = np.zeros((64, 64), dtype=np.float32)
    clean[16:48, 16:48] = 1.0
    noisy = add_noise(clean, 20.0, np.random.default_rng(3), poisson_weight=1.0)
    assert np.all(noisy[clean == 0] == 0)
    # Shot noise is quantised: every bright value is a whole number of one photon's worth.
    quantum = np.diff(np.unique(noisy[clean > 0])).min()
    counts = noisy[clean > 0] / quantum
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-2)


def test_pure_gaussian_noise_is_signal_independent() -> None:
    clean = np.zeros((128, 128), dtype=np.float32)
    clean[:, 64:] = 1.0
    noisy = add_noise(clean, 10.0, np.random.default_rng(4), poisson_weight=0.0)
    residual = noisy.astype(np.float64) - clean
    dark, bright = residual[:, :64], residual[:, 64:]
    assert dark.std() == pytest.approx(bright.std(), rel=0.05)
    assert abs(residual.mean()) < 3 * residual.std() / np.sqrt(residual.size)


def test_poisson_share_of_noise_power() -> None:
    clean = np.zeros((128, 128), dtype=np.float32)
    clean[:, 64:] = 1.0
    noisy = add_noise(clean, 10.0, np.random.default_rng(5), poisson_weight=0.25)
    residual = noisy.astype(np.float64) - clean
    # Dark half has only Gaussian noise; the bright half adds the Poisson part.
    gaussian_power = np.mean(residual[:, :64] ** 2) * clean.size
    total_power = np.sum(residual**2)
    assert 1.0 - gaussian_power / total_power == pytest.approx(0.25, abs=0.03)


def test_add_noise_rejects_bad_input(rng) -> None:
    with pytest.raises(ConfigError):
        add_noise(np.ones((4, 4)), 10.0, rng, poisson_weight=1.5)
    with pytest.raises(InputError):
        add_noise(np.zeros((4, 4)), 10.0, rng)


def test_photon_noise_moments() -> None:
    psi = np.full(200_000, 12.0)
    beta, sigma = 2.5, 1.5
    noisy = photon_noise(psi, beta, sigma, np.random.default_rng(6)).astype(np.float64)
    assert noisy.dtype == np.float64
    assert noisy.mean() == pytest.approx(beta * 12.0, rel=0.01)
    assert noisy.var() == pytest.approx(beta**2 * 12.0 + sigma**2, rel=0.02)


def test_photon_noise_mean_follows_psi_per_pixel() -> None:
    psi = np.broadcast_to(np.array([0.0, 1.0, 50.0]), (40_000, 3))
    noisy = photon_noise(psi, 0.5, 0.0, np.random.default_rng(7))
    assert noisy.dtype == np.float32
    np.testing.assert_allclose(noisy.mean(axis=0), 0.5 * np.array([0.0, 1.0, 50.0]), atol=0.05)
    np.testing.assert_allclose(noisy.var(axis=0), 0.25 * np.array([0.0, 1.0, 50.0]), rtol=0.05)


def test_photon_noise_rejects_negative_counts(rng) -> None:
    with pytest.raises(InputError):
        photon_noise(np.array([-1.0]), 1.0, 0.0, rng)
