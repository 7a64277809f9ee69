"""Metrics against independent references: skimage, numpy.corrcoef, hand-computed cases."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from hpcdeconv.errors import InputError
from hpcdeconv.metrics import delta_snr, pcc, psnr, r2, snr, ssim


def _pair(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    clean = ndimage.gaussian_filter(rng.random(shape), 2.0)
    noisy = clean + 0.05 * rng.standard_normal(shape)
    return noisy.astype(np.float32), clean.astype(np.float32)


@pytest.mark.parametrize("shape", [(40, 52), (18, 24, 30)])
def test_psnr_matches_skimage(shape, rng) -> None:
    x, ref = _pair(rng, shape)
    expected = peak_signal_noise_ratio(ref, x, data_range=1.0)
    assert psnr(x, ref, data_range=1.0) == pytest.approx(expected, rel=1e-6)


def test_psnr_of_identical_images_is_infinite(rng) -> None:
    x = rng.random((8, 8))
    assert psnr(x, x, data_range=1.0) == float("inf")


@pytest.mark.parametrize("shape", [(40, 52), (18, 24, 30)])
@pytest.mark.parametrize("sigma", [1.5, 1.0])
def test_ssim_matches_skimage(shape, sigma, rng) -> None:
    x, ref = _pair(rng, shape)
    expected = structural_similarity(
        x.astype(np.float64),
        ref.astype(np.float64),
        data_range=1.0,
        gaussian_weights=True,
        sigma=sigma,
        use_sample_covariance=False,
    )
    assert ssim(x, ref, data_range=1.0, sigma=sigma) == pytest.approx(expected, abs=1e-4)


def test_ssim_matches_skimage_with_explicit_window(rng) -> None:
    x, ref = _pair(rng, (20, 33, 27))
    expected = structural_similarity(
        x, ref, data_range=2.0, gaussian_weights=True, use_sample_covariance=False, win_size=7
    )
    assert ssim(x, ref, data_range=2.0, win_size=7) == pytest.approx(expected, abs=1e-4)


def test_ssim_of_identical_images_is_one(rng) -> None:
    x = rng.random((16, 20, 20))
    assert ssim(x, x, data_range=1.0) == pytest.approx(1.0, abs=1e-12)


def test_ssim_rejects_windows_larger_than_image(rng) -> None:
    with pytest.raises(InputError):
        ssim(rng.random((8, 40)), rng.random((8, 40)), data_range=1.0)
    with pytest.raises(InputError):
        ssim(rng.random((20, 20)), rng.random((20, 20)), data_range=1.0, win_size=6)


def test_pcc_matches_numpy_corrcoef(rng) -> None:
    x, y = _pair(rng, (12, 16, 16))
    assert pcc(x, y) == pytest.approx(np.corrcoef(x.ravel(), y.ravel())[0, 1], rel=1e-10)
    assert pcc(x, -2.0 * x + 3.0) == pytest.approx(-1.0)
    assert np.isnan(pcc(np.ones(5), np.arange(5.0)))


def test_r2_known_case() -> None:
    target = np.array([1.0, 2.0, 3.0, 4.0])
    pred = np.array([1.0, 2.0, 3.0, 5.0])
    # SS_res = 1, SS_tot = 5.
    assert r2(pred, target) == pytest.approx(0.8)
    assert r2(target, target) == 1.0
    assert r2(np.full(4, target.mean()), target) == pytest.approx(0.0)


def test_snr_known_case() -> None:
    clean = np.array([3.0, 4.0])
    noisy = np.array([3.5, 4.0])
    # 25 / 0.25 = 100 -> 20 dB.
    assert snr(clean, noisy) == pytest.approx(20.0)
    assert snr(clean, clean) == float("inf")


def test_delta_snr_is_the_gain(rng) -> None:
    clean = rng.random((32, 32))
    noisy = clean + 0.1 * rng.standard_normal((32, 32))
    restored = clean + 0.01 * rng.standard_normal((32, 32))
    gain = delta_snr(clean, noisy, restored)
    assert gain == pytest.approx(snr(clean, restored) - snr(clean, noisy))
    assert gain == pytest.approx(20.0, abs=0.5)


def test_accepts_dask_arrays(rng) -> None:
    x, ref = _pair(rng, (16, 24, 24))
    lazy_x, lazy_ref = da.from_array(x, chunks=8), da.from_array(ref, chunks=8)
    assert psnr(lazy_x, lazy_ref, 1.0) == psnr(x, ref, 1.0)
    assert ssim(lazy_x, lazy_ref, 1.0) == ssim(x, ref, 1.0)


def test_shape_mismatch_raises(rng) -> None:
    with pytest.raises(InputError):
        snr(rng.random((4, 4)), rng.random((4, 5)))
