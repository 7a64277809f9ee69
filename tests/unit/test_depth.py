"""Depth from astigmatism (eq. 14) and its tilt calibration, on synthetic astigmatic PSFs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hpcdeconv.config.psfnet import PSFOptics
from hpcdeconv.errors import InputError
from hpcdeconv.physics.zernike import astigmatism_coefficients, zernike_psf
from hpcdeconv.psfnet.depth import (
    DepthCalibration,
    depth_index,
    fit_calibration,
    read_calibration,
    tilt_depth,
)
from hpcdeconv.psfnet.psf_map import PSFMap, window_starts
from hpcdeconv.psfnet.psf_models import PSFModel

OPTICS = PSFOptics(psf_size=63)
MODEL = PSFModel("zernike3", OPTICS)
CYLINDER = 0.3  # waves of astigmatism, axis pi/4 (the optics')


def zmap(params: np.ndarray, image: tuple[int, int] = (256, 256), estimated=None) -> PSFMap:  # type: ignore[no-untyped-def]
    """A zernike3 map of ``(3, Gy, Gx)`` parameters on a window-64 / stride-64 grid."""
    gy, gx = len(window_starts(image[0], 64, 64)), len(window_starts(image[1], 64, 64))
    assert params.shape == (3, gy, gx)
    return PSFMap(
        MODEL,
        params.astype(np.float32),
        np.zeros((gy, gx), np.float32),
        np.ones((gy, gx), bool) if estimated is None else estimated,
        64,
        64,
        image,
        (OPTICS.pixel_size, OPTICS.pixel_size),
    )


def reference_psf(focus_waves: float, axis: float = math.pi / 4) -> np.ndarray:
    """numpy PSF (hpcdeconv.physics.zernike) with Noll-4 defocus and astigmatism."""
    coefficients = {4: focus_waves, **astigmatism_coefficients(CYLINDER, math.degrees(axis))}
    k = OPTICS.psf_size
    return zernike_psf(
        (k, k), OPTICS.pixel_size, OPTICS.na, OPTICS.n_immersion, OPTICS.wavelength, coefficients
    )


def best_fit(psf: np.ndarray) -> tuple[float, float]:
    """``(focus, axis)`` of the model's PSF (focus >= 0) closest to ``psf`` (least squares)."""
    focus = np.round(np.arange(0.0, 1.01, 0.05), 2)
    axes = np.array([0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4])
    grid = np.array([(f, CYLINDER, a) for f in focus for a in axes], np.float32)
    rendered = MODEL.render(torch.from_numpy(grid)).numpy()
    err = ((rendered - psf[None]) ** 2).sum(axis=(1, 2))
    best = grid[int(np.argmin(err))]
    return float(best[0]), float(best[2])


def test_eq14_by_hand() -> None:
    params = np.zeros((3, 4, 4))
    params[0] = 0.4
    params[2] = [[math.pi / 4] * 4, [3 * math.pi / 4] * 4, [math.pi / 2] * 4, [0.0] * 4]
    z = depth_index(zmap(params))
    np.testing.assert_allclose(z[:, 0], [-0.2, 0.2, 0.0, -0.4], atol=1e-6)


@pytest.mark.parametrize("d", [0.3, 0.6])
def test_eq14_recovers_sign_and_magnitude_of_defocus(d: float) -> None:
    # Defocus +d along pi/4 is read as (focus d, axis pi/4); -d as (focus d, axis 3 pi/4).
    plus, minus = best_fit(reference_psf(+d)), best_fit(reference_psf(-d))
    assert plus == pytest.approx((d, math.pi / 4), abs=1e-6)
    assert minus == pytest.approx((d, 3 * math.pi / 4), abs=1e-6)
    # The model's equivalence itself: -d along phi == +d along phi + pi/2.
    same = MODEL.render(torch.tensor([[d, CYLINDER, 3 * math.pi / 4]])).numpy()[0]
    np.testing.assert_allclose(same, reference_psf(-d), atol=1e-6 * float(same.max()) * 100)
    # Eq. 14 gives -d/2 and +d/2; a calibration of two known depths maps them back to +-d.
    params = np.zeros((3, 4, 4))
    params[0], params[1] = d, CYLINDER
    params[2, :2], params[2, 2:] = plus[1], minus[1]
    m = zmap(params)
    z = depth_index(m)
    np.testing.assert_allclose(z[:2], -d / 2, atol=1e-6)
    np.testing.assert_allclose(z[2:], +d / 2, atol=1e-6)
    # Two flat calibration images, one at +d um and one at -d um, fix alpha = -2, beta = 0.
    above, below = params.copy(), params.copy()
    above[2], below[2] = plus[1], minus[1]
    cal = fit_calibration([zmap(above), zmap(below)], [(d, 0.0, 0.0), (-d, 0.0, 0.0)])
    assert (cal.alpha, cal.beta) == pytest.approx((-2.0, 0.0), abs=1e-5)
    np.testing.assert_allclose(cal.apply(z)[:2], +d, atol=1e-5)
    np.testing.assert_allclose(cal.apply(z)[2:], -d, atol=1e-5)


def test_physical_defocus_above_and_below_focus_gets_opposite_depth_signs() -> None:
    # An axial offset of +-6 um (exact propagation phase, not Noll 4) with the optics'
    # astigmatism: the two sides fit perpendicular axes and eq. 14 separates them.
    k = OPTICS.psf_size
    fits = []
    for z_um in (6.0, -6.0):
        psf = zernike_psf(
            (k, k), OPTICS.pixel_size, OPTICS.na, OPTICS.n_immersion, OPTICS.wavelength,
            astigmatism_coefficients(CYLINDER, 45.0), defocus=z_um,
        )  # fmt: skip
        fits.append(best_fit(psf))
    (f_up, a_up), (f_down, a_down) = fits
    assert f_up == pytest.approx(f_down, abs=0.051) and f_up >= 0.15
    assert sorted([a_up, a_down]) == pytest.approx([math.pi / 4, 3 * math.pi / 4])
    params = np.zeros((3, 4, 4))
    params[1] = CYLINDER
    params[0, :2], params[2, :2] = f_up, a_up
    params[0, 2:], params[2, 2:] = f_down, a_down
    z = depth_index(zmap(params))
    assert np.sign(z[0, 0]) == -np.sign(z[3, 0]) != 0


def test_calibration_on_a_tilted_plane_recovers_depth() -> None:
    # True depth (waves of Noll-4 defocus, 1 wave = 1.7 um here) on a plane tilted along x.
    scale = 1.7
    image = (256, 512)
    gy, gx = 4, 8
    m0 = zmap(np.zeros((3, gy, gx)), image)
    z0, slope_y, slope_x = -0.8, 0.002, 0.012
    true_um = tilt_depth(m0, z0, slope_y, slope_x)
    defocus = true_um / scale  # waves
    params = np.stack(
        [
            np.abs(defocus),
            np.full_like(defocus, CYLINDER),
            np.where(defocus > 0, math.pi / 4, 3 * math.pi / 4),
        ]
    )
    assert (defocus > 0).any() and (defocus < 0).any()  # both sides of focus
    m = zmap(params, image)
    cal = fit_calibration([m], [(z0, slope_y, slope_x)])
    assert cal.alpha == pytest.approx(-2 * scale, rel=1e-5)
    assert cal.beta == pytest.approx(0.0, abs=1e-5)
    np.testing.assert_allclose(cal.apply(depth_index(m)), true_um, atol=1e-5)
    assert cal.nodes == gy * gx and cal.rms_um < 1e-5


def test_calibration_fit_recovers_alpha_beta_against_polyfit(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    alpha, beta = -3.1, 0.45
    maps, tilts, zs, trues = [], [], [], []
    for z0, sy, sx in [(0.5, 0.01, -0.004), (-0.2, -0.003, 0.009)]:
        m = zmap(np.zeros((3, 4, 4)))
        true = tilt_depth(m, z0, sy, sx)
        z = (true - beta) / alpha + rng.normal(0, 0.01, true.shape)
        params = np.stack(
            [np.abs(z) * 2, np.full_like(z, CYLINDER), np.where(z > 0, 3, 1) * math.pi / 4]
        )
        estimated = rng.random((4, 4)) > 0.2
        maps.append(zmap(params, estimated=estimated))
        tilts.append((z0, sy, sx))
        zs.append(depth_index(maps[-1])[estimated])
        trues.append(true[estimated])
    cal = fit_calibration(maps, tilts)
    want_alpha, want_beta = np.polyfit(np.concatenate(zs), np.concatenate(trues), 1)
    assert cal.alpha == pytest.approx(want_alpha, rel=1e-6)
    assert cal.beta == pytest.approx(want_beta, rel=1e-6, abs=1e-9)
    assert cal.alpha == pytest.approx(alpha, rel=0.05)
    assert cal.nodes == sum(len(z) for z in zs)
    cal.write(tmp_path / "cal.json")
    assert read_calibration(tmp_path / "cal.json") == cal


def test_other_models_and_flat_calibrations_are_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    g = PSFModel("gaussian1", OPTICS)
    m = PSFMap(
        g,
        np.ones((1, 2, 2), np.float32),
        np.zeros((2, 2), np.float32),
        np.ones((2, 2), bool),
        64,
        64,
        (128, 128),
        (0.325, 0.325),
    )
    with pytest.raises(InputError, match=r"needs a zernike3 PSF map .* got gaussian1"):
        depth_index(m)
    flat = zmap(np.full((3, 4, 4), 0.5))
    with pytest.raises(InputError, match="same at every estimated node"):
        fit_calibration([flat], [(0.0, 0.01, 0.0)])
    # An untilted plane: every node at the same known depth (least squares gave alpha 0).
    varied = zmap(np.random.default_rng(0).uniform(0.2, 0.8, (3, 4, 4)))
    with pytest.raises(InputError, match=r"known depth is 1\.5 um at every estimated node"):
        fit_calibration([varied, varied], [(1.5, 0.0, 0.0), (1.5, 0.0, 0.0)])
    with pytest.raises(InputError, match="not a depth calibration"):
        (tmp_path / "x.json").write_text("{}")
        read_calibration(tmp_path / "x.json")
    assert DepthCalibration(2.0, 1.0, 3, 0.0).apply(np.array([1.0])) == pytest.approx(3.0)
