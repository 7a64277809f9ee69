"""Tile and block geometry, blend weights and stitching (pure numpy)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage

from hpcdeconv.inference.tiling import (
    BLEND_MODES,
    blend_weights,
    block_grid,
    pad_to,
    stitch,
    tile_grid,
)

# Grids in which only neighbouring tiles share weighted voxels ...
SPARSE_GRIDS = [
    ((40, 56, 72), 16, 4),
    ((41, 17, 30), (16, 16, 12), (4, 6, 5)),
    ((37, 50), (16, 12), (6, 3)),
    ((16, 16), 16, 4),
    ((5, 40), (5, 16), (0, 5)),
]
# ... and one with stride 1, where up to 8 tiles per axis share a voxel.
GRIDS = [*SPARSE_GRIDS, ((17, 33, 20), 8, 7)]


def _counts(shape: tuple[int, ...], regions: list[tuple[slice, ...]]) -> np.ndarray:
    count = np.zeros(shape, dtype=int)
    for region in regions:
        count[region] += 1
    return count


def test_tile_starts_follow_stride_and_last_tile_ends_at_border() -> None:
    starts = [t.source[0].start for t in tile_grid((40,), 16, 4)]
    assert starts == [0, 12, 24]
    tiles = tile_grid((41,), 16, 4)
    assert [t.source[0].start for t in tiles] == [0, 12, 24, 25]
    assert [t.overlaps[0] for t in tiles] == [(0, 4), (4, 4), (4, 15), (15, 0)]
    assert [(t.dest[0].start, t.dest[0].stop) for t in tiles] == [
        (0, 14),
        (14, 26),
        (26, 32),
        (32, 41),
    ]


@pytest.mark.parametrize(("shape", "tile", "overlap"), GRIDS)
def test_tiles_cover_volume_and_cores_partition_it(shape, tile, overlap) -> None:
    tiles = tile_grid(shape, tile, overlap)
    ndim = len(shape)
    tile = (tile,) * ndim if isinstance(tile, int) else tile
    overlap = (overlap,) * ndim if isinstance(overlap, int) else overlap
    for t in tiles:
        assert t.shape == tuple(tile)
        assert all(s.start >= 0 and s.stop <= n for s, n in zip(t.source, shape, strict=True))
        for s, c, d in zip(t.source, t.core, t.dest, strict=True):
            assert (d.start, d.stop) == (s.start + c.start, s.start + c.stop)
    assert _counts(shape, [t.source for t in tiles]).min() >= 1
    np.testing.assert_array_equal(_counts(shape, [t.dest for t in tiles]), 1)


@pytest.mark.parametrize(("shape", "tile", "overlap"), GRIDS)
def test_neighbours_share_overlap_and_cores_keep_half_of_it(shape, tile, overlap) -> None:
    tiles = tile_grid(shape, tile, overlap)
    overlap = (overlap,) * len(shape) if isinstance(overlap, int) else overlap
    for axis, o in enumerate(overlap):
        spans = sorted({(t.source[axis].start, t.source[axis].stop) for t in tiles})
        for (_, stop), (start, _) in itertools.pairwise(spans):
            assert stop - start >= o
        # Kept voxels lie at least overlap // 2 from any edge that is not the volume border.
        for t in tiles:
            s, d = t.source[axis], t.dest[axis]
            assert s.start == 0 or d.start - s.start >= o // 2
            assert s.stop == shape[axis] or s.stop - d.stop >= o // 2


def test_small_volume_is_padded_symmetrically_before_tiling() -> None:
    with pytest.raises(ValueError, match="smaller than the tile"):
        tile_grid((5, 40), 16, 4)
    widths = pad_to((5, 40), 16)
    assert widths == ((5, 6), (0, 0))
    assert pad_to((5, 40, 9), (6, 8, 9)) == ((0, 1), (0, 0), (0, 0))
    padded = np.pad(np.ones((5, 40)), widths, mode="symmetric")
    tiles = tile_grid(padded.shape, 16, 4)
    np.testing.assert_array_equal(_counts(padded.shape, [t.dest for t in tiles]), 1)


def test_tile_grid_rejects_bad_geometry() -> None:
    with pytest.raises(ValueError, match="overlap < tile"):
        tile_grid((40, 40), 16, 16)
    with pytest.raises(ValueError, match="entries"):
        tile_grid((40, 40), (16, 16, 16), 4)


@pytest.mark.parametrize("mode", BLEND_MODES)
def test_constant_tile_outputs_stitch_to_the_constant(mode) -> None:
    shape = (40, 56, 72)
    tiles = tile_grid(shape, 16, 6)
    out = stitch(((t, np.full(t.shape, 3.25, np.float32)) for t in tiles), shape, mode)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, 3.25, rtol=1e-6)


@pytest.mark.parametrize("mode", BLEND_MODES)
@pytest.mark.parametrize(("shape", "tile", "overlap"), GRIDS)
def test_stitching_exact_tile_crops_reproduces_the_volume(rng, mode, shape, tile, overlap) -> None:
    volume = rng.standard_normal(shape).astype(np.float32)
    tiles = tile_grid(shape, tile, overlap)
    out = stitch(((t, volume[t.source]) for t in tiles), shape, mode)
    np.testing.assert_allclose(out, volume, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["linear", "gaussian"])
@pytest.mark.parametrize(("shape", "tile", "overlap"), GRIDS)
def test_accumulated_weight_is_never_small(mode, shape, tile, overlap) -> None:
    total = np.zeros(shape)
    for t in tile_grid(shape, tile, overlap):
        w = blend_weights(t.shape, t.overlaps, mode)
        assert w.dtype == np.float32 and w.shape == t.shape
        total[t.source] += w
    assert total.min() >= 0.5 ** len(shape)


@pytest.mark.parametrize("mode", ["linear", "gaussian"])
@pytest.mark.parametrize(("shape", "tile", "overlap"), SPARSE_GRIDS)
def test_neighbour_weights_form_a_partition_of_unity(mode, shape, tile, overlap) -> None:
    total = np.zeros(shape)
    for t in tile_grid(shape, tile, overlap):
        total[t.source] += blend_weights(t.shape, t.overlaps, mode)
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


@pytest.mark.parametrize(("shape", "tile", "overlap"), GRIDS)
def test_constant_weights_are_the_core(shape, tile, overlap) -> None:
    for t in tile_grid(shape, tile, overlap):
        expected = np.zeros(t.shape, np.float32)
        expected[t.core] = 1
        np.testing.assert_array_equal(blend_weights(t.shape, t.overlaps, "constant"), expected)


@pytest.mark.parametrize("mode", BLEND_MODES)
def test_border_sides_are_not_attenuated(mode) -> None:
    w = blend_weights((16, 12), ((0, 6), (4, 0)), mode)
    # Low side of axis 0 and high side of axis 1 touch the volume border: flat up to the edge.
    np.testing.assert_array_equal(w[0], w[7])
    np.testing.assert_array_equal(w[:, -1], w[:, 6])
    assert w[0, -1] == 1.0
    np.testing.assert_array_equal(blend_weights((9, 7, 5), 0, mode), 1.0)


@pytest.mark.parametrize("mode", ["linear", "gaussian"])
@pytest.mark.parametrize(("overlap", "zero"), [(10, 3), (16, 4), (4, 1), (2, 1), (1, 0)])
def test_smooth_weights_vanish_within_the_exactness_margin(mode, overlap, zero) -> None:
    w = blend_weights((24,), overlap, mode)
    assert zero == (overlap + 2) // 4
    np.testing.assert_array_equal(w[:zero], 0.0)
    np.testing.assert_array_equal(w[::-1][:zero], 0.0)
    assert w[zero] > 0 and w[-1 - zero] > 0
    # Rising monotonically, in steps no larger than the ramp allows (no jump).
    assert np.all(np.diff(w[:12]) >= 0)
    if overlap >= 10:
        assert np.abs(np.diff(w)).max() <= 2.0 * 2.0 / overlap


def test_blend_weights_and_stitch_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown blend mode"):
        blend_weights((8, 8), 2, "cosine")
    with pytest.raises(ValueError, match=r"\[0, tile\)"):
        blend_weights((8, 8), 8, "linear")
    tiles = tile_grid((20, 20), 8, 2)
    with pytest.raises(ValueError, match="do not cover"):
        stitch(((t, np.zeros(t.shape)) for t in tiles[1:]), (20, 20), "linear")
    with pytest.raises(ValueError, match="expected"):
        stitch([(tiles[0], np.zeros((8, 7)))], (20, 20), "constant")


BLOCKS = [
    ((40, 56, 72), (16, 32, 32), 5, (8, 16, 16)),
    ((10, 33), (8, 16), 12, (4, 8)),
    ((30, 31, 7), 10, (3, 0, 2), (5, 10, 1)),
]


@pytest.mark.parametrize(("shape", "block", "halo", "chunks"), BLOCKS)
def test_block_writes_partition_volume_along_chunks(shape, block, halo, chunks) -> None:
    ndim = len(shape)
    halo = (halo,) * ndim if isinstance(halo, int) else halo
    chunks = (chunks,) * ndim if isinstance(chunks, int) else chunks
    blocks = block_grid(shape, block, halo, chunks)
    np.testing.assert_array_equal(_counts(shape, [b.write for b in blocks]), 1)
    for b in blocks:
        for axis, (w, r, p, c) in enumerate(zip(b.write, b.read, b.pad, b.crop, strict=True)):
            n, h = shape[axis], halo[axis]
            assert w.start % chunks[axis] == 0
            assert w.stop % chunks[axis] == 0 or w.stop == n
            assert (r.start, r.stop) == (max(0, w.start - h), min(n, w.stop + h))
            assert p[0] + (r.stop - r.start) + p[1] == (w.stop - w.start) + 2 * h
            assert (c.start, c.stop) == (h, h + w.stop - w.start)


@pytest.mark.parametrize(("shape", "block", "halo", "chunks"), BLOCKS)
def test_padded_block_is_the_window_of_the_padded_volume(rng, shape, block, halo, chunks) -> None:
    volume = rng.standard_normal(shape)
    halo_t = (halo,) * len(shape) if isinstance(halo, int) else halo
    padded_volume = np.pad(volume, [(h, h) for h in halo_t], mode="symmetric")
    for b in block_grid(shape, block, halo, chunks):
        padded = np.pad(volume[b.read], b.pad, mode="symmetric")
        window = tuple(slice(w.start, w.stop + 2 * h) for w, h in zip(b.write, halo_t, strict=True))
        np.testing.assert_array_equal(padded, padded_volume[window])
        np.testing.assert_array_equal(padded[b.crop], volume[b.write])


def _filter(volume: np.ndarray, kernel: np.ndarray, times: int) -> np.ndarray:
    """Stack of zero-padded correlations: receptive-field radius ``times``."""
    for _ in range(times):
        volume = ndimage.correlate(volume, kernel, mode="constant")
    return volume


@pytest.mark.parametrize(("halo", "exact"), [(3, True), (4, True), (2, False)])
def test_blockwise_processing_with_halo_matches_whole_volume(rng, halo, exact) -> None:
    shape, radius = (24, 40, 36), 3
    volume = rng.standard_normal(shape)
    kernel = rng.standard_normal((3, 3, 3)) / 5
    reference = _filter(np.pad(volume, halo, mode="symmetric"), kernel, radius)
    reference = reference[(slice(halo, -halo),) * 3]
    out = np.full(shape, np.nan)
    for b in block_grid(shape, (8, 16, 12), halo, (8, 8, 4)):
        padded = np.pad(volume[b.read], b.pad, mode="symmetric")
        out[b.write] = _filter(padded, kernel, radius)[b.crop]
    error = np.abs(out - reference).max()
    assert error < 1e-12 if exact else error > 1e-3


def test_block_grid_rejects_bad_geometry() -> None:
    with pytest.raises(ValueError, match="multiple of the output chunks"):
        block_grid((40, 40), (24, 32), 4, (16, 16))
    with pytest.raises(ValueError, match="must not be negative"):
        block_grid((40, 40), 32, -1, 16)
    with pytest.raises(ValueError, match="entries"):
        block_grid((40, 40), (32, 32, 32), 4, 16)
    with pytest.raises(ValueError, match="positive"):
        block_grid((40, 40), 0, 4, 16)
