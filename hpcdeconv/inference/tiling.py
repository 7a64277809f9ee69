"""Tile and block geometry for patch-wise inference, and the pure stitching of tile outputs.

Two levels of decomposition, both plain data:

* **Tiles** are what the network sees at once (e.g. 64³ with 16 voxels of overlap). A
  :class:`Tile` records where it reads from, which part of its output is kept when the
  outputs are cut and pasted (``"constant"`` blending), where that part goes, and how many
  voxels it shares with each neighbour (which the smooth blendings need).
* **Blocks** are what one distributed task reads and writes. A :class:`Block` writes an
  integer number of output chunks and reads that region grown by a halo at least as large
  as the network's receptive-field radius; where the halo leaves the volume, the block is
  padded symmetrically (numpy ``mode="symmetric"``, which is dask's ``boundary="reflect"``).

Tiling, blending and writing are separate: nothing here runs a model or touches storage.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from scipy import special

BlendMode = Literal["constant", "linear", "gaussian"]
BLEND_MODES: tuple[str, ...] = get_args(BlendMode)

Slices = tuple[slice, ...]
Sides = tuple[tuple[int, int], ...]

# Width of the Gaussian cross-fade in units of its ramp (the middle half of the shared band):
# the ramp spans ±2 sigma, i.e. sigma = overlap / 8 voxels. Narrower makes the hand-over at
# the band centre steeper, i.e. closer to a seam.
_GAUSSIAN_SIGMA = 0.25


@dataclass(frozen=True)
class Tile:
    """One network input window and what becomes of its output.

    Attributes
    ----------
    source
        Region of the volume the network sees; the output has the same shape and covers
        the same region (the network preserves shape).
    core
        Part of the tile output kept by ``"constant"`` blending, in tile coordinates.
        The cores of a :func:`tile_grid` partition the volume.
    dest
        Where ``core`` lies in the volume: ``source`` shifted by the core offset.
    overlaps
        Per axis, ``(before, after)``: voxels shared with the previous / next tile along
        that axis; 0 where the tile touches the volume border.
    """

    source: Slices
    core: Slices
    dest: Slices
    overlaps: Sides

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape of the tile, e.g. ``(Z, Y, X)``."""
        return tuple(s.stop - s.start for s in self.source)


@dataclass(frozen=True)
class Block:
    """One unit of distributed work: read ``read``, pad by ``pad``, process, keep ``crop``.

    Attributes
    ----------
    index
        Position of the block in the block grid.
    write
        Output region this block owns: whole output chunks (the last one along an axis
        may be cut by the volume border).
    read
        ``write`` grown by the halo on every side, clipped to the volume.
    pad
        Per axis, ``(before, after)`` symmetric padding that restores the halo the clipping
        removed; the padded block has shape ``write`` + 2 * halo.
    crop
        Region of the processed padded block that equals ``write``.
    border
        Per axis, ``(before, after)``: whether that side of ``read`` is the volume's own
        border (else it is an edge inside the volume, where the halo ends).
    """

    index: tuple[int, ...]
    write: Slices
    read: Slices
    pad: Sides
    crop: Slices
    border: tuple[tuple[bool, bool], ...] = ()


def per_axis(value: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    """Broadcast an int to ``ndim`` axes, or check that a sequence has ``ndim`` entries."""
    if isinstance(value, int | np.integer):
        return (int(value),) * ndim
    values = tuple(int(v) for v in value)
    if len(values) != ndim:
        raise ValueError(f"{name} {values} has {len(values)} entries, expected {ndim}")
    return values


def pad_to(shape: Sequence[int], minimum: int | Sequence[int]) -> Sides:
    """Symmetric pad widths that make every axis of ``shape`` at least ``minimum`` long.

    A volume smaller than a tile along some axis is padded by the caller with
    ``np.pad(volume, pad_to(volume.shape, tile), mode="symmetric")`` before
    :func:`tile_grid`; the output is cropped back with the same widths. The extra voxel
    of an odd total goes after.

    Parameters
    ----------
    shape
        Array shape, e.g. ``(Z, Y, X)``.
    minimum
        Smallest length wanted per axis (an int applies to every axis).

    Returns
    -------
    tuple of (int, int)
        ``(before, after)`` per axis, as :func:`numpy.pad` takes them.
    """
    minimum = per_axis(minimum, len(shape), "minimum")
    widths = []
    for size, low in zip(shape, minimum, strict=True):
        total = max(0, low - size)
        widths.append((total // 2, total - total // 2))
    return tuple(widths)


def _axis_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile starts along one axis: stride ``tile - overlap``, last tile ending at the border."""
    step = tile - overlap
    count = -(-(size - overlap) // step)
    return [i * step for i in range(count - 1)] + [size - tile]


def _core_1d(length: int, before: int, after: int) -> slice:
    """Kept part of a tile along one axis: half of each shared band goes to each neighbour.

    The boundary between two neighbours sharing ``o`` voxels lies ``o // 2`` voxels into
    the later tile, so ``before // 2`` is cut at the start and ``after - after // 2`` at
    the end; neighbouring cores therefore meet exactly.
    """
    return slice(before // 2, length - (after - after // 2))


def _axis_tiles(size: int, tile: int, overlap: int) -> list[tuple[slice, slice, tuple[int, int]]]:
    """``(source, core, overlaps)`` of every tile along one axis."""
    starts = _axis_starts(size, tile, overlap)
    out = []
    for i, start in enumerate(starts):
        before = starts[i - 1] + tile - start if i > 0 else 0
        after = start + tile - starts[i + 1] if i + 1 < len(starts) else 0
        out.append((slice(start, start + tile), _core_1d(tile, before, after), (before, after)))
    return out


def tile_grid(
    shape: Sequence[int], tile: int | Sequence[int], overlap: int | Sequence[int]
) -> list[Tile]:
    """Cover a 2D or 3D volume with equal tiles that overlap their neighbours.

    Along each axis tiles start every ``tile - overlap`` voxels; the last one is shifted
    back to end at the border (so it may share more than ``overlap`` voxels), never cut.

    Parameters
    ----------
    shape
        Volume shape, e.g. ``(Z, Y, X)``; every axis must be at least the tile size
        (pad with :func:`pad_to` first).
    tile
        Tile shape (an int applies to every axis).
    overlap
        Minimum number of voxels shared by neighbouring tiles, ``0 <= overlap < tile``.

    Returns
    -------
    list of Tile
        In C order of tile position (last axis fastest).
    """
    ndim = len(shape)
    tile = per_axis(tile, ndim, "tile")
    overlap = per_axis(overlap, ndim, "overlap")
    for axis, (size, t, o) in enumerate(zip(shape, tile, overlap, strict=True)):
        if t < 1 or not 0 <= o < t:
            raise ValueError(f"axis {axis}: need tile >= 1 and 0 <= overlap < tile, got {t}, {o}")
        if size < t:
            raise ValueError(
                f"axis {axis}: volume length {size} is smaller than the tile {t}; pad it first"
            )
    axes = [_axis_tiles(s, t, o) for s, t, o in zip(shape, tile, overlap, strict=True)]
    tiles = []
    for combo in itertools.product(*axes):
        source = tuple(c[0] for c in combo)
        core = tuple(c[1] for c in combo)
        dest = tuple(
            slice(s.start + c.start, s.start + c.stop) for s, c in zip(source, core, strict=True)
        )
        tiles.append(Tile(source, core, dest, tuple(c[2] for c in combo)))
    return tiles


def _crossfade(centres: np.ndarray, band: int, mode: str) -> np.ndarray:
    """Weight of a tile across a band of ``band`` voxels it shares, rising into the tile.

    ``centres`` are voxel centres measured from the tile edge. The outer quarter of the band
    gets weight 0 and the inner quarter 1; in between the weight rises along
    ``s ∈ [0, 1]`` either linearly or as a Gaussian CDF rescaled to reach exactly 0 and 1.
    Both satisfy ``f(s) + f(1 - s) = 1``, so two neighbours' weights sum to 1 across the band.
    """
    s = np.clip((centres - band / 4) / (band / 2), 0.0, 1.0)
    if mode == "linear":
        return s
    floor = special.ndtr(-0.5 / _GAUSSIAN_SIGMA)
    return (special.ndtr((s - 0.5) / _GAUSSIAN_SIGMA) - floor) / (1.0 - 2.0 * floor)


def _profile(length: int, before: int, after: int, mode: str) -> np.ndarray:
    """1D blending weights of one tile axis, shape ``(length,)``, float64."""
    if mode == "constant":
        profile = np.zeros(length)
        profile[_core_1d(length, before, after)] = 1.0
        return profile
    centres = np.arange(length) + 0.5
    profile = np.ones(length)
    if before:
        profile = np.minimum(profile, _crossfade(centres, before, mode))
    if after:
        profile = np.minimum(profile, _crossfade(length - centres, after, mode))
    return profile


def blend_weights(
    tile_shape: Sequence[int], overlap: int | Sequence[tuple[int, int]], mode: BlendMode
) -> np.ndarray:
    """Weights of one tile's output for blending with its neighbours.

    Stitching computes ``out = Σ_t w_t · y_t / Σ_t w_t`` over the tiles ``t`` covering a
    voxel. The weights are separable, ``w(z, y, x) = p_z(z) p_y(y) p_x(x)``, and each 1D
    profile depends on the voxels shared with the neighbour on either side (0 at the volume
    border, where the profile stays 1 so border voxels are never attenuated):

    * ``"constant"``: 1 on the tile's core, 0 elsewhere; a shared band of ``o`` voxels is
      split ``o // 2`` / ``o - o // 2``. The cores partition the volume, so the result equals
      whole-volume inference exactly when the model's receptive-field radius ``r`` satisfies
      ``r <= overlap // 2`` (every kept voxel then sees only real data). Seams otherwise.
    * ``"linear"``: across each shared band the weight is 0 on the outer quarter, rises
      linearly over the middle half and is 1 on the inner quarter; two neighbours' weights
      sum to 1 across their band. No seams: the blend moves from one tile to the other
      over ``o / 2`` voxels. Exact when ``r <= (overlap + 2) // 4``, because voxels within
      ``r`` of a tile edge then get weight 0.
    * ``"gaussian"``: like ``"linear"``, but the rise is a Gaussian CDF with standard
      deviation ``o / 8`` voxels (rescaled to reach 0 and 1): a smooth slope everywhere,
      but the hand-over at the band centre is about 1.7 times steeper than ``"linear"``.
      Same exactness condition.

    Every voxel of a tile's core has weight at least ``0.5**ndim``, so the accumulated
    weight of a covered voxel never approaches 0 (it is exactly 1 where only neighbouring
    tiles share voxels).

    Parameters
    ----------
    tile_shape
        Shape of the tile, e.g. ``(Z, Y, X)``.
    overlap
        Either an int (every side shares that many voxels: an interior tile) or, per axis,
        ``(before, after)`` shared voxels, as in :attr:`Tile.overlaps`.
    mode
        ``"constant"``, ``"linear"`` or ``"gaussian"``.

    Returns
    -------
    np.ndarray
        float32 array of shape ``tile_shape``.
    """
    if mode not in BLEND_MODES:
        raise ValueError(f"unknown blend mode {mode!r}; expected one of {', '.join(BLEND_MODES)}")
    shape = tuple(int(n) for n in tile_shape)
    if isinstance(overlap, int | np.integer):
        sides: Sides = ((int(overlap), int(overlap)),) * len(shape)
    else:
        sides = tuple((int(a), int(b)) for a, b in overlap)
    if len(sides) != len(shape):
        raise ValueError(f"overlap has {len(sides)} axes, the tile {len(shape)}")
    for n, (before, after) in zip(shape, sides, strict=True):
        if not (0 <= before < n and 0 <= after < n):
            raise ValueError(f"overlaps {sides} must lie in [0, tile) for tile {shape}")
    profiles = [_profile(n, a, b, mode) for n, (a, b) in zip(shape, sides, strict=True)]
    return functools.reduce(np.multiply.outer, profiles).astype(np.float32)


def stitch(
    tiles: Iterable[tuple[Tile, np.ndarray]], shape: Sequence[int], mode: BlendMode
) -> np.ndarray:
    """Blend tile outputs into one volume: ``Σ_t w_t · y_t / Σ_t w_t``.

    ``tiles`` may be a generator, so outputs can be produced and consumed one batch at a
    time. Weights come from :func:`blend_weights` with each tile's own overlaps; in
    ``"constant"`` mode only the cores are accumulated, so the result is an exact copy.

    Parameters
    ----------
    tiles
        ``(tile, output)`` pairs; ``output`` has shape ``tile.shape``, e.g. ``(Z, Y, X)``,
        or leading axes before it (channels, ``(C, Z, Y, X)``) that ``shape`` shares.
    shape
        Shape of the output volume, e.g. ``(Z, Y, X)`` or ``(C, Z, Y, X)``.
    mode
        Blend mode, see :func:`blend_weights`.

    Returns
    -------
    np.ndarray
        float32 volume of shape ``shape``.
    """
    if mode not in BLEND_MODES:
        raise ValueError(f"unknown blend mode {mode!r}; expected one of {', '.join(BLEND_MODES)}")
    total = np.zeros(tuple(shape), dtype=np.float32)
    weight: np.ndarray | None = None
    cache: dict[tuple[tuple[int, ...], Sides], np.ndarray] = {}
    for tile, output in tiles:
        lead = tuple(shape)[: len(shape) - len(tile.shape)]
        if output.shape != (*lead, *tile.shape):
            raise ValueError(
                f"tile output has shape {output.shape}, expected {(*lead, *tile.shape)}"
            )
        if weight is None:
            # One weight per voxel of the spatial axes, shared by the leading (channel) axes.
            weight = np.zeros(tuple(shape)[len(lead) :], dtype=np.float32)
        every = (slice(None),) * len(lead)
        if mode == "constant":
            total[(*every, *tile.dest)] += output[(*every, *tile.core)]
            weight[tile.dest] += 1.0
            continue
        key = (tile.shape, tile.overlaps)
        if key not in cache:
            cache[key] = blend_weights(tile.shape, tile.overlaps, mode)
        total[(*every, *tile.source)] += cache[key] * output
        weight[tile.source] += cache[key]
    if weight is None:
        raise ValueError("the tiles do not cover the whole volume")
    if not np.all(weight > 0):
        raise ValueError("the tiles do not cover the whole volume")
    return np.divide(total, weight, out=total)


def block_grid(
    shape: Sequence[int],
    block: int | Sequence[int],
    halo: int | Sequence[int],
    chunks: int | Sequence[int],
) -> list[Block]:
    """Split a volume into blocks that each write whole output chunks, read with a halo.

    Processing ``np.pad(volume[b.read], b.pad, mode="symmetric")`` and keeping ``b.crop``
    gives, for every block, exactly what processing the whole volume padded symmetrically
    by ``halo`` would give on ``b.write``, provided ``halo`` is at least the processing's
    receptive-field radius. No relation between ``block`` and ``halo`` is needed for this:
    the padded block always equals the matching window of the globally padded volume,
    even where the halo is wider than the block or the volume (repeated reflection on
    both sides). Large halos only cost reading and compute.

    Parameters
    ----------
    shape
        Volume shape, e.g. ``(Z, Y, X)``.
    block
        Block shape; a positive multiple of ``chunks`` on every axis.
    halo
        Voxels added on every side, ``>= 0``.
    chunks
        Output chunk shape.

    Returns
    -------
    list of Block
        In C order of block index; the ``write`` regions partition the volume.
    """
    ndim = len(shape)
    block = per_axis(block, ndim, "block")
    halo = per_axis(halo, ndim, "halo")
    chunks = per_axis(chunks, ndim, "chunks")
    if min(shape, default=1) < 1:
        raise ValueError(f"volume shape {tuple(shape)} has an empty axis")
    if min(chunks) < 1 or min(block) < 1:
        raise ValueError(f"block {block} and chunks {chunks} must be positive")
    if min(halo) < 0:
        raise ValueError(f"halo {halo} must not be negative")
    if any(b % c for b, c in zip(block, chunks, strict=True)):
        raise ValueError(f"block {block} must be a multiple of the output chunks {chunks}")
    counts = [-(-s // b) for s, b in zip(shape, block, strict=True)]
    blocks = []
    for index in itertools.product(*(range(n) for n in counts)):
        write, read, pad, crop, border = [], [], [], [], []
        for i, size, b, h in zip(index, shape, block, halo, strict=True):
            start, stop = i * b, min((i + 1) * b, size)
            lo, hi = max(0, start - h), min(size, stop + h)
            write.append(slice(start, stop))
            read.append(slice(lo, hi))
            pad.append((h - (start - lo), h - (hi - stop)))
            crop.append(slice(h, h + stop - start))
            border.append((lo == 0, hi == size))
        blocks.append(
            Block(tuple(index), tuple(write), tuple(read), tuple(pad), tuple(crop), tuple(border))
        )
    return blocks
