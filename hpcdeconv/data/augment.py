"""Geometric augmentation: 90° rotations in the YX plane and flips along each axis.

Only YX rotations are used because the axial sampling (and the PSF) of a widefield stack
differs from the lateral one; flips are symmetries of every axis. For 3D patches the
combinations form 16 distinct transforms (the 8 symmetries of the square times a Z flip),
for 2D images the 8 symmetries of the square. When Y and X differ, quarter turns would
change the shape, so only half turns are drawn. A channel axis (``(C, *S)`` arrays, channels
first) is never transformed: every channel gets the same transform.
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
        Whether to reverse each spatial axis, one entry per axis of ``S`` (``(Z, Y, X)`` or
        ``(Y, X)``); applied after the rotation.
    """

    quarter_turns: int
    flips: tuple[bool, ...]


def draw_rot_flip(rng: np.random.Generator, shape: Sequence[int]) -> RotFlip:
    """Draw a transform uniformly among those that keep an array of ``shape`` its shape.

    ``shape`` is the spatial shape ``(Z, Y, X)`` or ``(Y, X)`` (no channel axis).
    """
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
        ``(*S)`` or ``(C, *S)`` array, ``S`` = ``(Z, Y, X)`` or ``(Y, X)``.
    transform
        Rotation and flips; its flips apply to the last ``len(transform.flips)`` axes (the
        spatial ones), leading axes (channels) are left as they are.
    """
    lead = vol.ndim - len(transform.flips)
    if lead not in (0, 1):
        raise ValueError(f"transform has {len(transform.flips)} flips for a {vol.ndim}D array")
    out = np.rot90(vol, k=transform.quarter_turns, axes=(-2, -1))
    axes = tuple(lead + i for i, flip in enumerate(transform.flips) if flip)
    if axes:
        out = np.flip(out, axis=axes)
    # torch.from_numpy rejects the negative strides that rot90/flip views carry.
    return np.ascontiguousarray(out)


def random_rot_flip_many(
    arrays: Sequence[np.ndarray], rng: np.random.Generator, spatial_dims: int | None = None
) -> list[np.ndarray]:
    """Apply one random rotation/flip identically to several arrays of one spatial shape.

    Parameters
    ----------
    arrays
        E.g. a paired sharp and blurred patch, each ``(*S)`` or ``(C, *S)``; their channel
        counts may differ.
    rng
        Source of the draw; seed it per sample for reproducible augmentation.
    spatial_dims
        Number of trailing spatial axes (2 or 3); ``None``: every axis is spatial.
    """
    spatial = {a.shape[-(spatial_dims or a.ndim) :] for a in arrays}
    if len(spatial) != 1:
        raise ValueError(f"arrays must share one shape (spatial), got {sorted(spatial)}")
    transform = draw_rot_flip(rng, spatial.pop())
    return [apply_rot_flip(a, transform) for a in arrays]


def random_rot_flip(
    vol: np.ndarray, rng: np.random.Generator, spatial_dims: int | None = None
) -> np.ndarray:
    """Apply one random rotation/flip to a single ``(*S)`` or ``(C, *S)`` array."""
    return random_rot_flip_many([vol], rng, spatial_dims)[0]
