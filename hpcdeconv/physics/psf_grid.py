"""Sampling grids, pupil-integral quadrature and measurements shared by the PSF models.

Lengths are in micrometres and axes are ordered ``(Z, Y, X)`` (``(Y, X)`` in 2D); a PSF
centre sits at index ``n // 2`` along every axis. The rotationally symmetric models evaluate
their pupil integrals once per distinct lateral radius of one grid quadrant, by
Gauss-Legendre quadrature vectorised over radii and planes, and unfold the quadrant onto
the full grid (:func:`radially_symmetric`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
from scipy import special

from hpcdeconv.errors import ConfigError, InputError

# Fewest quadrature nodes per sub-interval; the count grows with the number of
# oscillations of the integrand (Bessel argument plus phase variation, in radians).
_MIN_NODES = 32
# Uniform samples used to measure how much a pupil phase varies over the aperture.
_PHASE_PROBES = 129

# (Z,) defocus positions and (N,) pupil nodes -> (Z, N) pupil phase in radians.
PhaseFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
# (Z,) defocus positions and (R,) lateral radii -> (Z, R) intensity.
RadialFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def check_grid(shape: tuple[int, ...], spacing: tuple[float, ...], ndim: int) -> None:
    """Raise :class:`ConfigError` unless ``shape`` and ``spacing`` (µm) are ``ndim`` positives."""
    if len(shape) != ndim or len(spacing) != ndim:
        raise ConfigError(
            f"expected {ndim} sizes and {ndim} spacings, got shape={shape}, spacing={spacing}"
        )
    if any(n < 1 for n in shape) or any(s <= 0 for s in spacing):
        raise ConfigError(f"shape {shape} and spacing {spacing} must be positive")


def check_optics(na: float, n_immersion: float, wavelength: float) -> None:
    """Raise :class:`ConfigError` unless ``0 < na < n_immersion`` and ``wavelength > 0``."""
    if not 0 < na < n_immersion:
        raise ConfigError(f"na={na} must be positive and smaller than n_immersion={n_immersion}")
    if wavelength <= 0:
        raise ConfigError(f"wavelength={wavelength} must be positive")


def centred_coords(n: int, step: float) -> np.ndarray:
    """Sample positions ``(i - n // 2) * step``, shape ``(n,)``: zero at index ``n // 2``."""
    return (np.arange(n) - n // 2) * step


def normalised(data: np.ndarray) -> np.ndarray:
    """Scale to unit sum in float64, then store as float32."""
    return (data / data.sum()).astype(np.float32)


@lru_cache(maxsize=64)
def _legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights on ``[-1, 1]``, cached because they are reused."""
    return np.polynomial.legendre.leggauss(n)


def quadrature(breaks: np.ndarray, n: int, graded: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Composite Gauss-Legendre rule with ``n`` nodes on each interval between ``breaks``.

    With ``graded``, each interval is mapped through ``s = (1 - cos(pi u)) / 2``, which
    clusters nodes at both ends: a square-root branch point at an end (where a wave turns
    evanescent) becomes smooth in ``u``, so Gauss-Legendre converges fast again.

    Returns
    -------
    tuple of np.ndarray
        Nodes and weights, each of shape ``(n * (len(breaks) - 1),)``.
    """
    x, w = _legendre(n)
    lo, hi = breaks[:-1, None], breaks[1:, None]
    if graded:
        u = 0.5 * (x + 1)
        s = 0.5 * (1 - np.cos(np.pi * u))
        jacobian = 0.25 * np.pi * np.sin(np.pi * u)
        return (lo + (hi - lo) * s).ravel(), ((hi - lo) * w * jacobian).ravel()
    nodes = 0.5 * (hi - lo) * x + 0.5 * (hi + lo)
    return nodes.ravel(), (0.5 * (hi - lo) * w).ravel()


def node_count(bessel_span: float, phase: PhaseFn, z: np.ndarray, lo: float, hi: float) -> int:
    """Nodes per interval to resolve every oscillation of the integrand on ``[lo, hi]``."""
    probe = np.linspace(lo, hi, _PHASE_PROBES)
    variation = np.abs(np.diff(np.real(phase(z, probe)), axis=-1)).sum(axis=-1).max()
    return _MIN_NODES + math.ceil(bessel_span + variation)


def radially_symmetric(
    shape: tuple[int, int, int], voxel_size: tuple[float, float, float], radial: RadialFn
) -> np.ndarray:
    """Evaluate ``radial(z, r)`` on one lateral quadrant and unfold it onto the grid.

    Parameters
    ----------
    shape, voxel_size
        ``(Z, Y, X)`` grid and its spacing in micrometres.
    radial
        Intensity at defocus ``z`` (``(Z,)``) and lateral radius ``r`` (``(R,)``),
        returned as ``(Z, R)``.

    Returns
    -------
    np.ndarray
        Normalised float32 PSF of shape ``(Z, Y, X)``.
    """
    nz, ny, nx = shape
    dz, dy, dx = voxel_size
    ay = np.abs(np.arange(ny) - ny // 2)
    ax = np.abs(np.arange(nx) - nx // 2)
    radii = np.hypot(np.arange(ay.max() + 1)[:, None] * dy, np.arange(ax.max() + 1) * dx)
    quadrant = radial(centred_coords(nz, dz), radii.ravel()).reshape(nz, *radii.shape)
    return normalised(quadrant[:, ay[:, None], ax[None, :]])


def bessel_j2(x: np.ndarray, j0: np.ndarray, j1: np.ndarray) -> np.ndarray:
    """``J2(x) = 2 J1(x) / x - J0(x)``, with the limit ``J2(0) = 0``."""
    safe = np.where(x == 0, 1.0, x)
    return np.where(x == 0, 0.0, 2.0 * j1 / safe - j0)


def scalar_radial(
    z: np.ndarray,
    r: np.ndarray,
    k_na: float,
    phase: PhaseFn,
    breaks: tuple[float, ...] = (),
) -> np.ndarray:
    """Scalar diffraction integral over the normalised pupil radius ``rho``.

    ``I(z, r) = |int_0^1 J0(k NA r rho) exp(i phase(z, rho)) rho drho|^2``.

    Parameters
    ----------
    z, r
        Defocus positions ``(Z,)`` and lateral radii ``(R,)`` in micrometres.
    k_na
        ``2 pi NA / wavelength`` in rad/µm.
    phase
        Pupil phase in radians, ``(Z,), (N,) -> (Z, N)``; may be complex where a
        wave turns evanescent.
    breaks
        Interior points of ``(0, 1)`` where the integrand is not smooth.

    Returns
    -------
    np.ndarray
        Intensity of shape ``(Z, R)``.
    """
    edges = np.unique(np.concatenate([[0.0, 1.0], [b for b in breaks if 0.0 < b < 1.0]]))
    n = node_count(k_na * r.max(), phase, z, 0.0, 1.0)
    rho, w = quadrature(edges, n, graded=len(edges) > 2)
    bessel = special.j0(k_na * r[:, None] * rho)  # (R, N)
    pupil = w * rho * np.exp(1j * phase(z, rho))  # (Z, N)
    return np.abs(pupil @ bessel.T) ** 2


def fwhm(profile: np.ndarray, spacing: float) -> float:
    """Full width at half maximum of a single-peaked 1D profile.

    The half-maximum crossings on each side of the peak are located by linear
    interpolation between the samples that bracket them.

    Parameters
    ----------
    profile
        Samples of shape ``(N,)``.
    spacing
        Distance between samples; the width is returned in the same unit.

    Returns
    -------
    float
        The width ``(right - left) * spacing``.
    """
    p = np.asarray(profile, dtype=np.float64)
    if p.ndim != 1:
        raise InputError(f"fwhm needs a 1D profile, got shape {p.shape}")
    peak = int(np.argmax(p))
    half = p[peak] / 2
    below_left = np.flatnonzero(p[:peak] < half)
    below_right = np.flatnonzero(p[peak:] < half)
    if below_left.size == 0 or below_right.size == 0:
        raise InputError("profile does not fall below half its maximum on both sides")
    i = below_left[-1]  # p[i] < half <= p[i + 1]
    left = i + (half - p[i]) / (p[i + 1] - p[i])
    j = peak + below_right[0]  # p[j - 1] >= half > p[j]
    right = j - 1 + (p[j - 1] - half) / (p[j - 1] - p[j])
    return float((right - left) * spacing)
