"""Bilinear interpolating masks of a PSF map's nodes (``phi_m`` of eq. 13).

A PSF map (:class:`~hpcdeconv.psfnet.psf_map.PSFMap`) has its nodes on a rectilinear grid
with positions ``c_y`` (``Gy``) and ``c_x`` (``Gx``), in pixels, where pixel ``i`` covers
``[i, i + 1)`` and is sampled at its centre ``i + 0.5``. The mask of node ``(i, j)`` is the
tensor product ``phi_ij(y, x) = w_i(y) w_j(x)`` of 1D piecewise-linear hats: ``w_i`` is 1
at ``c_i``, falls linearly to 0 at the neighbouring nodes and is constant (1 or 0) beyond
the outer nodes (:func:`hat_weights`). So ``sum_m phi_m = 1`` everywhere, and inside a
grid cell the local PSF is the bilinear interpolation of its four corner PSFs'
contributions. Masks may be evaluated beyond the image (negative or large pixel
positions), as the reflected borders of :mod:`hpcdeconv.classical.sv_rl` need.

:func:`interpolation_masks` gives the dense 2D masks; :func:`touching_nodes` the nodes
whose mask reaches a range of pixels (the PSFs a block of the image needs). The
overlap-add operator and the spatially-variant Richardson-Lucy that use them are in
:mod:`hpcdeconv.classical.sv_rl`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hpcdeconv.errors import InputError

__all__ = ["hat_weights", "interpolation_masks", "touching_nodes"]


def _centres(centres: np.ndarray) -> np.ndarray:
    """``centres`` as a strictly increasing float64 vector, else ``InputError``."""
    c = np.asarray(centres, np.float64).reshape(-1)
    if c.size == 0 or not np.isfinite(c).all() or (np.diff(c) <= 0).any():
        raise InputError(f"node positions must be finite and strictly increasing, got {c}")
    return c


def hat_weights(centres: np.ndarray, start: int, stop: int) -> np.ndarray:
    """1D interpolation weights of every node on the pixels ``start, …, stop - 1``.

    Parameters
    ----------
    centres
        ``(G,)`` strictly increasing node positions in pixels.
    start, stop
        Pixel range (image coordinates; may extend beyond the image), sampled at the
        pixel centres ``i + 0.5``.

    Returns
    -------
    numpy.ndarray
        ``(G, stop - start)`` float64: piecewise-linear hats, 1 at their node, 0 at the
        neighbouring nodes, constant beyond the outer nodes; every column sums to 1.
    """
    c = _centres(centres)
    positions = np.arange(start, stop, dtype=np.float64) + 0.5
    eye = np.eye(c.size)
    # np.interp is linear between nodes and holds the end values beyond them.
    return np.stack([np.interp(positions, c, eye[g]) for g in range(c.size)])


def interpolation_masks(
    centres: tuple[np.ndarray, np.ndarray], shape: Sequence[int], offset: Sequence[int] = (0, 0)
) -> np.ndarray:
    """The bilinear masks ``phi_m`` of eq. 13 on a ``(Y, X)`` field of view.

    Parameters
    ----------
    centres
        Node positions ``(Gy,)`` and ``(Gx,)`` in pixels.
    shape
        ``(Y, X)`` of the field of view.
    offset
        Image coordinates of its first pixel.

    Returns
    -------
    numpy.ndarray
        ``(Gy, Gx, Y, X)`` float64, ``phi[i, j] = w_i(y) w_j(x)``; sums to 1 over the nodes.
    """
    wy = hat_weights(centres[0], offset[0], offset[0] + shape[0])
    wx = hat_weights(centres[1], offset[1], offset[1] + shape[1])
    return wy[:, None, :, None] * wx[None, :, None, :]


def touching_nodes(centres: np.ndarray, start: int, stop: int) -> slice:
    """The nodes whose hat is positive somewhere on pixels ``start, …, stop - 1``.

    Returns
    -------
    slice
        A contiguous range of node indices (hats of a range of pixels touch consecutive
        nodes).
    """
    touched = np.flatnonzero((hat_weights(centres, start, stop) > 0).any(axis=1))
    return slice(int(touched[0]), int(touched[-1]) + 1)
