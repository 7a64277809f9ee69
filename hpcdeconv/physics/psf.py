"""Point-spread function models of widefield fluorescence microscopes, and their dispatch.

Every model returns a float32 numpy array that sums to 1. Lengths are in micrometres and
axes are ordered ``(Z, Y, X)`` (``(Y, X)`` in 2D). The PSF centre (optical axis, nominal
focal plane) sits at index ``n // 2`` along every axis, for odd and even ``n``; the
forward-convolution code relies on the same convention.

The rotationally symmetric models (Born & Wolf, Richards & Wolf, Gibson & Lanni) are
evaluated on one lateral quadrant by :mod:`hpcdeconv.physics.psf_grid`: exact values at
every voxel without integrating per voxel. Zernike pupils live in
:mod:`hpcdeconv.physics.zernike`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import special

from hpcdeconv.config import (
    BornWolfPSF,
    GaussianPSF,
    GibsonLanniPSF,
    PSFConfig,
    RichardsWolfPSF,
    ZernikePSF,
)
from hpcdeconv.errors import ConfigError, InputError
from hpcdeconv.physics.psf_grid import (
    bessel_j2,
    centred_coords,
    check_grid,
    check_optics,
    node_count,
    normalised,
    quadrature,
    radially_symmetric,
    scalar_radial,
)
from hpcdeconv.physics.zernike import astigmatism_coefficients, zernike_psf


@dataclass(frozen=True)
class PSF:
    """A sampled point-spread function.

    Attributes
    ----------
    data
        Float32 array of shape ``(Z, Y, X)`` or ``(Y, X)`` summing to 1, centred at
        ``n // 2`` along every axis.
    voxel_size
        Sampling step per axis in micrometres, same length as ``data.shape``.
    """

    data: np.ndarray
    voxel_size: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.data.ndim != len(self.voxel_size):
            raise InputError(
                f"PSF of shape {self.data.shape} needs {self.data.ndim} voxel sizes, "
                f"got {self.voxel_size}"
            )


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


def born_wolf(
    shape: tuple[int, int, int],
    voxel_size: tuple[float, float, float],
    na: float = 1.4,
    n_immersion: float = 1.5,
    wavelength: float = 0.5,
    paraxial: bool = True,
) -> np.ndarray:
    """Scalar Born & Wolf PSF of an aberration-free objective.

    ``h(r, z) = |int_0^1 J0(k NA r rho) exp(i W(rho, z)) rho drho|^2`` with ``k = 2 pi /
    wavelength``. ``paraxial=True`` uses the seed paper's quadratic defocus
    ``W = -1/2 k z NA^2 rho^2 / n``; ``paraxial=False`` the exact scalar defocus
    ``W = k z sqrt(n^2 - NA^2 rho^2)``. At NA 1.4 the quadratic form overestimates the
    axial FWHM (about 0.68 µm against 0.48 µm at 500 nm).

    Parameters
    ----------
    shape
        ``(Z, Y, X)`` voxels.
    voxel_size
        ``(dz, dy, dx)`` in micrometres.
    na, n_immersion, wavelength
        Numerical aperture, refractive index of the immersion medium, vacuum emission
        wavelength in micrometres.
    paraxial
        Quadratic (``True``) or exact (``False``) defocus phase.

    Returns
    -------
    np.ndarray
        Float32 array of shape ``(Z, Y, X)`` summing to 1.
    """
    check_grid(shape, voxel_size, 3)
    check_optics(na, n_immersion, wavelength)
    k = 2 * np.pi / wavelength

    def quadratic(z: np.ndarray, rho: np.ndarray) -> np.ndarray:
        return -0.5 * k * z[:, None] * na**2 * rho**2 / n_immersion

    def exact(z: np.ndarray, rho: np.ndarray) -> np.ndarray:
        return k * z[:, None] * np.sqrt(n_immersion**2 - (na * rho) ** 2)

    phase = quadratic if paraxial else exact
    return radially_symmetric(shape, voxel_size, lambda z, r: scalar_radial(z, r, k * na, phase))


def richards_wolf(
    shape: tuple[int, int, int],
    voxel_size: tuple[float, float, float],
    na: float,
    n_immersion: float,
    wavelength: float,
) -> np.ndarray:
    """Vectorial Richards & Wolf PSF for unpolarised light and an aplanatic objective.

    ``I_m(r, z) = int_0^alpha sqrt(cos t) sin t g_m(t) J_m(k n r sin t) exp(i k n z cos t) dt``
    with ``g_0 = 1 + cos t``, ``g_1 = sin t``, ``g_2 = 1 - cos t``, ``sin alpha = NA / n``;
    the intensity averaged over polarisations is ``|I0|^2 + 2 |I1|^2 + |I2|^2``.

    Parameters
    ----------
    shape
        ``(Z, Y, X)`` voxels.
    voxel_size
        ``(dz, dy, dx)`` in micrometres.
    na, n_immersion, wavelength
        Numerical aperture, refractive index of the immersion medium, vacuum emission
        wavelength in micrometres.

    Returns
    -------
    np.ndarray
        Float32 array of shape ``(Z, Y, X)`` summing to 1.
    """
    check_grid(shape, voxel_size, 3)
    check_optics(na, n_immersion, wavelength)
    kn = 2 * np.pi / wavelength * n_immersion
    alpha = float(np.arcsin(na / n_immersion))

    def phase(z: np.ndarray, theta: np.ndarray) -> np.ndarray:
        return kn * z[:, None] * np.cos(theta)

    def radial(z: np.ndarray, r: np.ndarray) -> np.ndarray:
        n = node_count(kn * np.sin(alpha) * r.max(), phase, z, 0.0, alpha)
        theta, w = quadrature(np.array([0.0, alpha]), n)
        sin, cos = np.sin(theta), np.cos(theta)
        x = kn * r[:, None] * sin  # (R, N)
        j0, j1 = special.j0(x), special.j1(x)
        j2 = bessel_j2(x, j0, j1)
        pupil = w * np.sqrt(cos) * sin * np.exp(1j * phase(z, theta))  # (Z, N)
        i0 = (pupil * (1 + cos)) @ j0.T
        i1 = (pupil * sin) @ j1.T
        i2 = (pupil * (1 - cos)) @ j2.T
        return np.abs(i0) ** 2 + 2 * np.abs(i1) ** 2 + np.abs(i2) ** 2

    return radially_symmetric(shape, voxel_size, radial)


def gibson_lanni(
    shape: tuple[int, int, int],
    voxel_size: tuple[float, float, float],
    na: float,
    wavelength: float,
    n_sample: float,
    n_coverslip: float,
    n_coverslip_design: float,
    n_immersion: float,
    n_immersion_design: float,
    coverslip_thickness: float,
    coverslip_thickness_design: float,
    working_distance_design: float,
    particle_depth: float,
) -> np.ndarray:
    """Scalar Gibson & Lanni PSF: optical path difference from index and thickness mismatch.

    In the formulation of Aguet et al. (Opt. Express 17, 6829, 2009), with
    ``s_x = sqrt(n_x^2 - NA^2 rho^2)``:
    ``OPD(rho, z) = (c - z) s_i + z_p s_s + t_g s_g - t_g0 s_g0 - t_i0 s_i0`` and
    ``c = z_p (1 - n_i / n_s) + n_i (t_g0 / n_g0 + t_i0 / n_i0 - t_g / n_g)``;
    ``h = |int_0^1 J0(k NA r rho) exp(i k OPD) rho drho|^2``. Square roots of negative
    numbers are taken as imaginary, so rays beyond the critical angle are evanescent.
    Parameter meanings follow ``psfmodels.scalar_psf``.

    Parameters
    ----------
    shape
        ``(Z, Y, X)`` voxels. Plane ``i`` is at nominal focal position
        ``z = particle_depth + (i - Z // 2) * dz`` above the coverslip, so the centre plane
        is focused on the particle; with an index mismatch the intensity maximum shifts
        away from it (focal shift).
    voxel_size
        ``(dz, dy, dx)`` in micrometres.
    na, wavelength
        Numerical aperture and vacuum emission wavelength (µm).
    n_sample, n_coverslip, n_coverslip_design, n_immersion, n_immersion_design
        Refractive indices of the specimen, coverslip (actual and design) and immersion
        medium (actual and design).
    coverslip_thickness, coverslip_thickness_design, working_distance_design
        Thicknesses in micrometres; the working distance is the design thickness of the
        immersion layer.
    particle_depth
        Depth of the point source below the coverslip surface, micrometres (``>= 0``).

    Returns
    -------
    np.ndarray
        Float32 array of shape ``(Z, Y, X)`` summing to 1.
    """
    check_grid(shape, voxel_size, 3)
    check_optics(na, n_immersion, wavelength)
    if particle_depth < 0:
        raise ConfigError(f"particle_depth={particle_depth} must be >= 0")
    k = 2 * np.pi / wavelength
    zp = particle_depth
    c = zp * (1 - n_immersion / n_sample) + n_immersion * (
        coverslip_thickness_design / n_coverslip_design
        + working_distance_design / n_immersion_design
        - coverslip_thickness / n_coverslip
    )

    def root(n: float, rho: np.ndarray) -> np.ndarray:
        return np.sqrt(complex(n**2) - (na * rho) ** 2)

    def phase(z: np.ndarray, rho: np.ndarray) -> np.ndarray:
        fixed = (
            zp * root(n_sample, rho)
            + coverslip_thickness * root(n_coverslip, rho)
            - coverslip_thickness_design * root(n_coverslip_design, rho)
            - working_distance_design * root(n_immersion_design, rho)
        )
        return k * ((c - (zp + z[:, None])) * root(n_immersion, rho) + fixed)

    critical = tuple(
        n / na for n in (n_sample, n_coverslip, n_coverslip_design, n_immersion_design)
    )
    return radially_symmetric(
        shape, voxel_size, lambda z, r: scalar_radial(z, r, k * na, phase, critical)
    )


def gaussian(shape: tuple[int, ...], sigma: float | tuple[float, ...]) -> np.ndarray:
    """Anisotropic Gaussian PSF, ``exp(-sum_a (i_a - n_a // 2)^2 / (2 sigma_a^2))``.

    One sigma per axis covers the one-width (G-1) and two-width (G-2) models of the
    PSF-regression paper; FWHM = 2 sqrt(2 ln 2) sigma = 2.3548 sigma. This is the one
    Gaussian PSF of the project: simulations and the Gaussian start of the learnable blur
    layer use it.

    Parameters
    ----------
    shape
        ``(Y, X)`` or ``(Z, Y, X)`` voxels.
    sigma
        Standard deviation in voxels: one per axis, or one for every axis.

    Returns
    -------
    np.ndarray
        Float32 array of ``shape`` summing to 1.

    Raises
    ------
    ConfigError
        Not 2 or 3 axes, a sigma count other than one or one per axis, or a size or sigma
        that is not positive.
    """
    if np.ndim(sigma) == 0:
        sigma = (float(sigma),) * len(shape)  # type: ignore[arg-type]
    if len(shape) not in (2, 3) or len(sigma) != len(shape):
        raise ConfigError(
            f"a Gaussian PSF needs 2 or 3 axes and one sigma per axis, got "
            f"shape={shape}, sigma={sigma}"
        )
    if any(n < 1 for n in shape) or any(s <= 0 for s in sigma):
        raise ConfigError(f"shape {shape} and sigma {sigma} must be positive")
    axes = np.meshgrid(
        *(centred_coords(n, 1.0) / s for n, s in zip(shape, sigma, strict=True)),
        indexing="ij",
        sparse=True,
    )
    log_g = sum(-0.5 * a**2 for a in axes)
    return normalised(np.exp(log_g))


# --------------------------------------------------------------------------------------
# Configuration dispatch
# --------------------------------------------------------------------------------------

# A widefield model: (Z, Y, X) shape and voxel size (µm) -> normalised (Z, Y, X) PSF.
Widefield = Callable[[tuple[int, int, int], tuple[float, float, float]], np.ndarray]


def make_psf(cfg: PSFConfig) -> PSF:
    """Build the PSF described by a validated configuration.

    Parameters
    ----------
    cfg
        One of :class:`BornWolfPSF`, :class:`RichardsWolfPSF`, :class:`GibsonLanniPSF`,
        :class:`GaussianPSF`, :class:`ZernikePSF`. A widefield model given a 2-axis
        ``shape`` (Y, X) yields its in-focus plane ``z = 0``. For Zernike PSFs the
        astigmatism given by ``cylinder_power`` and ``axis_angle`` is added to
        ``coefficients``.

    Returns
    -------
    PSF
        Normalised data and its voxel size, ``(Z, Y, X)`` or ``(Y, X)``.

    Raises
    ------
    ConfigError
        An unknown configuration type.
    """
    if isinstance(cfg, BornWolfPSF):
        return _widefield(
            cfg,
            lambda shape, voxel: born_wolf(
                shape, voxel, cfg.na, cfg.n_immersion, cfg.wavelength, cfg.paraxial
            ),
        )
    if isinstance(cfg, RichardsWolfPSF):
        return _widefield(
            cfg,
            lambda shape, voxel: richards_wolf(
                shape, voxel, cfg.na, cfg.n_immersion, cfg.wavelength
            ),
        )
    if isinstance(cfg, GibsonLanniPSF):
        return _widefield(cfg, lambda shape, voxel: _gibson_lanni_from(cfg, shape, voxel))
    if isinstance(cfg, GaussianPSF):
        return PSF(gaussian(cfg.shape, cfg.sigma), cfg.voxel_size)
    if isinstance(cfg, ZernikePSF):
        return PSF(_zernike_from(cfg), (cfg.pixel_size, cfg.pixel_size))
    raise ConfigError(f"unknown PSF configuration {type(cfg).__name__}")


def _widefield(cfg: BornWolfPSF | RichardsWolfPSF | GibsonLanniPSF, model: Widefield) -> PSF:
    """Evaluate a 3D widefield model, or only its plane ``z = 0`` for a (Y, X) shape.

    A single plane is centred at ``z = 0`` (index ``1 // 2``), so the model integrates only
    the in-focus plane; its sum-one normalisation is then that of the 2D PSF.
    """
    if len(cfg.shape) == 3:
        return PSF(model(cfg.shape, cfg.voxel_size), cfg.voxel_size)
    # The axial step of a single plane never enters: its only position is z = 0.
    plane = model((1, *cfg.shape), (1.0, *cfg.voxel_size))[0]
    return PSF(plane, cfg.voxel_size)


def _gibson_lanni_from(
    cfg: GibsonLanniPSF, shape: tuple[int, int, int], voxel_size: tuple[float, float, float]
) -> np.ndarray:
    return gibson_lanni(
        shape,
        voxel_size,
        na=cfg.na,
        wavelength=cfg.wavelength,
        n_sample=cfg.n_sample,
        n_coverslip=cfg.n_coverslip,
        n_coverslip_design=cfg.n_coverslip_design,
        n_immersion=cfg.n_immersion,
        n_immersion_design=cfg.n_immersion_design,
        coverslip_thickness=cfg.coverslip_thickness,
        coverslip_thickness_design=cfg.coverslip_thickness_design,
        working_distance_design=cfg.working_distance_design,
        particle_depth=cfg.particle_depth,
    )


def _zernike_from(cfg: ZernikePSF) -> np.ndarray:
    coefficients = dict(cfg.coefficients)
    for j, c in astigmatism_coefficients(cfg.cylinder_power, cfg.axis_angle).items():
        coefficients[j] = coefficients.get(j, 0.0) + c
    return zernike_psf(
        cfg.shape,
        cfg.pixel_size,
        cfg.na,
        cfg.n_immersion,
        cfg.wavelength,
        coefficients,
        cfg.defocus,
    )
