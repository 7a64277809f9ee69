"""Rigid (translation) registration of 2D images, through scikit-image and SciPy.

The planes of a z-stack drift sideways as the stage or objective moves in Z; before an
out-of-focus plane is paired with its in-focus plane, it is shifted onto it.
:func:`estimate_shift` is phase correlation with sub-pixel refinement by an upsampled
matrix-multiply DFT (:func:`skimage.registration.phase_cross_correlation`);
:func:`apply_shift` moves an image by cubic-spline interpolation
(:func:`scipy.ndimage.shift`). An image ``(C, Y, X)`` with channels is registered on the
sum of its channels, and every channel is moved by the same shift.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["apply_shift", "estimate_shift", "register_to"]


def _plane(image: np.ndarray) -> np.ndarray:
    """``(Y, X)`` of a ``(Y, X)`` or ``(C, Y, X)`` image: the channels summed."""
    array = np.asarray(image, dtype=np.float64)
    if array.ndim == 3:
        return array.sum(axis=0)
    if array.ndim != 2:
        raise ValueError(f"expected a (Y, X) or (C, Y, X) image, got shape {array.shape}")
    return array


def estimate_shift(
    reference: np.ndarray, moving: np.ndarray, upsample_factor: int = 20
) -> tuple[float, float]:
    """The translation that moves ``moving`` onto ``reference``.

    Parameters
    ----------
    reference, moving
        ``(Y, X)`` or ``(C, Y, X)`` images of one shape.
    upsample_factor
        The shift is found to ``1 / upsample_factor`` pixel.

    Returns
    -------
    tuple of float
        ``(dy, dx)`` in pixels: ``apply_shift(moving, (dy, dx))`` lines up with
        ``reference``.

    Raises
    ------
    ValueError
        Images of different shapes.
    """
    from skimage.registration import phase_cross_correlation

    ref, mov = _plane(reference), _plane(moving)
    if ref.shape != mov.shape:
        raise ValueError(f"cannot register images of shapes {ref.shape} and {mov.shape}")
    shift, _, _ = phase_cross_correlation(ref, mov, upsample_factor=upsample_factor)
    return float(shift[0]), float(shift[1])


def apply_shift(image: np.ndarray, shift: Sequence[float]) -> np.ndarray:
    """``image`` moved by ``shift = (dy, dx)`` pixels (cubic spline, mirrored edges).

    Parameters
    ----------
    image
        ``(Y, X)`` or ``(C, Y, X)``; channels move together.
    shift
        ``(dy, dx)`` in pixels, as :func:`estimate_shift` gives.

    Returns
    -------
    numpy.ndarray
        float32, the shape of ``image``.
    """
    array = np.asarray(image, dtype=np.float32)
    full = (0.0,) * (array.ndim - 2) + (float(shift[0]), float(shift[1]))
    if not any(full):
        return array
    # Mirrored edges keep the border texture instead of a dark or smeared band.
    return ndimage.shift(array, full, order=3, mode="mirror").astype(np.float32, copy=False)


def register_to(
    reference: np.ndarray, moving: np.ndarray, upsample_factor: int = 20
) -> tuple[np.ndarray, tuple[float, float]]:
    """``moving`` shifted onto ``reference``, and the shift ``(dy, dx)`` in pixels."""
    shift = estimate_shift(reference, moving, upsample_factor)
    return apply_shift(moving, shift), shift
