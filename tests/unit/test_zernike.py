"""Zernike polynomials and pupils against pyotf and analytic properties; the Zernike PSF config."""

from __future__ import annotations

import numpy as np
import pytest

from hpcdeconv.config import PSFFileConfig, ZernikePSF, build_config
from hpcdeconv.metrics import pcc
from hpcdeconv.physics import psf, zernike
from hpcdeconv.physics.psf_io import centre_crop

NA, N_IMM, WL = 1.4, 1.5, 0.5


def principal_axis(image: np.ndarray) -> tuple[float, float]:
    """Orientation (degrees, from X towards Y) and elongation of a 2D intensity."""
    y, x = np.indices(image.shape)
    w = image / image.sum()
    dy, dx = y - (w * y).sum(), x - (w * x).sum()
    mxx, myy, mxy = (w * dx * dx).sum(), (w * dy * dy).sum(), (w * dx * dy).sum()
    low, high = np.linalg.eigvalsh([[mxx, mxy], [mxy, myy]])
    return float(np.degrees(0.5 * np.arctan2(2 * mxy, mxx - myy))), float(np.sqrt(high / low))


def angle_diff(a: float, b: float) -> float:
    """Difference of two axis orientations, folded into [-90, 90)."""
    return (a - b + 90.0) % 180.0 - 90.0


def test_noll_to_nm_matches_pyotf() -> None:
    zern = pytest.importorskip("pyotf.zernike")
    j = np.arange(1, 56)
    n_ref, m_ref = zern.noll2degrees(j)
    assert [zernike.noll_to_nm(int(k)) for k in j] == list(
        zip(n_ref.tolist(), m_ref.tolist(), strict=True)
    )


def test_zernike_values_match_pyotf_on_unit_disk(rng: np.random.Generator) -> None:
    zern = pytest.importorskip("pyotf.zernike")
    rho = np.sqrt(rng.uniform(0, 1, 200))
    theta = rng.uniform(-np.pi, np.pi, 200)
    for j in range(1, 29):
        n, m = zernike.noll_to_nm(j)
        np.testing.assert_allclose(
            zernike.zernike(j, rho, theta), zern.zernike(rho, theta, n, m, norm=True), atol=1e-10
        )


def test_zernikes_are_orthonormal_over_unit_disk() -> None:
    # Gauss-Legendre in rho^2 and uniform in theta integrate these polynomials exactly.
    x, w = np.polynomial.legendre.leggauss(20)
    rho = np.sqrt(0.5 * (x + 1))
    theta = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    r, t = np.meshgrid(rho, theta, indexing="ij")
    weight = (0.5 * w)[:, None] / theta.size * np.ones_like(t)  # mean over the disk
    basis = np.stack([zernike.zernike(j, r, t).ravel() for j in range(1, 22)])
    gram = (basis * weight.ravel()) @ basis.T
    np.testing.assert_allclose(gram, np.eye(21), atol=1e-12)


@pytest.mark.parametrize("size", [64, 63])
def test_zernike_psf_matches_pyotf_aberrated_pupil(size: int) -> None:
    otf = pytest.importorskip("pyotf.otf")
    coefficients = {4: 0.1, 5: 0.2, 7: -0.15, 9: 0.05, 11: 0.08}
    ours = zernike.zernike_psf((size, size), 0.1, NA, N_IMM, WL, coefficients, defocus=0.3)
    model = otf.HanserPSF(WL, NA, N_IMM, 0.1, size, zrange=[0.3], condition="none")
    pcoefs = np.zeros(max(coefficients))
    for j, c in coefficients.items():
        pcoefs[j - 1] = 2 * np.pi * c  # pyotf's phase coefficients are in radians
    ref = otf.apply_aberration(model, None, pcoefs).PSFi[0]
    assert pcc(ours, ref) >= 0.9999
    assert ours.dtype == np.float32
    assert ours.sum(dtype=np.float64) == pytest.approx(1.0, abs=1e-5)


def test_unaberrated_zernike_psf_equals_born_wolf_plane() -> None:
    defocus = 0.3
    pupil = zernike.zernike_psf((128, 128), 0.05, NA, N_IMM, WL, {}, defocus=defocus)
    plane = psf.born_wolf((3, 33, 33), (defocus, 0.05, 0.05), NA, N_IMM, WL, paraxial=False)[2]
    assert np.unravel_index(np.argmax(pupil), pupil.shape) == (64, 64)
    assert pcc(centre_crop(pupil, (33, 33)), plane) >= 0.999


def test_astigmatism_coefficients() -> None:
    assert zernike.astigmatism_coefficients(0.2, 0.0) == pytest.approx({5: 0.0, 6: 0.2})
    assert zernike.astigmatism_coefficients(0.2, 45.0) == pytest.approx({5: 0.2, 6: 0.0})
    c = zernike.astigmatism_coefficients(0.3, 20.0)
    assert np.hypot(c[5], c[6]) == pytest.approx(0.3)


def test_astigmatic_psf_rotates_with_axis_and_flips_with_defocus() -> None:
    def image(angle: float, defocus: float) -> np.ndarray:
        coefficients = zernike.astigmatism_coefficients(0.15, angle)
        return zernike.zernike_psf((64, 64), 0.1, NA, N_IMM, WL, coefficients, defocus)

    base_angle, elongation = principal_axis(image(0.0, -0.4))
    assert elongation > 1.3
    assert abs(angle_diff(base_angle, 0.0)) < 1.5  # below focus: along the axis
    for angle in (30.0, 60.0, 135.0):
        below, _ = principal_axis(image(angle, -0.4))
        above, _ = principal_axis(image(angle, 0.4))
        assert abs(angle_diff(below, base_angle + angle)) < 1.5
        assert abs(angle_diff(above, below + 90.0)) < 1.5
    _, in_focus = principal_axis(image(30.0, 0.0))
    assert in_focus == pytest.approx(1.0, abs=0.01)


def test_make_psf_zernike_adds_astigmatism_to_coefficients() -> None:
    cfg = build_config(
        PSFFileConfig,
        {
            "psf": {
                "model": "zernike",
                "shape": [32, 32],
                "coefficients": {5: 0.1, 11: 0.05},
                "cylinder_power": 0.2,
                "axis_angle": 45.0,
                "defocus": 0.2,
            }
        },
    ).psf
    assert isinstance(cfg, ZernikePSF)
    built = psf.make_psf(cfg)
    expected = zernike.zernike_psf(
        (32, 32), 0.1, 1.4, 1.5, 0.5, {5: 0.3, 6: 0.2 * np.cos(np.pi / 2), 11: 0.05}, 0.2
    )
    assert built.voxel_size == (0.1, 0.1)
    np.testing.assert_allclose(built.data, expected, atol=1e-9)
