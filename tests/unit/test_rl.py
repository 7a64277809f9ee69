"""Richardson-Lucy and TV-RL: agreement with scikit-image and a numpy reference, EM properties."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.signal
import torch
from skimage.restoration import richardson_lucy as skimage_rl

from hpcdeconv.classical.rl import richardson_lucy, richardson_lucy_torch, rl_halo
from hpcdeconv.classical.rl_operator import PocketFFT
from hpcdeconv.classical.tv import tv_divergence
from hpcdeconv.errors import ConfigError, InputError
from hpcdeconv.metrics import pcc, psnr
from hpcdeconv.physics.forward import FFTConvolver, convolve
from hpcdeconv.physics.phantoms import microtubules, texture_2d
from hpcdeconv.physics.psf import born_wolf, gaussian


def asymmetric_psf(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Off-centre, lumpy PSF: convolution and correlation differ, so centring errors show."""
    sigma = tuple(max(n / 5.0, 0.8) for n in shape)
    envelope = np.roll(gaussian(shape, sigma), 1, axis=0)
    psf = envelope * (0.5 + rng.random(shape))
    return (psf / psf.sum()).astype(np.float32)


def blurred_phantom(
    shape: tuple[int, ...], psf: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(ground truth, non-negative blurred image) for a 3D microtubule or 2D cell phantom."""
    truth = microtubules(shape, rng) if len(shape) == 3 else texture_2d(shape, rng)
    return truth, np.clip(convolve(truth, psf), 0.0, None)


def poisson_nll(image: np.ndarray, estimate: np.ndarray, psf: np.ndarray) -> float:
    """``sum(Hx - y log Hx)`` in float64 with the numpy forward model."""
    blurred = convolve(estimate.astype(np.float64), psf.astype(np.float64))
    y = image.astype(np.float64)
    return float(np.sum(blurred - y * np.log(np.maximum(blurred, 1e-300))))


def total_variation(x: np.ndarray) -> float:
    """Isotropic TV with forward differences (last difference 0)."""
    squared = sum(
        np.square(np.diff(x, axis=a, append=np.take(x, [-1], axis=a))) for a in range(x.ndim)
    )
    return float(np.sum(np.sqrt(squared)))


def reference_tv_rl(
    image: np.ndarray, psf: np.ndarray, iterations: int, tv: float, eps: float
) -> np.ndarray:
    """Dey et al.'s TV-RL written independently: scipy 'same' convolution, numpy gradients."""
    y = image.astype(np.float64)
    h = psf.astype(np.float64)
    x = np.full_like(y, y.mean())
    for _ in range(iterations):
        blurred = np.maximum(scipy.signal.convolve(x, h, mode="same"), eps)
        correction = scipy.signal.convolve(y / blurred, np.flip(h), mode="same")
        grads = [np.diff(x, axis=a, append=np.take(x, [-1], axis=a)) for a in range(x.ndim)]
        norm = np.sqrt(sum(g * g for g in grads) + eps * eps)
        div = sum(
            np.diff(g / norm, axis=a, prepend=np.zeros_like(np.take(g, [0], axis=a)))
            for a, g in enumerate(grads)
        )
        x = x * np.maximum(correction, 0.0) / (1.0 - tv * div)
    return x


# ---------------------------------------------------------------------------------------
# Agreement with independent implementations
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "psf_shape"),
    [((24, 32, 32), (7, 7, 7)), ((20, 28, 24), (11, 9, 7)), ((64, 72), (15, 13))],
)
def test_matches_skimage_without_normalisation(shape, psf_shape, rng) -> None:
    psf = asymmetric_psf(psf_shape, rng)
    _, image = blurred_phantom(shape, psf, rng)
    # float64 with skimage's epsilon: the same algorithm to round-off.
    # scikit-image convolves with zero padding ("same"): the truncated boundary.
    ours = richardson_lucy(
        image.astype(np.float64), psf, 10, eps=1e-12, normalize=False, boundary="truncated"
    )
    ref = skimage_rl(image.astype(np.float64), psf.astype(np.float64), num_iter=10, clip=False)
    assert ours.shape == image.shape and ours.dtype == np.float64
    assert np.abs(ours - ref).max() <= 1e-7 * ref.max()
    # float32: skimage lets round-off flip signs in dark voxels (down to -4e-4 here), ours
    # clips the correction at 0, so only near-agreement is expected.
    single = richardson_lucy(image, psf, iterations=10, normalize=False, boundary="truncated")
    assert single.dtype == np.float32
    assert pcc(single, ref) >= 0.9999
    assert np.abs(single - ref).max() <= 2e-3 * ref.max()


def test_even_psf_is_centred_at_half_size(rng) -> None:
    """An even PSF of size k equals the odd PSF of size k + 1 with a zero last plane."""
    psf = asymmetric_psf((6, 8, 4), rng)
    _, image = blurred_phantom((20, 24, 24), psf, rng)
    odd = np.pad(psf, [(0, 1)] * 3)
    ours = richardson_lucy(image, psf, iterations=5, normalize=False, boundary="truncated")
    ref = skimage_rl(image, odd, num_iter=5, clip=False)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_psf_larger_than_image_is_supported(rng) -> None:
    psf = asymmetric_psf((21, 9), rng)
    image = np.clip(convolve(texture_2d((12, 40), rng), psf), 0.0, None)
    ours = richardson_lucy(image, psf, iterations=5, normalize=False, boundary="truncated")
    ref = skimage_rl(image, psf, num_iter=5, clip=False)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize(("shape", "psf_shape"), [((16, 20, 20), (5, 7, 7)), ((40, 36), (9, 9))])
def test_tv_rl_matches_numpy_reference(shape, psf_shape, rng) -> None:
    psf = asymmetric_psf(psf_shape, rng)
    _, image = blurred_phantom(shape, psf, rng)
    noisy = np.clip(image + 0.02 * rng.standard_normal(shape), 0.0, None).astype(np.float64)
    ours = richardson_lucy(
        noisy, psf, iterations=8, tv=0.01, eps=1e-3, normalize=False, boundary="truncated"
    )
    ref = reference_tv_rl(noisy, psf / psf.sum(), iterations=8, tv=0.01, eps=1e-3)
    assert ours.dtype == np.float64
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9 * ref.max())


@pytest.mark.parametrize(
    ("shape", "psf_shape"), [((12, 10, 9), (5, 4, 3)), ((9, 11, 8), (6, 6, 6)), ((6, 7), (9, 10))]
)
def test_cpu_operator_matches_fft_convolver(shape, psf_shape, rng) -> None:
    psf = torch.from_numpy(rng.random(psf_shape))
    x = torch.from_numpy(rng.random(shape))
    convolver = FFTConvolver(psf, shape)
    operator = PocketFFT(convolver)
    torch.testing.assert_close(operator.forward(x), convolver.forward(x))
    torch.testing.assert_close(operator.adjoint(x), convolver.adjoint(x))


def test_tv_divergence_is_minus_gradient_of_smoothed_tv(rng) -> None:
    x = torch.tensor(rng.random((6, 7, 8)), dtype=torch.float64, requires_grad=True)
    eps = 0.05
    # TV_eps(x) = sum sqrt(|grad x|^2 + eps^2); its gradient is -div(grad x / |grad x|_eps).
    grads = [torch.diff(x, dim=a, append=x.narrow(a, x.shape[a] - 1, 1)) for a in range(3)]
    tv_value = torch.sqrt(sum(g * g for g in grads) + eps**2).sum()
    (gradient,) = torch.autograd.grad(tv_value, x)
    torch.testing.assert_close(tv_divergence(x.detach(), eps), -gradient)
    # The bound behind the admissible TV weights, |div| <= d + sqrt(d), nearly reached here.
    rough = tv_divergence(torch.from_numpy(rng.random((12, 12, 12))), 1e-9).abs().max()
    assert 3.0 < rough <= 3.0 + 3.0**0.5


# ---------------------------------------------------------------------------------------
# Properties of the EM iteration
# ---------------------------------------------------------------------------------------


def test_normalised_rl_decreases_poisson_nll_and_conserves_flux(rng) -> None:
    psf = born_wolf((9, 9, 9), (0.2, 0.1, 0.1)).astype(np.float64)
    psf /= psf.sum()
    _, image = blurred_phantom((24, 32, 32), psf, rng)
    nll = []
    for iterations in range(7):
        estimate = richardson_lucy(image, psf, iterations, eps=1e-12, boundary="truncated")
        nll.append(poisson_nll(image, estimate, psf))
        if iterations > 0:
            # EM keeps sum(H x) = sum(y) after every update of the truncated operator.
            flux = convolve(estimate, psf).sum()
            assert flux == pytest.approx(image.sum(), rel=1e-9)
    assert all(b < a for a, b in itertools.pairwise(nll))


def test_rl_improves_psnr_of_blurred_input(rng) -> None:
    psf = born_wolf((9, 9, 9), (0.2, 0.1, 0.1))
    truth, image = blurred_phantom((24, 40, 40), psf, rng)
    restored = richardson_lucy(image, psf, iterations=20)
    assert psnr(restored, truth, 1.0) > psnr(image, truth, 1.0) + 3.0


def test_tv_zero_equals_plain_rl_and_positive_tv_smooths(rng) -> None:
    psf = born_wolf((7, 9, 9), (0.2, 0.1, 0.1))
    _, image = blurred_phantom((16, 32, 32), psf, rng)
    noisy = np.clip(image + 0.05 * rng.standard_normal(image.shape), 0.0, None)
    plain = richardson_lucy(noisy, psf, iterations=15)
    np.testing.assert_array_equal(richardson_lucy(noisy, psf, iterations=15, tv=0.0), plain)
    tiny = richardson_lucy(noisy, psf, iterations=15, tv=1e-7)
    assert np.abs(tiny - plain).max() <= 1e-4 * plain.max()
    smooth = richardson_lucy(noisy, psf, iterations=15, tv=0.02)
    assert total_variation(smooth) < 0.9 * total_variation(plain)


def test_float32_agrees_with_float64(rng) -> None:
    psf = born_wolf((9, 9, 9), (0.2, 0.1, 0.1))
    _, image = blurred_phantom((16, 24, 24), psf, rng)
    single = richardson_lucy(image.astype(np.float32), psf, iterations=10, tv=0.002)
    double = richardson_lucy(image.astype(np.float64), psf.astype(np.float64), 10, tv=0.002)
    assert single.dtype == np.float32 and double.dtype == np.float64
    assert np.abs(single - double).max() <= 1e-4 * double.max()


def test_zero_iterations_return_the_constant_start(rng) -> None:
    image = rng.random((8, 10, 12)).astype(np.float32)
    start = richardson_lucy(image, gaussian((3, 3, 3), (1.0, 1.0, 1.0)), iterations=0)
    np.testing.assert_allclose(start, np.full(image.shape, image.mean()), rtol=1e-6)


def test_negative_values_are_clipped_and_psf_scale_is_ignored(rng) -> None:
    psf = gaussian((5, 5), (1.0, 1.5))
    image = rng.random((20, 20)).astype(np.float32) - 0.2
    clipped = richardson_lucy(np.clip(image, 0.0, None), psf, iterations=5)
    scaled = richardson_lucy(image, 3.0 * psf, iterations=5)
    np.testing.assert_allclose(scaled, clipped, rtol=1e-5, atol=1e-7)
    assert clipped.min() >= 0.0


def test_integer_image_runs_in_float32(rng) -> None:
    image = rng.integers(0, 50, size=(12, 14)).astype(np.uint16)
    out = richardson_lucy_torch(torch.from_numpy(image.astype(np.int32)), torch.ones(3, 3), 3)
    assert out.dtype == torch.float32
    ref = richardson_lucy(image.astype(np.float32), np.ones((3, 3), np.float32), 3)
    np.testing.assert_array_equal(out.numpy(), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("boundary", ["reflect", "truncated"])
def test_cuda_matches_cpu(boundary: str, rng) -> None:
    psf = born_wolf((9, 9, 9), (0.2, 0.1, 0.1))
    _, image = blurred_phantom((16, 32, 32), psf, rng)
    cpu = richardson_lucy(image, psf, iterations=10, tv=0.002, boundary=boundary)
    gpu = richardson_lucy(image, psf, 10, tv=0.002, device="cuda", boundary=boundary)
    assert np.abs(gpu - cpu).max() <= 1e-4 * cpu.max()


# ---------------------------------------------------------------------------------------
# Block-wise halo
# ---------------------------------------------------------------------------------------


def test_rl_halo_values() -> None:
    assert rl_halo((31, 31, 31)) == (90, 90, 90)
    assert rl_halo((7, 8)) == (18, 24)


def test_block_with_rl_halo_matches_whole_image(rng) -> None:
    psf = asymmetric_psf((9, 9), rng)
    _, image = blurred_phantom((160, 160), psf, rng)
    noisy = np.clip(image + 0.02 * rng.standard_normal(image.shape), 0.0, None)
    whole = richardson_lucy(noisy, psf, iterations=20)
    core = (slice(64, 96), slice(64, 96))

    def block_error(halo: tuple[int, ...]) -> float:
        window = tuple(slice(c.start - h, c.stop + h) for c, h in zip(core, halo, strict=True))
        block = richardson_lucy(noisy[window], psf, iterations=20)
        inner = tuple(slice(h, h + c.stop - c.start) for c, h in zip(core, halo, strict=True))
        return float(np.abs(block[inner] - whole[core]).max() / whole[core].max())

    assert block_error(rl_halo(psf.shape)) < 2e-3
    # A halo of half a PSF is visibly wrong, so the bound above is not vacuous.
    assert block_error((4, 4)) > 1e-2


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "psf"),
    [
        (np.full((8, 8), np.nan, np.float32), np.ones((3, 3), np.float32)),
        (np.ones((8, 8), np.float32), np.array([[0, np.inf, 0]] * 3, np.float32)),
        (np.ones(8, np.float32), np.ones(3, np.float32)),
        (np.ones((2, 4, 4, 4), np.float32), np.ones((3, 3, 3, 3), np.float32)),
        (np.ones((8, 8, 8), np.float32), np.ones((3, 3), np.float32)),
        (np.ones((0, 8), np.float32), np.ones((3, 3), np.float32)),
        (np.ones((8, 8), np.float32), -np.ones((3, 3), np.float32)),
    ],
    ids=["nan-image", "inf-psf", "1d", "4d", "psf-rank", "empty", "negative-psf"],
)
def test_bad_arrays_raise_input_error(image, psf) -> None:
    with pytest.raises(InputError):
        richardson_lucy(image, psf, iterations=2)


@pytest.mark.parametrize(
    "kwargs", [{"iterations": -1}, {"tv": -0.01}, {"tv": 0.3}, {"eps": 0.0}], ids=str
)
def test_bad_parameters_raise_config_error(kwargs) -> None:
    with pytest.raises(ConfigError):
        richardson_lucy(np.ones((8, 8, 8), np.float32), np.ones((3, 3, 3), np.float32), **kwargs)


def test_rl_halo_rejects_empty_psf_axis() -> None:
    with pytest.raises(InputError):
        rl_halo((0, 5))
