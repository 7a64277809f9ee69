"""Rotation/flip augmentation: voxel permutation, shared transform, group coverage."""

from __future__ import annotations

import numpy as np
import pytest

from hpcdeconv.data.augment import (
    RotFlip,
    apply_rot_flip,
    draw_rot_flip,
    random_rot_flip,
    random_rot_flip_many,
)


def _reference(vol: np.ndarray, t: RotFlip) -> np.ndarray:
    """Explicit index formula: quarter turn out[z, i, j] = in[z, j, X-1-i], then flips."""
    out = vol
    for _ in range(t.quarter_turns):
        Z, Y, X = out.shape
        turned = np.empty((Z, X, Y), out.dtype)
        for i in range(X):
            for j in range(Y):
                turned[:, i, j] = out[:, j, X - 1 - i]
        out = turned
    for axis, flip in enumerate(t.flips):
        if flip:
            out = out[(slice(None),) * axis + (slice(None, None, -1),)]
    return out


def test_matches_index_formula(rng: np.random.Generator) -> None:
    vol = rng.random((3, 4, 5))
    for turns in range(4):
        for flips in np.ndindex(2, 2, 2):
            t = RotFlip(turns, tuple(bool(f) for f in flips))
            np.testing.assert_array_equal(apply_rot_flip(vol, t), _reference(vol, t))


def test_preserves_values_and_is_contiguous(rng: np.random.Generator) -> None:
    vol = rng.random((4, 6, 6)).astype(np.float32)
    for _ in range(20):
        out = random_rot_flip(vol, rng)
        assert out.shape == vol.shape
        assert out.flags.c_contiguous
        np.testing.assert_array_equal(np.sort(out, axis=None), np.sort(vol, axis=None))


def test_same_transform_for_paired_arrays(rng: np.random.Generator) -> None:
    x = rng.random((4, 8, 8))
    y = 2.0 * x + 1.0
    for _ in range(30):
        xa, ya = random_rot_flip_many([x, y], rng)
        np.testing.assert_array_equal(ya, 2.0 * xa + 1.0)


def test_reaches_all_sixteen_transforms(rng: np.random.Generator) -> None:
    vol = rng.random((2, 3, 3))
    outputs = {random_rot_flip(vol, rng).tobytes() for _ in range(600)}
    assert len(outputs) == 16  # 8 symmetries of the square x optional Z flip


def test_non_square_keeps_shape(rng: np.random.Generator) -> None:
    vol = rng.random((2, 3, 5))
    outputs = {random_rot_flip(vol, rng).tobytes() for _ in range(300)}
    assert all(draw_rot_flip(rng, vol.shape).quarter_turns in (0, 2) for _ in range(50))
    assert len(outputs) == 8  # half turns and flips: {I, flip Y, flip X, both} x Z flip


def test_seeded_rng_reproduces() -> None:
    vol = np.arange(27.0).reshape(3, 3, 3)
    a = random_rot_flip(vol, np.random.default_rng(7))
    b = random_rot_flip(vol, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)


def test_mismatched_shapes_rejected() -> None:
    with pytest.raises(ValueError, match="share one shape"):
        random_rot_flip_many([np.zeros((2, 3, 3)), np.zeros((2, 4, 4))], np.random.default_rng())


def test_2d_images_reach_the_eight_symmetries_of_the_square(rng: np.random.Generator) -> None:
    image = rng.random((4, 4))
    outputs = {random_rot_flip(image, rng).tobytes() for _ in range(400)}
    assert len(outputs) == 8
    for turns in range(4):
        for flips in np.ndindex(2, 2):
            t = RotFlip(turns, tuple(bool(f) for f in flips))
            # The (Y, X) image as a one-plane volume: the 3D index formula is the reference.
            want = _reference(image[None], RotFlip(turns, (False, *t.flips)))[0]
            np.testing.assert_array_equal(apply_rot_flip(image, t), want)


@pytest.mark.parametrize("spatial", [(4, 6, 6), (6, 6)])
def test_channels_get_one_transform_and_keep_their_order(
    spatial: tuple[int, ...], rng: np.random.Generator
) -> None:
    base = rng.random(spatial)
    stack = np.stack([base + 10.0 * c for c in range(3)])  # (C, *S)
    for seed in range(20):
        out = random_rot_flip(stack, np.random.default_rng(seed), spatial_dims=len(spatial))
        alone = random_rot_flip(base, np.random.default_rng(seed))
        assert out.shape == stack.shape and out.flags.c_contiguous
        for c in range(3):
            np.testing.assert_array_equal(out[c], alone + 10.0 * c)


def test_a_channel_patch_draws_like_its_single_channel_twin(rng: np.random.Generator) -> None:
    vol = rng.random((4, 6, 6))
    for seed in range(10):
        one = random_rot_flip_many([vol], np.random.default_rng(seed))[0]
        (with_axis,) = random_rot_flip_many([vol[None]], np.random.default_rng(seed), 3)
        np.testing.assert_array_equal(with_axis[0], one)
