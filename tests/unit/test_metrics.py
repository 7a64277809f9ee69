"""Metrics against independent references: skimage, numpy.corrcoef, hand-computed cases."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from scipy import ndimage
from scipy.stats import linregress
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from hpcdeconv.errors import InputError
from hpcdeconv.metrics import (
    SSIM_WINDOW,
    delta_snr,
    fitted_win_size,
    pcc,
    psnr,
    r2_score,
    snr,
    ssim,
    ssim_as_seen,
)


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


@pytest.mark.parametrize("shape", [(3, 40, 52), (2, 18, 24, 30)])
def test_ssim_of_channels_matches_skimage(shape, rng) -> None:
    x, ref = _pair(rng, shape)
    x[1] = 0.5 * x[1]  # channels that differ: the mean over channels matters
    expected = structural_similarity(
        x.astype(np.float64),
        ref.astype(np.float64),
        data_range=1.0,
        gaussian_weights=True,
        use_sample_covariance=False,
        channel_axis=0,
    )
    assert ssim(x, ref, data_range=1.0, channel_axis=0) == pytest.approx(expected, abs=1e-4)
    moved = ssim(np.moveaxis(x, 0, -1), np.moveaxis(ref, 0, -1), 1.0, channel_axis=-1)
    assert moved == pytest.approx(expected, abs=1e-4)


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
    assert r2_score(pred, target) == pytest.approx(0.8)
    assert r2_score(target, target) == 1.0
    assert r2_score(np.full(4, target.mean()), target) == pytest.approx(0.0)


def _least_squares_fit(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """True values and their least-squares linear prediction from a noisy regressor."""
    regressor = rng.standard_normal(n)
    true = 1.5 * regressor + 0.7 * rng.standard_normal(n) + 3.0
    slope, intercept = np.polyfit(regressor, true, 1)
    return slope * regressor + intercept, true


def test_r2_score_per_parameter_matches_squared_correlation(rng) -> None:
    """For a least-squares fit with intercept R² = r² (scipy.stats.linregress, corrcoef)."""
    fits = [_least_squares_fit(rng, 200) for _ in range(3)]
    pred = np.stack([p for p, _ in fits], axis=1)
    true = np.stack([t for _, t in fits], axis=1)
    scores = r2_score(pred, true)
    assert scores.shape == (3,)
    for k, (p, t) in enumerate(fits):
        assert scores[k] == pytest.approx(np.corrcoef(p, t)[0, 1] ** 2, rel=1e-10)
        assert scores[k] == pytest.approx(linregress(p, t).rvalue ** 2, rel=1e-10)


def test_r2_score_counts_only_valid_entries(rng) -> None:
    pred_a, true_a = _least_squares_fit(rng, 150)
    pred_b, true_b = _least_squares_fit(rng, 150)
    valid = np.ones((150, 2), bool)
    valid[100:, 1] = False
    # Invalid entries hold garbage that would ruin the score if they counted.
    true = np.stack([true_a, np.where(valid[:, 1], true_b, 1e6)], axis=1)
    pred = np.stack([pred_a, pred_b], axis=1)
    scores = r2_score(pred, true, valid)
    assert scores[0] == pytest.approx(np.corrcoef(pred_a, true_a)[0, 1] ** 2, rel=1e-10)
    # On the valid subset the prediction is no longer the subset's own least-squares fit:
    # the eq. 15 sums over those 100 entries, written out.
    t, p = true_b[:100], pred_b[:100]
    assert scores[1] == pytest.approx(1 - np.sum((t - p) ** 2) / (100 * np.var(t)), rel=1e-12)
    assert np.isnan(r2_score(pred, true, np.zeros((150, 2), bool))).all()
    assert np.isnan(r2_score(np.zeros((4, 1)), np.ones((4, 1))))[0]
    with pytest.raises(InputError, match="valid mask"):
        r2_score(pred, true, valid[:, :1])


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


def skimage_ssim(a: np.ndarray, b: np.ndarray, win_size: int | None = None) -> float:
    """skimage's Gaussian SSIM of one image pair with range 1."""
    return structural_similarity(
        a, b, data_range=1.0, gaussian_weights=True, use_sample_covariance=False,
        win_size=win_size,
    )  # fmt: skip


def test_ssim_as_seen_scores_each_plane_of_a_stack_for_a_2d_network() -> None:
    rng = np.random.default_rng(5)
    ref = rng.random((5, 40, 40))
    x = ref + 0.1 * rng.standard_normal(ref.shape)
    score, window = ssim_as_seen(x, ref, 1.0, spatial_dims=2)
    assert window == SSIM_WINDOW
    expected = np.mean([skimage_ssim(a, b) for a, b in zip(x, ref, strict=True)])
    assert score == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(("planes", "window"), [(5, 5), (6, 5), (2, 1), (30, 11)])
def test_ssim_as_seen_fits_the_window_to_a_thin_volume(planes: int, window: int) -> None:
    rng = np.random.default_rng(6)
    ref = rng.random((2, planes, 32, 32))  # (C, Z, Y, X): channels scored apart
    x = ref + 0.1 * rng.standard_normal(ref.shape)
    assert fitted_win_size(ref.shape[1:]) == window
    score, used = ssim_as_seen(x, ref, 1.0, spatial_dims=3)
    assert used == window
    expected = np.mean([skimage_ssim(a, b, window) for a, b in zip(x, ref, strict=True)])
    assert score == pytest.approx(expected, abs=1e-4)
