"""Zernike pupils: Noll-indexed polynomials, astigmatism and the 2D PSF of an aberrated pupil.

The polynomials are RMS-normalised over the unit disk; amplitudes are in waves. Lengths are
in micrometres; a PSF is ``(Y, X)`` with its centre at index ``n // 2``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from hpcdeconv.errors import ConfigError
from hpcdeconv.physics.psf_grid import check_grid, check_optics, normalised


def noll_to_nm(j: int) -> tuple[int, int]:
    """Radial order ``n`` and signed azimuthal frequency ``m`` of Noll index ``j``.

    Within a radial order, ``|m|`` increases in pairs; even ``j`` carries ``cos(m theta)``
    (``m > 0``) and odd ``j`` carries ``sin(|m| theta)`` (``m < 0``), as in Noll (1976).

    Examples
    --------
    >>> [noll_to_nm(j) for j in (1, 2, 3, 4, 5, 6, 11)]
    [(0, 0), (1, 1), (1, -1), (2, 0), (2, -2), (2, 2), (4, 0)]
    """
    if int(j) != j or j < 1:
        raise ConfigError(f"Noll index must be an integer >= 1, got {j}")
    j = int(j)
    n = 0
    while (n + 1) * (n + 2) // 2 < j:
        n += 1
    k = j - n * (n + 1) // 2 - 1  # position within the radial order
    m_abs = 2 * ((k + 1) // 2) if n % 2 == 0 else 2 * (k // 2) + 1
    if m_abs == 0:
        return n, 0
    return n, (m_abs if j % 2 == 0 else -m_abs)


def _zernike_radial(n: int, m_abs: int, rho: np.ndarray) -> np.ndarray:
    """``R_n^m(rho) = sum_s (-1)^s (n - s)! / (s! ((n+m)/2 - s)! ((n-m)/2 - s)!) rho^(n-2s)``."""
    out = np.zeros_like(rho, dtype=np.float64)
    for s in range((n - m_abs) // 2 + 1):
        coef = (-1) ** s * math.factorial(n - s)
        coef //= (
            math.factorial(s)
            * math.factorial((n + m_abs) // 2 - s)
            * math.factorial((n - m_abs) // 2 - s)
        )
        out += coef * rho ** (n - 2 * s)
    return out


def zernike(noll: int, rho: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """RMS-normalised Zernike polynomial ``Z_j(rho, theta)`` in Noll's numbering.

    ``Z_j = sqrt(n + 1) R_n^0`` for ``m = 0``, ``sqrt(2 (n + 1)) R_n^|m| cos(m theta)`` for
    ``m > 0`` and ``... sin(|m| theta)`` for ``m < 0``, so every term has unit RMS over the
    unit disk. The polynomial is evaluated for any ``rho``; callers mask the aperture.

    Parameters
    ----------
    noll
        Noll index ``j >= 1``.
    rho, theta
        Normalised pupil radius and azimuth (radians), broadcastable arrays.

    Returns
    -------
    np.ndarray
        Values of the broadcast shape of ``rho`` and ``theta``.
    """
    n, m = noll_to_nm(noll)
    rho, theta = np.broadcast_arrays(np.asarray(rho, float), np.asarray(theta, float))
    radial = _zernike_radial(n, abs(m), rho)
    if m == 0:
        return math.sqrt(n + 1) * radial
    angular = np.cos(m * theta) if m > 0 else np.sin(-m * theta)
    return math.sqrt(2 * (n + 1)) * radial * angular


def astigmatism_coefficients(cylinder_power: float, axis_angle: float) -> dict[int, float]:
    """Noll 5 (oblique) and 6 (vertical) coefficients of astigmatism along an axis.

    ``P sqrt(6) rho^2 cos(2 (theta - phi)) = c5 Z5 + c6 Z6`` with ``c5 = P sin(2 phi)`` and
    ``c6 = P cos(2 phi)``: the RMS amplitude stays ``P`` for every axis angle ``phi``.
    With :func:`zernike_psf`, the PSF is elongated along ``phi`` for negative defocus and
    perpendicular to it for positive defocus (depth from astigmatism).

    Parameters
    ----------
    cylinder_power
        RMS amplitude of the astigmatism, in waves.
    axis_angle
        Axis angle ``phi`` in degrees, counter-clockwise from the ``X`` axis towards ``Y``.

    Returns
    -------
    dict
        ``{5: c5, 6: c6}`` in waves.
    """
    phi = math.radians(axis_angle)
    return {5: cylinder_power * math.sin(2 * phi), 6: cylinder_power * math.cos(2 * phi)}


def zernike_psf(
    shape: tuple[int, int],
    pixel_size: float,
    na: float,
    n_immersion: float,
    wavelength: float,
    coefficients: Mapping[int, float],
    defocus: float = 0.0,
) -> np.ndarray:
    """2D PSF of a Zernike-aberrated pupil at an axial offset ``defocus``.

    The pupil lives on the discrete frequency grid of the image (``fftfreq``), inside the
    aperture ``|k| <= NA / wavelength``; its phase is
    ``2 pi (sum_j c_j Z_j(rho, theta) + defocus sqrt((n / wavelength)^2 - |k|^2))`` with
    ``rho = |k| wavelength / NA``, ``theta = atan2(k_y, k_x)``. The PSF is
    ``|IFFT(pupil)|^2`` shifted so its centre sits at ``n // 2``.

    Parameters
    ----------
    shape
        ``(Y, X)`` pixels.
    pixel_size
        Lateral sampling in micrometres.
    na, n_immersion, wavelength
        Numerical aperture, immersion index and vacuum wavelength (µm).
    coefficients
        Noll index -> amplitude in waves of RMS-normalised Zernikes.
    defocus
        Axial offset of the imaged plane from focus, micrometres.

    Returns
    -------
    np.ndarray
        Float32 array of shape ``(Y, X)`` summing to 1.
    """
    check_grid(tuple(shape), (pixel_size, pixel_size), 2)
    check_optics(na, n_immersion, wavelength)
    ky = np.fft.fftfreq(shape[0], pixel_size)[:, None]
    kx = np.fft.fftfreq(shape[1], pixel_size)[None, :]
    kr = np.hypot(ky, kx)
    aperture = kr <= na / wavelength
    rho = kr * wavelength / na
    theta = np.arctan2(ky, kx)
    waves = sum(
        (c * zernike(j, rho, theta) for j, c in coefficients.items() if c != 0),
        start=np.zeros(shape),
    )
    waves = waves + defocus * np.sqrt(np.maximum((n_immersion / wavelength) ** 2 - kr**2, 0.0))
    pupil = np.where(aperture, np.exp(2j * np.pi * waves), 0.0)
    field = np.fft.ifft2(pupil)
    return normalised(np.fft.fftshift(np.abs(field) ** 2))
