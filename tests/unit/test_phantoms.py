"""Synthetic phantoms: ranges, determinism, density and tube width."""

from __future__ import annotations

import numpy as np
import pytest

from hpcdeconv.errors import ConfigError
from hpcdeconv.physics.phantoms import microtubules, texture_2d


def test_microtubules_range_dtype_shape(rng) -> None:
    volume = microtubules((16, 32, 40), rng)
    assert volume.shape == (16, 32, 40)
    assert volume.dtype == np.float32
    assert volume.min() >= 0.0
    assert volume.max() <= 1.0
    assert volume.max() > 0.3


def test_microtubules_same_seed_same_volume() -> None:
    a = microtubules((16, 24, 24), np.random.default_rng(7))
    b = microtubules((16, 24, 24), np.random.default_rng(7))
    c = microtubules((16, 24, 24), np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_filament_density_scales_with_parameter() -> None:
    shape = (32, 96, 96)
    sparse = microtubules(shape, np.random.default_rng(1), filaments_per_mvoxel=30.0)
    dense = microtubules(shape, np.random.default_rng(1), filaments_per_mvoxel=120.0)
    ratio = dense.sum() / sparse.sum()
    # Four times as many filaments; lengths vary and crossings saturate, so allow slack.
    assert 2.5 < ratio < 6.0


def _perpendicular_sigma(volume: np.ndarray) -> float:
    """Cross-section std of a single straight tube from the intensity-weighted covariance."""
    coords = np.indices(volume.shape).reshape(3, -1).astype(np.float64)
    weights = volume.reshape(-1).astype(np.float64)
    mean = coords @ weights / weights.sum()
    centred = coords - mean[:, None]
    covariance = (centred * weights) @ centred.T / weights.sum()
    smallest_two = np.linalg.eigvalsh(covariance)[:2]
    return float(np.sqrt(smallest_two.mean()))


@pytest.mark.parametrize("radius", [1.0, 2.0])
def test_tube_cross_section_matches_radius(radius) -> None:
    estimates = [
        _perpendicular_sigma(
            microtubules(
                (48, 48, 48),
                np.random.default_rng(seed),
                filaments_per_mvoxel=0.0,
                radius=radius,
                stiffness=1.0,
            )
        )
        for seed in range(5)
    ]
    assert np.median(estimates) == pytest.approx(radius, rel=0.1)


def test_isolated_tube_peaks_near_its_intensity() -> None:
    peaks = [
        microtubules(
            (40, 40, 40),
            np.random.default_rng(seed),
            filaments_per_mvoxel=0.0,
            intensity_range=(0.5, 0.5),
        ).max()
        for seed in range(4)
    ]
    assert np.median(peaks) == pytest.approx(0.5, rel=0.15)


def test_foreground_grows_with_radius() -> None:
    thin = microtubules((24, 64, 64), np.random.default_rng(3), radius=1.0)
    thick = microtubules((24, 64, 64), np.random.default_rng(3), radius=2.0)
    assert (thick > 0.1).mean() > 1.5 * (thin > 0.1).mean()


def test_microtubules_reject_bad_arguments(rng) -> None:
    with pytest.raises(ConfigError):
        microtubules((8, 8, 8), rng, stiffness=1.5)
    with pytest.raises(ConfigError):
        microtubules((8, 8, 8), rng, intensity_range=(0.8, 0.2))
    with pytest.raises(ConfigError):
        microtubules((8,), rng)
    with pytest.raises(ConfigError):
        microtubules((4, 8, 8, 8), rng)


def test_microtubules_2d_range_dtype_determinism() -> None:
    a = microtubules((64, 80), np.random.default_rng(7), filaments_per_mvoxel=2000.0)
    b = microtubules((64, 80), np.random.default_rng(7), filaments_per_mvoxel=2000.0)
    assert a.shape == (64, 80) and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert 0.02 < (a > 0.1).mean() < 0.8  # filaments, not an empty or saturated field
    np.testing.assert_array_equal(a, b)


def _line_profile_sigma(image: np.ndarray) -> float:
    """Standard deviation perpendicular to the single straight line in a 2D image."""
    weights = image.ravel().astype(np.float64)
    coords = np.indices(image.shape).reshape(2, -1).astype(np.float64)
    mean = (coords * weights).sum(axis=1) / weights.sum()
    centred = coords - mean[:, None]
    covariance = (centred * weights) @ centred.T / weights.sum()
    return float(np.sqrt(np.linalg.eigvalsh(covariance)[0]))


@pytest.mark.parametrize("radius", [1.0, 2.0])
def test_2d_filament_width_and_peak_match_settings(radius) -> None:
    # One straight filament (stiffness 1) across the image: its cross-section is a 1D
    # Gaussian of std `radius` peaking at the filament's intensity.
    images = [
        microtubules(
            (64, 64),
            np.random.default_rng(seed),
            filaments_per_mvoxel=0.0,
            radius=radius,
            intensity_range=(0.5, 0.5),
            stiffness=1.0,
        )
        for seed in range(5)
    ]
    assert np.median([_line_profile_sigma(im) for im in images]) == pytest.approx(radius, rel=0.1)
    assert np.median([im.max() for im in images]) == pytest.approx(0.5, rel=0.1)


@pytest.mark.parametrize("kind", ["cells", "points"])
def test_texture_range_dtype_determinism(kind) -> None:
    a = texture_2d((64, 80), np.random.default_rng(5), kind=kind)
    b = texture_2d((64, 80), np.random.default_rng(5), kind=kind)
    assert a.shape == (64, 80)
    assert a.dtype == np.float32
    assert a.min() >= 0.0
    assert 0.0 < a.max() <= 1.0
    np.testing.assert_array_equal(a, b)


def test_texture_kinds_differ_in_sparsity(rng) -> None:
    cells = texture_2d((128, 128), rng, kind="cells")
    points = texture_2d((128, 128), rng, kind="points")
    assert (cells > 0.05).mean() > 0.1
    assert (points > 0.05).mean() < 0.02
    assert np.count_nonzero(points) > 0


def test_cells_have_internal_texture(rng) -> None:
    cells = texture_2d((128, 128), rng, kind="cells")
    inside = cells[cells > 0.5 * cells.max()]
    # Flat-filled ellipses would give a near-constant interior.
    assert inside.std() / inside.mean() > 0.05


def test_unknown_texture_kind_raises(rng) -> None:
    with pytest.raises(ConfigError):
        texture_2d((32, 32), rng, kind="stripes")  # type: ignore[arg-type]
