"""Geometric augmentation: 90° rotations in the YX plane and flips along each axis.

Only YX rotations are used because the axial sampling (and the PSF) of a widefield stack
differs from the lateral one; flips are symmetries of every axis. For 3D patches the
combinations form 16 distinct transforms (the 8 symmetries of the square times a Z flip).
When Y and X differ, quarter turns would change the shape, so only half turns are drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RotFlip:
    """One rotation/flip transform.

    Attributes
    ----------
    quarter_turns
        Number of 90° turns in the YX plane (0 to 3), in the sense of
        ``np.rot90(vol, k, axes=(-2, -1))``: ``out[..., i, j] = vol[..., j, X - 1 - i]``.
    flips
        Whether to reverse each axis, one entry per axis; applied after the rotation.
    """

    quarter_turns: int
    flips: tuple[bool, ...]


def draw_rot_flip(rng: np.random.Generator, shape: Sequence[int]) -> RotFlip:
    """Draw a transform uniformly among those that keep an array of ``shape`` its shape."""
    if len(shape) < 2:
        raise ValueError(f"need at least 2 axes (Y, X), got shape {tuple(shape)}")
    square = shape[-1] == shape[-2]
    turns = int(rng.integers(4)) if square else 2 * int(rng.integers(2))
    flips = tuple(bool(f) for f in rng.integers(2, size=len(shape)))
    return RotFlip(quarter_turns=turns, flips=flips)


def apply_rot_flip(vol: np.ndarray, transform: RotFlip) -> np.ndarray:
    """Apply ``transform`` to a ``(..., Y, X)`` array; returns a C-contiguous copy.

    Parameters
    ----------
    vol
        ``(Z, Y, X)`` or ``(Y, X)`` array.
    transform
        Rotation and flips, ``len(transform.flips) == vol.ndim``.
    """
    if len(transform.flips) != vol.ndim:
        raise ValueError(f"transform has {len(transform.flips)} flips for a {vol.ndim}D array")
    out = np.rot90(vol, k=transform.quarter_turns, axes=(-2, -1))
    axes = tuple(i for i, flip in enumerate(transform.flips) if flip)
    if axes:
        out = np.flip(out, axis=axes)
    # torch.from_numpy rejects the negative strides that rot90/flip views carry.
    return np.ascontiguousarray(out)


def random_rot_flip_many(
    arrays: Sequence[np.ndarray], rng: np.random.Generator
) -> list[np.ndarray]:
    """Apply one random rotation/flip identically to several arrays of the same shape.

    Parameters
    ----------
    arrays
        E.g. a paired sharp and blurred patch, each ``(Z, Y, X)``.
    rng
        Source of the draw; seed it per sample for reproducible augmentation.
    """
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"arrays must share one shape, got {sorted(shapes)}")
    transform = draw_rot_flip(rng, arrays[0].shape)
    return [apply_rot_flip(a, transform) for a in arrays]


def random_rot_flip(vol: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apply one random rotation/flip to a single ``(Z, Y, X)`` or ``(Y, X)`` array."""
    return random_rot_flip_many([vol], rng)[0]
