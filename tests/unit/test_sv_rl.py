"""Spatially-variant TV Richardson-Lucy (eq. 13 of Shajkofci & Liebling 2020): masks, the
overlap-add operator and its adjoint against dense and scipy references, reduction to
spatially-invariant RL, PSF cropping, and block-wise runs against the whole image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.signal import fftconvolve

from hpcdeconv.classical.rl import richardson_lucy
from hpcdeconv.classical.rl_operator import boundary_sides
from hpcdeconv.classical.sv_masks import hat_weights, interpolation_masks, touching_nodes
from hpcdeconv.classical.sv_rl import build_sv_operator, crop_size, node_psfs, sv_richardson_lucy
from hpcdeconv.config.psfnet import PSFModelConfig, PSFOptics
from hpcdeconv.errors import ConfigError, InputError
from hpcdeconv.inference.plan import BlockPlan
from hpcdeconv.inference.sv_processor import SVRLProcessor
from hpcdeconv.physics.psf import gaussian
from hpcdeconv.psfnet.psf_map import PSFMap, window_centres, window_starts
from hpcdeconv.psfnet.psf_models import build_psf_model


def _grid(shape: tuple[int, int], window: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    return window_centres(shape[0], window, stride), window_centres(shape[1], window, stride)


def _map(
    shape: tuple[int, int], window: int, stride: int, model: str, params: np.ndarray
) -> PSFMap:
    psf_model = build_psf_model(PSFModelConfig(model=model, optics=PSFOptics(psf_size=15)))
    gy, gx = params.shape[1:]
    return PSFMap(
        psf_model,
        params.astype(np.float32),
        np.zeros((gy, gx), np.float32),
        np.ones((gy, gx), bool),
        window,
        stride,
        shape,
        (0.325, 0.325),
    )


def test_masks_are_a_bilinear_partition_of_unity() -> None:
    centres = (np.array([10.0, 30.0, 45.0]), np.array([8.0, 24.0]))
    shape = (60, 40)
    masks = interpolation_masks(centres, shape)
    assert masks.shape == (3, 2, 60, 40) and masks.min() >= 0.0
    np.testing.assert_allclose(masks.sum(axis=(0, 1)), 1.0, atol=1e-12)
    # Bilinear interpolation reproduces a + b y + c x + d y x at every pixel centre within
    # the nodes' hull, and holds the outer nodes' values beyond it.
    yy, xx = np.meshgrid(np.arange(60) + 0.5, np.arange(40) + 0.5, indexing="ij")
    ny, nx = np.meshgrid(*centres, indexing="ij")

    def f(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        return 2.0 + 0.3 * y - 0.7 * x + 0.05 * y * x

    interpolated = np.einsum("ijyx,ij->yx", masks, f(ny, nx))
    expected = f(np.clip(yy, 10.0, 45.0), np.clip(xx, 8.0, 24.0))
    np.testing.assert_allclose(interpolated, expected, rtol=1e-12)
    # The hat of the middle y node by hand at y = 20.5 and 40.5 (pixel centres).
    w = hat_weights(centres[0], 20, 41)
    assert w[1, 0] == pytest.approx((20.5 - 10.0) / 20.0)
    assert w[1, -1] == pytest.approx((45.0 - 40.5) / 15.0)
    # Pixel 9 is sampled at 9.5, before the first node: only that node's hat is positive.
    assert touching_nodes(centres[0], 0, 10) == slice(0, 1)
    assert touching_nodes(centres[0], 0, 11) == slice(0, 2)
    assert touching_nodes(centres[0], 46, 60) == slice(2, 3)


@pytest.mark.parametrize(
    "boundary",
    ["truncated", "reflect", [("reflect", "truncated"), ("truncated", "reflect")]],
)
@pytest.mark.parametrize("kernel", [(7, 9), (6, 5)])
def test_operator_adjoint_is_exact(boundary: object, kernel: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(0)
    shape = (40, 52)
    centres = _grid((60, 70), 24, 12)
    psfs = torch.rand(len(centres[0]), len(centres[1]), *kernel, generator=gen, dtype=torch.float64)
    op = build_sv_operator(psfs, centres, shape, boundary_sides(boundary, 2), offset=(9, 3))
    x = torch.rand(shape, generator=gen, dtype=torch.float64)
    y = torch.rand(shape, generator=gen, dtype=torch.float64)
    lhs = float((op.forward(x) * y).sum())
    rhs = float((x * op.adjoint(y)).sum())
    assert lhs == pytest.approx(rhs, rel=1e-12)


def test_forward_model_matches_per_psf_convolutions_with_masks() -> None:
    # Two nodes along x (window 48, stride 48: centres 24 and 72), one along y.
    shape = (40, 96)
    centres = (np.array([20.0]), np.array([24.0, 72.0]))
    left = gaussian((9, 9), (1.0, 2.5)).astype(np.float64)
    right = gaussian((9, 9), (2.5, 1.0)).astype(np.float64)
    right = np.roll(right, 1, axis=1)  # asymmetric, so correlation would not pass for convolution
    psfs = torch.as_tensor(np.stack([left / left.sum(), right / right.sum()])[None])
    image = np.random.default_rng(3).random(shape)
    op = build_sv_operator(psfs, centres, shape, boundary_sides("truncated", 2))
    blurred = op.forward(torch.as_tensor(image)).numpy()
    masks = interpolation_masks(centres, shape)
    reference = sum(
        fftconvolve(masks[0, m] * image, psfs[0, m].numpy(), mode="same") for m in range(2)
    )
    np.testing.assert_allclose(blurred, reference, rtol=1e-9, atol=1e-12)
    # Away from the blend (mask 1 over the whole PSF reach) it is one invariant blur.
    radius = 4
    np.testing.assert_allclose(
        blurred[:, : 24 - radius],
        fftconvolve(image, psfs[0, 0].numpy(), mode="same")[:, : 24 - radius],
        rtol=1e-9,
    )
    np.testing.assert_allclose(
        blurred[:, 72 + radius :],
        fftconvolve(image, psfs[0, 1].numpy(), mode="same")[:, 72 + radius :],
        rtol=1e-9,
    )
    assert np.abs(blurred[:, 40:56] - reference[:, 40:56]).max() < 1e-9


@pytest.mark.parametrize("boundary", ["reflect", "truncated"])
def test_one_psf_everywhere_equals_invariant_rl(boundary: str) -> None:
    rng = np.random.default_rng(4)
    shape = (48, 64)
    centres = _grid(shape, 24, 12)
    psf = gaussian((9, 9), (1.5, 2.0)).astype(np.float64)
    psfs = np.broadcast_to(psf, (len(centres[0]), len(centres[1]), 9, 9))
    image = rng.random(shape) * 100
    sv = sv_richardson_lucy(image, psfs, centres, 8, tv=0.01, boundary=boundary)
    invariant = richardson_lucy(image, psf, 8, tv=0.01, boundary=boundary)
    np.testing.assert_allclose(sv, invariant, rtol=1e-10, atol=1e-10 * invariant.max())
    # float32, plain RL: FFT round-off only.
    sv32 = sv_richardson_lucy(image.astype(np.float32), psfs.astype(np.float32), centres, 8)
    rl32 = richardson_lucy(image.astype(np.float32), psf.astype(np.float32), 8)
    assert sv32.dtype == np.float32
    assert np.abs(sv32 - rl32).max() <= 1e-5 * rl32.max()


def _dense_operator(psfs: np.ndarray, centres: tuple, shape: tuple[int, int]) -> np.ndarray:
    """H of eq. 13 (truncated) as a matrix, column by column from scipy convolutions."""
    masks = interpolation_masks(centres, shape)
    size = shape[0] * shape[1]
    columns = np.zeros((size, size))
    for index in range(size):
        delta = np.zeros(size)
        delta[index] = 1.0
        delta = delta.reshape(shape)
        column = sum(
            fftconvolve(masks[i, j] * delta, psfs[i, j], mode="same")
            for i in range(psfs.shape[0])
            for j in range(psfs.shape[1])
        )
        columns[:, index] = column.reshape(-1)
    return columns


def _tv_divergence(x: np.ndarray, eps: float) -> np.ndarray:
    """div(grad x / |grad x|_eps), forward differences with a zero last difference."""
    gy = np.zeros_like(x)
    gx = np.zeros_like(x)
    gy[:-1] = x[1:] - x[:-1]
    gx[:, :-1] = x[:, 1:] - x[:, :-1]
    norm = np.sqrt(gy**2 + gx**2 + eps**2)
    py, px = gy / norm, gx / norm
    return (
        py
        - np.vstack([np.zeros((1, x.shape[1])), py[:-1]])
        + (px - np.hstack([np.zeros((x.shape[0], 1)), px[:, :-1]]))
    )


@pytest.mark.parametrize("tv", [0.0, 0.05])
def test_tv_rl_matches_a_dense_reference_and_reduces_to_rl(tv: float) -> None:
    rng = np.random.default_rng(5)
    shape = (12, 14)
    centres = (np.array([3.0, 9.0]), np.array([4.0, 7.0, 11.0]))
    psfs = rng.random((2, 3, 5, 5)) + 0.05
    psfs /= psfs.sum(axis=(-2, -1), keepdims=True)
    image = rng.random(shape) * 50 + 1
    h = _dense_operator(psfs, centres, shape)
    y = image.reshape(-1)
    sensitivity = h.T @ np.ones_like(y)
    x = np.full_like(y, y.mean())
    for _ in range(6):
        correction = h.T @ (y / np.maximum(h @ x, 1e-6))
        penalty = 1.0 - tv * _tv_divergence(x.reshape(shape), 1e-6).reshape(-1)
        x = x * correction / (penalty * sensitivity)
    result = sv_richardson_lucy(image, psfs, centres, 6, tv=tv, boundary="truncated")
    np.testing.assert_allclose(result.reshape(-1), x, rtol=1e-8)


def test_bad_input_is_refused() -> None:
    centres = (np.array([4.0]), np.array([4.0]))
    psfs = np.ones((1, 1, 3, 3))
    with pytest.raises(InputError, match="2D"):
        sv_richardson_lucy(np.ones((4, 4, 4)), psfs, centres, 1)
    with pytest.raises(ConfigError, match="tv must lie in"):
        sv_richardson_lucy(np.ones((8, 8)), psfs, centres, 1, tv=0.3)
    with pytest.raises(InputError, match="no positive"):
        sv_richardson_lucy(np.ones((8, 8)), np.zeros((1, 1, 3, 3)), centres, 1)
    with pytest.raises(InputError, match="increasing"):
        sv_richardson_lucy(np.ones((8, 8)), np.ones((1, 2, 3, 3)), (centres[0], [5.0, 2.0]), 1)


def test_crop_keeps_the_energy_asked_for() -> None:
    params = np.array([[[0.2, 0.3], [0.25, 0.4]]])
    psf_map = _map((128, 128), 64, 64, "gaussian1", params)
    full = node_psfs(psf_map)
    assert full.shape == (2, 2, 15, 15)
    size = crop_size(full, 1e-4)
    assert size % 2 == 1 and size < 15
    half, centre = size // 2, 7
    kept = full[..., centre - half : centre + half + 1, centre - half : centre + half + 1]
    assert float(kept.sum(dim=(-2, -1)).min()) >= 1 - 1e-4
    smaller = full[..., centre - half + 1 : centre + half, centre - half + 1 : centre + half]
    assert float(smaller.sum(dim=(-2, -1)).min()) < 1 - 1e-4
    assert crop_size(full, 0.0) == 15
    cropped = node_psfs(psf_map, size, slice(1, 2), slice(0, 2))
    assert cropped.shape == (1, 2, size, size)
    torch.testing.assert_close(cropped.sum(dim=(-2, -1)), torch.ones(1, 2))
    torch.testing.assert_close(cropped[0, 1], kept[1, 1] / kept[1, 1].sum())


@pytest.mark.parametrize("model", ["gaussian2", "zernike3"])
def test_blocks_stitch_to_the_whole_image(model: str) -> None:
    shape = (160, 176)
    window, stride = 64, 32
    gy, gx = (len(window_starts(n, window, stride)) for n in shape)
    rng = np.random.default_rng(6)
    psf_model = build_psf_model(PSFModelConfig(model=model))
    params = np.stack([rng.uniform(p.low, p.high, (gy, gx)) for p in psf_model.parameters])
    if model == "gaussian2":
        params = params * 0.4  # widths of 0.2-2 px: PSFs well inside 15 px
    psf_map = _map(shape, window, stride, model, params)
    processor = SVRLProcessor.from_map(psf_map, 5, 0.002, 1e-4)
    # float64: in float32 the TV term's sign-like |grad x|_eps amplifies FFT round-off
    # (blocks and whole image use other FFT sizes); here only the halo's error counts,
    # measured 1e-6 (gaussian2) and 2e-5 (zernike3: the 15 px PSFs are not cropped).
    image = rng.random(shape) * 100
    whole = sv_richardson_lucy(
        image, node_psfs(psf_map, processor.psf_size), psf_map.centres, 5, tv=0.002
    )
    k = processor.psf_size
    plan = BlockPlan((64, 64), (6 * (k // 2),) * 2, (32, 32), axes="YX")
    stitched = np.zeros(shape)
    blocks = plan.grid(shape)
    assert len(blocks) == 9
    for block in blocks:
        stitched[block.write] = processor(image[block.read], block)
    assert np.abs(stitched - whole).max() <= 1e-4 * whole.max()
    fingerprint = processor.fingerprint
    assert fingerprint["kind"] == "sv_richardson_lucy" and fingerprint["psf_size"] == k
    other = _map(shape, window, stride, model, params * 1.01)
    assert SVRLProcessor.from_map(other, 5, 0.002, 1e-4).sha256 != processor.sha256
