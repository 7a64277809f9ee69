"""PSF models against analytic results and independent implementations (pyotf, psfmodels)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage, special

from hpcdeconv.config import (
    BornWolfPSF,
    GaussianPSF,
    GibsonLanniPSF,
    PSFFileConfig,
    RichardsWolfPSF,
    build_config,
)
from hpcdeconv.errors import ConfigError, InputError
from hpcdeconv.metrics import pcc
from hpcdeconv.physics import psf, zernike
from hpcdeconv.physics.psf_grid import fwhm

NA, N_IMM, WL = 1.4, 1.5, 0.5
# Design conditions of psfmodels' defaults; any index of 1.5 below breaks them on purpose.
GL_DESIGN = {
    "n_coverslip": 1.515,
    "n_coverslip_design": 1.515,
    "n_immersion_design": 1.515,
    "coverslip_thickness": 170.0,
    "coverslip_thickness_design": 170.0,
    "working_distance_design": 150.0,
}


def centre_crop(a: np.ndarray, size: int) -> np.ndarray:
    """Central ``size`` x ``size`` window of the last two axes (centre at ``n // 2``)."""
    cy, cx = a.shape[-2] // 2, a.shape[-1] // 2
    h = size // 2
    return a[..., cy - h : cy - h + size, cx - h : cx - h + size]


def centred(n: int, step: float) -> np.ndarray:
    return (np.arange(n) - n // 2) * step


def mirrored_pairs(a: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Slices ``n//2 + k`` and ``n//2 - k`` along ``axis`` for every k that fits both sides."""
    n = a.shape[axis]
    c = n // 2
    k = np.arange(1, min(c, n - 1 - c) + 1)
    return np.take(a, c + k, axis=axis), np.take(a, c - k, axis=axis)


def design_gibson_lanni(
    shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> np.ndarray:
    """Gibson & Lanni under its design conditions: pure defocus, no aberration."""
    return psf.gibson_lanni(
        shape,
        spacing,
        NA,
        WL,
        n_sample=N_IMM,
        n_immersion=N_IMM,
        particle_depth=0.0,
        **{**GL_DESIGN, "n_immersion_design": N_IMM},
    )


MODELS_3D = {
    "born_wolf_paraxial": lambda s, v: psf.born_wolf(s, v, NA, N_IMM, WL, paraxial=True),
    "born_wolf_exact": lambda s, v: psf.born_wolf(s, v, NA, N_IMM, WL, paraxial=False),
    "richards_wolf": lambda s, v: psf.richards_wolf(s, v, NA, N_IMM, WL),
    "gibson_lanni": design_gibson_lanni,
    "gaussian": lambda s, v: psf.gaussian(s, (2.0, 1.5, 1.0)),
}


# --------------------------------------------------------------------------------------
# Normalisation, centring, symmetry
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", sorted(MODELS_3D))
@pytest.mark.parametrize("shape", [(15, 15, 15), (16, 16, 16), (14, 17, 12)])
def test_normalised_float32_peak_at_centre(model: str, shape: tuple[int, int, int]) -> None:
    data = MODELS_3D[model](shape, (0.1, 0.08, 0.08))
    assert data.shape == shape
    assert data.dtype == np.float32
    assert data.sum(dtype=np.float64) == pytest.approx(1.0, abs=1e-5)
    assert np.all(data >= 0)
    assert np.unravel_index(np.argmax(data), shape) == tuple(n // 2 for n in shape)


@pytest.mark.parametrize("model", sorted(MODELS_3D))
@pytest.mark.parametrize("shape", [(15, 17, 17), (16, 18, 18)])
def test_mirror_and_rotation_symmetry(model: str, shape: tuple[int, int, int]) -> None:
    data = MODELS_3D[model](shape, (0.1, 0.08, 0.08)).astype(np.float64)
    peak = data.max()
    for axis in (1, 2) if model == "gaussian" else (0, 1, 2):
        a, b = mirrored_pairs(data, axis)
        np.testing.assert_allclose(a, b, atol=1e-6 * peak, rtol=0)
    if model != "gaussian":  # widefield PSFs are rotationally symmetric: Y and X swap
        np.testing.assert_allclose(data, data.transpose(0, 2, 1), atol=1e-6 * peak, rtol=0)


@pytest.mark.parametrize("shape", [(15, 15), (16, 15), (31, 31, 31)])
def test_gaussian_is_normalised_and_centred(shape: tuple[int, ...]) -> None:
    data = psf.gaussian(shape, (2.0,) * len(shape))
    assert data.dtype == np.float32
    assert data.sum(dtype=np.float64) == pytest.approx(1.0, abs=1e-5)
    assert np.unravel_index(np.argmax(data), shape) == tuple(n // 2 for n in shape)


@pytest.mark.parametrize(
    ("shape", "sigma"),
    [((15, 21), (2.0, 3.5)), ((9, 15, 13), (1.2, 2.0, 1.5)), ((31, 31, 31), 2.0)],
)
def test_gaussian_equals_scipy_filtered_delta(
    shape: tuple[int, ...], sigma: float | tuple[float, ...]
) -> None:
    # scipy's own sampled, normalised Gaussian kernel, over the same (odd) support.
    delta = np.zeros(shape)
    delta[tuple(n // 2 for n in shape)] = 1.0
    radius = [n // 2 for n in shape]
    reference = ndimage.gaussian_filter(delta, sigma, mode="constant", radius=radius)
    ours = psf.gaussian(shape, sigma)
    np.testing.assert_allclose(ours, reference / reference.sum(), rtol=1e-5, atol=1e-9)


def test_gaussian_rejects_a_sigma_count_that_is_not_one_per_axis() -> None:
    with pytest.raises(ConfigError, match="one sigma per axis"):
        psf.gaussian((9, 9, 9), (1.0, 2.0))


# --------------------------------------------------------------------------------------
# Born & Wolf: analytic limits and pyotf
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("paraxial", [True, False])
def test_born_wolf_focal_plane_is_airy_pattern(paraxial: bool) -> None:
    dxy = 0.03
    data = psf.born_wolf((3, 41, 41), (0.1, dxy, dxy), NA, N_IMM, WL, paraxial)[1]
    y, x = np.meshgrid(centred(41, dxy), centred(41, dxy), indexing="ij")
    v = 2 * np.pi / WL * NA * np.hypot(y, x)
    airy = np.where(v == 0, 1.0, (2 * special.j1(v) / np.where(v == 0, 1, v)) ** 2)
    np.testing.assert_allclose(data / data.max(), airy, atol=2e-6, rtol=1e-4)


def test_born_wolf_paraxial_axis_is_sinc_squared() -> None:
    dz = 0.05
    data = psf.born_wolf((41, 5, 5), (dz, 0.1, 0.1), NA, N_IMM, WL, paraxial=True)[:, 2, 2]
    u = 2 * np.pi / WL * NA**2 * centred(41, dz) / N_IMM
    expected = np.sinc(u / (4 * np.pi)) ** 2  # sin(u/4)/(u/4) in numpy's sinc convention
    np.testing.assert_allclose(data / data.max(), expected, atol=1e-6, rtol=1e-4)


def test_axial_fwhm_paraxial_vs_exact_at_na_1_4() -> None:
    dz = 0.02
    shape, spacing = (81, 3, 3), (dz, 0.1, 0.1)
    paraxial = fwhm(psf.born_wolf(shape, spacing, NA, N_IMM, WL, True)[:, 1, 1], dz)
    exact = fwhm(psf.born_wolf(shape, spacing, NA, N_IMM, WL, False)[:, 1, 1], dz)
    # Paraxial closed form: sinc^2(u/4) halves at u = 5.566, u = k NA^2 z / n.
    assert paraxial == pytest.approx(2 * 5.5663 * N_IMM * WL / (2 * np.pi * NA**2), rel=0.01)
    assert paraxial == pytest.approx(0.68, abs=0.02)
    assert exact == pytest.approx(0.48, abs=0.02)


def test_born_wolf_exact_matches_pyotf_hanser() -> None:
    otf = pytest.importorskip("pyotf.otf")
    n, step = 33, 0.1
    ours = psf.born_wolf((n, n, n), (step, step, step), NA, N_IMM, WL, paraxial=False)
    model = otf.HanserPSF(
        WL, NA, N_IMM, step, 128, zrange=centred(n, step), condition="none", vec_corr="none"
    )
    assert pcc(ours, centre_crop(model.PSFi, n)) >= 0.9999


# --------------------------------------------------------------------------------------
# Richards & Wolf: pyotf and psfmodels
# --------------------------------------------------------------------------------------


def test_richards_wolf_matches_pyotf_vectorial() -> None:
    otf = pytest.importorskip("pyotf.otf")
    n, step = 33, 0.1
    ours = psf.richards_wolf((n, n, n), (step, step, step), NA, N_IMM, WL)
    model = otf.HanserPSF(
        WL, NA, N_IMM, step, 128, zrange=centred(n, step), condition="sine", vec_corr="total"
    )
    assert pcc(ours, centre_crop(model.PSFi, n)) >= 0.9999


def test_richards_wolf_matches_psfmodels_vectorial() -> None:
    psfmodels = pytest.importorskip("psfmodels")
    n, step, fine = 33, 0.1, 5
    ours = psf.richards_wolf((n, n, n), (step, step, step), NA, N_IMM, WL)
    params = {"NA": NA, "ni": N_IMM, "ni0": N_IMM, "ns": N_IMM, "ng": N_IMM, "ng0": N_IMM}
    # psfmodels interpolates a radial table linearly; a 5x finer grid subsampled at the
    # voxel centres makes its result point-sampled like ours.
    ref = psfmodels.vectorial_psf(
        centred(n, step), n * fine, step / fine, wvl=WL, params={**params, "sf": 1, "mode": 1}
    )[:, fine // 2 :: fine, fine // 2 :: fine]
    assert pcc(ours, ref) >= 0.9999


def test_richards_wolf_differs_from_scalar_at_high_na() -> None:
    shape, spacing = (33, 33, 33), (0.1, 0.05, 0.05)
    vectorial = psf.richards_wolf(shape, spacing, NA, N_IMM, WL)
    scalar = psf.born_wolf(shape, spacing, NA, N_IMM, WL, paraxial=False)
    lateral_v = fwhm(vectorial[16, 16], 0.05)
    lateral_s = fwhm(scalar[16, 16], 0.05)
    assert lateral_v > lateral_s * 1.02  # depolarisation broadens the focal spot


# --------------------------------------------------------------------------------------
# Gibson & Lanni: psfmodels
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_sample", "depth", "coverslip"),
    [(1.33, 2.0, 170.0), (1.45, 5.0, 175.0), (1.33, 0.0, 170.0)],
)
def test_gibson_lanni_matches_psfmodels_scalar(
    n_sample: float, depth: float, coverslip: float
) -> None:
    psfmodels = pytest.importorskip("psfmodels")
    n, step, fine = 33, 0.1, 5
    optics = {**GL_DESIGN, "coverslip_thickness": coverslip}
    ours = psf.gibson_lanni(
        (n, n, n),
        (step, step, step),
        NA,
        WL,
        n_sample=n_sample,
        n_immersion=N_IMM,
        particle_depth=depth,
        **optics,
    )
    params = {
        "NA": NA,
        "ns": n_sample,
        "ni": N_IMM,
        "ni0": optics["n_immersion_design"],
        "ng": optics["n_coverslip"],
        "ng0": optics["n_coverslip_design"],
        "tg": optics["coverslip_thickness"],
        "tg0": optics["coverslip_thickness_design"],
        "ti0": optics["working_distance_design"],
        "sf": 1,
        "mode": 1,
    }
    ref = psfmodels.scalar_psf(
        depth + centred(n, step), n * fine, step / fine, pz=depth, wvl=WL, params=params
    )[:, fine // 2 :: fine, fine // 2 :: fine]
    assert pcc(ours, ref) >= 0.9999
    assert np.argmax(ours[:, n // 2, n // 2]) == np.argmax(ref[:, n // 2, n // 2])


def test_gibson_lanni_without_mismatch_is_exact_born_wolf() -> None:
    shape, spacing = (21, 25, 25), (0.1, 0.06, 0.06)
    matched = design_gibson_lanni(shape, spacing)
    exact = psf.born_wolf(shape, spacing, NA, N_IMM, WL, paraxial=False)
    np.testing.assert_allclose(matched, exact, atol=1e-5 * exact.max(), rtol=0)


def test_gibson_lanni_focal_shift_into_water_moves_peak_deeper() -> None:
    shape, spacing = (41, 9, 9), (0.1, 0.1, 0.1)
    peaks = [
        np.argmax(
            psf.gibson_lanni(
                shape,
                spacing,
                NA,
                WL,
                n_sample=1.33,
                n_immersion=1.515,
                particle_depth=depth,
                **GL_DESIGN,
            )[:, 4, 4]
        )
        for depth in (0.0, 2.0, 4.0)
    ]
    # A particle in water under oil comes to focus at a nominal depth ~n_oil/n_water deeper.
    assert peaks[0] == 20
    assert peaks[0] < peaks[1] < peaks[2]


# --------------------------------------------------------------------------------------
# Gaussian
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [(3.0, 2.0), (4.0, 2.5, 2.0)])
def test_gaussian_widths_recovered(sigma: tuple[float, ...]) -> None:
    shape = (41,) * len(sigma)
    data = psf.gaussian(shape, sigma)
    centre = tuple(n // 2 for n in shape)
    for axis, s in enumerate(sigma):
        index = list(centre)
        index[axis] = slice(None)
        assert fwhm(data[tuple(index)], 1.0) == pytest.approx(2.3548 * s, rel=0.02)


# --------------------------------------------------------------------------------------
# Configuration dispatch, FWHM, errors
# --------------------------------------------------------------------------------------


def test_make_psf_dispatches_every_model() -> None:
    cases = [
        (
            BornWolfPSF(shape=(9, 11, 11), paraxial=False),
            psf.born_wolf((9, 11, 11), (0.1, 0.1, 0.1), 1.4, 1.5, 0.5, paraxial=False),
        ),
        (
            RichardsWolfPSF(shape=(9, 11, 11), na=1.2, n_immersion=1.33),
            psf.richards_wolf((9, 11, 11), (0.1, 0.1, 0.1), 1.2, 1.33, 0.5),
        ),
        (
            GibsonLanniPSF(shape=(9, 11, 11), particle_depth=3.0, n_immersion=1.5),
            psf.gibson_lanni(
                (9, 11, 11),
                (0.1, 0.1, 0.1),
                1.4,
                0.5,
                1.33,
                1.515,
                1.515,
                1.5,
                1.515,
                170.0,
                170.0,
                150.0,
                3.0,
            ),
        ),
        (
            GaussianPSF(shape=(21, 21), voxel_size=(0.1, 0.1), sigma=(3.0, 2.0)),
            psf.gaussian((21, 21), (3.0, 2.0)),
        ),
    ]
    for cfg, expected in cases:
        built = psf.make_psf(cfg)
        assert isinstance(built, psf.PSF)
        assert built.voxel_size == cfg.voxel_size
        np.testing.assert_array_equal(built.data, expected)


@pytest.mark.parametrize(
    "cfg",
    [
        BornWolfPSF(shape=(33, 33), voxel_size=(0.03, 0.03)),
        BornWolfPSF(shape=(33, 33), voxel_size=(0.03, 0.03), paraxial=False),
        RichardsWolfPSF(shape=(33, 33), voxel_size=(0.03, 0.03), na=0.8, n_immersion=1.0),
        GibsonLanniPSF(shape=(33, 33), voxel_size=(0.03, 0.03), particle_depth=2.0),
    ],
)
def test_2d_widefield_psf_is_the_in_focus_plane(
    cfg: BornWolfPSF | RichardsWolfPSF | GibsonLanniPSF,
) -> None:
    built = psf.make_psf(cfg)
    assert built.data.shape == (33, 33) and built.voxel_size == (0.03, 0.03)
    assert built.data.dtype == np.float32
    assert built.data.sum(dtype=np.float64) == pytest.approx(1.0, abs=1e-5)
    volume = psf.make_psf(
        cfg.model_copy(update={"shape": (5, 33, 33), "voxel_size": (0.1, 0.03, 0.03)})
    ).data
    plane = volume[2] / volume[2].sum(dtype=np.float64)
    np.testing.assert_allclose(built.data, plane, rtol=1e-5, atol=1e-9)


def test_2d_born_wolf_is_the_airy_pattern() -> None:
    dxy = 0.03
    data = psf.make_psf(BornWolfPSF(shape=(41, 41), voxel_size=(dxy, dxy))).data
    y, x = np.meshgrid(centred(41, dxy), centred(41, dxy), indexing="ij")
    v = 2 * np.pi / WL * NA * np.hypot(y, x)
    airy = np.where(v == 0, 1.0, (2 * special.j1(v) / np.where(v == 0, 1, v)) ** 2)
    np.testing.assert_allclose(data, airy / airy.sum(), atol=1e-8, rtol=1e-4)


def test_widefield_voxel_size_must_have_the_axes_of_shape() -> None:
    with pytest.raises(ConfigError, match="one entry per axis"):
        build_config(PSFFileConfig, {"psf": {"shape": [33, 33], "voxel_size": [0.1, 0.1, 0.1]}})


def test_fwhm_interpolates_linearly() -> None:
    assert fwhm(np.array([0.0, 1.0, 2.0, 3.0, 2.0, 1.0, 0.0]), 0.5) == pytest.approx(1.5)
    assert fwhm(np.array([0.0, 4.0, 1.0, 0.0]), 1.0) == pytest.approx(0.5 + 2 / 3)
    with pytest.raises(InputError):
        fwhm(np.array([1.0, 0.9, 0.8]), 1.0)


def test_invalid_parameters_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="na"):
        psf.born_wolf((5, 5, 5), (0.1, 0.1, 0.1), na=1.5, n_immersion=1.33)
    with pytest.raises(ConfigError):
        psf.richards_wolf((5, 5), (0.1, 0.1), 1.2, 1.33, 0.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        psf.gaussian((5, 5), (1.0, 1.0, 1.0))
    with pytest.raises(ConfigError, match="Noll"):
        zernike.noll_to_nm(0)
    with pytest.raises(InputError):
        psf.PSF(np.zeros((3, 3), np.float32), (0.1, 0.1, 0.1))
