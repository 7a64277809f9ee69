"""Synthetic ground truth: microtubule networks (3D volumes or 2D images) and 2D textures.

Microtubules are persistent random walks through the volume, rendered as tubes with a
Gaussian cross-section. Rendering is local: points sampled every half voxel along each
filament are splatted (bi- or trilinearly) onto the grid (a line density), and one
separable Gaussian filter over the whole grid turns all lines into tubes at once. Memory stays at
a few volumes and the cost grows with total filament length plus the volume size, never
with filaments times voxels.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy import ndimage

from hpcdeconv.errors import ConfigError

__all__ = ["microtubules", "texture_2d"]

_STEP = 1.0  # voxels between direction updates of a filament
_SAMPLES_PER_STEP = 2  # render points per step, i.e. every half voxel
_SPLAT_VARIANCE = 1.0 / 6.0  # mean per-axis variance a (bi/tri)linear splat adds


def _unit(vectors: np.ndarray) -> np.ndarray:
    """Normalise rows of ``(N, D)`` to unit length."""
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def _walk(
    start: np.ndarray,
    direction: np.ndarray,
    stiffness: float,
    bounds: tuple[np.ndarray, np.ndarray],
    max_steps: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Persistent random walks with unit steps for ``N`` filaments at once.

    The tangent follows ``d <- normalise(stiffness * d + (1 - stiffness) * u)`` with ``u``
    uniform on the sphere, so ``stiffness = 1`` gives straight lines and 0 a random walk.
    Walking stops once every filament has left ``bounds`` (lower, upper corners) or after
    ``max_steps``.

    Returns
    -------
    numpy.ndarray
        Node positions, shape ``(S + 1, N, D)`` with ``S <= max_steps`` and ``D`` the
        number of axes of ``start`` ``(N, D)``.
    """
    nodes = [start]
    for _ in range(max_steps):
        kick = _unit(rng.standard_normal(direction.shape))
        direction = _unit(stiffness * direction + (1.0 - stiffness) * kick)
        nodes.append(nodes[-1] + _STEP * direction)
        if not np.any(_inside(nodes[-1], bounds)):
            break
    return np.stack(nodes)


def _inside(points: np.ndarray, bounds: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Whether points ``(..., D)`` lie inside the box ``bounds``; shape ``(...)``."""
    return np.all((points >= bounds[0]) & (points <= bounds[1]), axis=-1)


def _densify(nodes: np.ndarray) -> np.ndarray:
    """Insert points between consecutive nodes: ``(S+1, N, D) -> (S*m+1, N, D)``."""
    fractions = np.arange(_SAMPLES_PER_STEP) / _SAMPLES_PER_STEP
    segments = nodes[:-1, None] + fractions[None, :, None, None] * np.diff(nodes, axis=0)[:, None]
    dense = segments.reshape(-1, *nodes.shape[1:])
    return np.concatenate([dense, nodes[-1:]], axis=0)


def _first_run(points: np.ndarray, bounds: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Mask of each filament's points ``(P, N, D)`` before it first leaves ``bounds``.

    Returns
    -------
    numpy.ndarray
        Boolean ``(P, N)``; a filament that has left is not drawn again if it wanders back.
    """
    return np.logical_and.accumulate(_inside(points, bounds), axis=0)


def _splat_linear(volume: np.ndarray, points: np.ndarray, weights: np.ndarray) -> None:
    """Add ``weights`` ``(P,)`` at sub-voxel ``points`` ``(P, D)`` into ``volume`` in place.

    Multilinear weights over the ``2**D`` corners (``D = volume.ndim``). The points must lie
    at least one voxel inside the far faces of ``volume``.
    """
    base = np.floor(points).astype(np.int64)
    frac = points - base
    linear, shares = [], []
    for corner in np.ndindex(*(2,) * volume.ndim):
        offset = np.asarray(corner)
        linear.append(np.ravel_multi_index((base + offset).T, volume.shape))
        shares.append(np.prod(np.where(offset == 1, frac, 1.0 - frac), axis=1) * weights)
    flat = volume.reshape(-1)
    flat += np.bincount(np.concatenate(linear), np.concatenate(shares), minlength=flat.size)


def _filament_count(shape: tuple[int, ...], per_mvoxel: float) -> int:
    return max(1, round(per_mvoxel * float(np.prod(shape)) / 1e6))


def microtubules(
    shape: tuple[int, ...],
    rng: np.random.Generator,
    filaments_per_mvoxel: float = 60.0,
    radius: float = 1.2,
    intensity_range: tuple[float, float] = (0.4, 1.0),
    stiffness: float = 0.9,
) -> np.ndarray:
    """Random network of curved filaments with Gaussian cross-sections, in 3D or 2D.

    Each filament grows both ways from a uniform random point along a persistent random
    walk until it leaves the volume (in 2D the image, as in a TIRF view of microtubules).
    Its line density, scaled so that an isolated tube peaks near its own intensity drawn
    from ``intensity_range``, is blurred by a Gaussian of standard deviation ``radius``.
    Overlapping filaments add, as fluorescence does, and saturate at 1.

    Parameters
    ----------
    shape
        Volume shape ``(Z, Y, X)`` or image shape ``(Y, X)``.
    rng
        Source of randomness; the same state gives the same volume.
    filaments_per_mvoxel
        Number of filaments per million voxels (pixels in 2D; at least one is drawn).
    radius
        Standard deviation of the tube cross-section, in voxels.
    intensity_range
        Range of the per-filament peak intensity, within ``[0, 1]``.
    stiffness
        Persistence of the tangent per voxel step, in ``[0, 1]``.

    Returns
    -------
    numpy.ndarray
        Float32 in ``[0, 1]`` of ``shape``.

    Raises
    ------
    ConfigError
        A shape of other than 2 or 3 positive sides, or a setting out of range.
    """
    _check_microtubule_args(shape, filaments_per_mvoxel, radius, intensity_range, stiffness)
    n_filaments = _filament_count(shape, filaments_per_mvoxel)
    extent = np.asarray(shape, dtype=np.float64) - 1.0
    ndim = len(shape)
    start = rng.random((n_filaments, ndim)) * extent
    direction = _unit(rng.standard_normal((n_filaments, ndim)))
    intensity = rng.uniform(*intensity_range, size=n_filaments)
    # Filaments are drawn until 3 radii outside the volume so that tubes running just
    # outside still shine in; the grid is padded by that much and cropped at the end.
    pad = int(np.ceil(3.0 * radius)) + 1
    bounds = (np.full(ndim, -3.0 * radius), extent + 3.0 * radius)
    # Only a very floppy walk stays inside longer; the cap bounds its cost.
    max_steps = int(np.ceil(2 * max(shape) / _STEP))
    # A line of density I * 2 pi r^2 blurred by a 3D Gaussian of std r (I sqrt(2 pi) r by a
    # 2D one) peaks at I on its axis; each render point stands for 1 / _SAMPLES_PER_STEP of
    # a step. The 3D expression is kept as written so that 3D phantoms stay bit-identical.
    if ndim == 3:
        line_density = intensity * 2.0 * np.pi * radius**2 * (_STEP / _SAMPLES_PER_STEP)
    else:
        line_density = intensity * np.sqrt(2.0 * np.pi) * radius * (_STEP / _SAMPLES_PER_STEP)
    points, weights = [], []
    for sense in (1.0, -1.0):
        dense = _densify(_walk(start, sense * direction, stiffness, bounds, max_steps, rng))
        if sense < 0:
            dense = dense[1:]  # the start point is already drawn by the forward walk
        keep = _first_run(dense, bounds)
        points.append(dense[keep])
        weights.append(np.broadcast_to(line_density, keep.shape)[keep])
    volume = np.zeros(tuple(n + 2 * pad for n in shape), dtype=np.float32)
    _splat_linear(volume, np.concatenate(points) + pad, np.concatenate(weights))
    # The linear splat already spreads each point by about 1/6 voxel^2 per axis.
    filter_sigma = np.sqrt(max(radius**2 - _SPLAT_VARIANCE, 0.25 * radius**2))
    volume = ndimage.gaussian_filter(volume, filter_sigma, mode="constant")
    volume = volume[tuple(slice(pad, pad + n) for n in shape)]
    return np.clip(volume, 0.0, 1.0, out=volume)


def _check_microtubule_args(
    shape: tuple[int, ...],
    filaments_per_mvoxel: float,
    radius: float,
    intensity_range: tuple[float, float],
    stiffness: float,
) -> None:
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ConfigError(f"microtubule phantoms need a positive 2D or 3D shape, got {shape}")
    if filaments_per_mvoxel < 0 or radius <= 0:
        raise ConfigError("filaments_per_mvoxel must be >= 0 and radius > 0")
    low, high = intensity_range
    if not 0.0 <= low <= high <= 1.0:
        raise ConfigError(f"intensity_range must satisfy 0 <= low <= high <= 1, got {low, high}")
    if not 0.0 <= stiffness <= 1.0:
        raise ConfigError(f"stiffness must lie in [0, 1], got {stiffness}")


def _smooth_noise(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to ``[0, 1]``, shape ``(Y, X)``."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    low, high = noise.min(), noise.max()
    return (noise - low) / (high - low)


def _cells(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Soft random ellipses, each filled with its own brightness times a smooth texture."""
    size = min(shape)
    n_cells = max(1, round(8 * shape[0] * shape[1] / size**2))
    yy, xx = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    fine = _smooth_noise(shape, 1.5, rng)
    coarse = _smooth_noise(shape, 6.0, rng)
    texture = 0.3 + 0.4 * coarse + 0.3 * fine
    image = np.zeros(shape)
    edge = max(1.0, 0.01 * size)
    for _ in range(n_cells):
        cy, cx = rng.random(2) * shape
        semi = rng.uniform(0.06, 0.16, size=2) * size
        angle = rng.uniform(0.0, np.pi)
        cos, sin = np.cos(angle), np.sin(angle)
        u = (cos * (yy - cy) + sin * (xx - cx)) / semi[0]
        v = (-sin * (yy - cy) + cos * (xx - cx)) / semi[1]
        # Signed distance-like coordinate in pixels; a logistic step gives a soft membrane.
        depth = (1.0 - np.sqrt(u**2 + v**2)) * semi.min()
        mask = 0.5 * (1.0 + np.tanh(depth / edge))
        image = np.maximum(image, rng.uniform(0.5, 1.0) * mask)
    return image * texture


def _points(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Sparse sub-pixel emitters of random brightness, about one per 400 pixels."""
    n_points = max(1, round(shape[0] * shape[1] / 400))
    position = rng.random((n_points, 2)) * (np.asarray(shape) - 1)
    brightness = rng.uniform(0.2, 1.0, size=n_points)
    base = np.floor(position).astype(np.int64)
    frac = position - base
    image = np.zeros(shape)
    for corner in np.ndindex(2, 2):
        offset = np.asarray(corner)
        share = np.prod(np.where(offset == 1, frac, 1.0 - frac), axis=1)
        index = np.minimum(base + offset, np.asarray(shape) - 1)
        np.add.at(image, (index[:, 0], index[:, 1]), brightness * share)
    return image


def texture_2d(
    shape: tuple[int, int],
    rng: np.random.Generator,
    kind: Literal["cells", "points"] = "cells",
) -> np.ndarray:
    """2D textured specimen for PSF-regression training.

    Parameters
    ----------
    shape
        Image shape ``(Y, X)``.
    rng
        Source of randomness; the same state gives the same image.
    kind
        ``"cells"``: soft elliptical cell bodies with smooth internal texture, covering a
        sizeable part of the field. ``"points"``: sparse sub-pixel point emitters.

    Returns
    -------
    numpy.ndarray
        Image, shape ``(Y, X)``, float32 in ``[0, 1]``.
    """
    if len(shape) != 2 or min(shape) < 2:
        raise ConfigError(f"texture_2d needs a 2D shape of at least 2x2, got {shape}")
    if kind == "cells":
        image = _cells(shape, rng)
    elif kind == "points":
        image = _points(shape, rng)
    else:
        raise ConfigError(f"unknown texture kind {kind!r}; expected 'cells' or 'points'")
    return np.clip(image, 0.0, 1.0).astype(np.float32)
