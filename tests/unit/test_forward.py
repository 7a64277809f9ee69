"""Linear FFT convolution: centring, agreement with scipy, adjoint, torch paths, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal
import torch

from hpcdeconv.errors import InputError
from hpcdeconv.physics.forward import (
    FFTConvolver,
    convolve,
    convolve_adjoint,
    convolve_torch,
    padded_shape,
)

# (volume shape, PSF shape): odd, even and mixed PSF sizes, a PSF larger than the volume.
CASES = [
    ((20, 17), (5, 5)),
    ((20, 17), (4, 6)),
    ((12, 10, 9), (5, 4, 3)),
    ((9, 11, 8), (6, 6, 6)),
    ((6, 7), (9, 10)),
]


def reference_convolve(volume: np.ndarray, psf: np.ndarray) -> np.ndarray:
    """scipy's full linear convolution cropped at k // 2: the project's centring."""
    full = scipy.signal.fftconvolve(volume.astype(np.float64), psf.astype(np.float64), "full")
    index = tuple(slice(k // 2, k // 2 + n) for n, k in zip(volume.shape, psf.shape, strict=True))
    return full[index]


@pytest.mark.parametrize(("shape", "psf_shape"), CASES)
def test_delta_reproduces_psf_at_its_centre(shape, psf_shape, rng) -> None:
    psf = rng.random(psf_shape).astype(np.float32)
    volume = np.zeros(shape, dtype=np.float32)
    centre = tuple(n // 2 for n in shape)
    volume[centre] = 1.0
    out = convolve(volume, psf)
    # Voxel centre + j - k//2 must hold h[j] wherever it lies inside the volume.
    expected = np.zeros(shape, dtype=np.float64)
    for j in np.ndindex(*psf_shape):
        target = tuple(c + jj - k // 2 for c, jj, k in zip(centre, j, psf_shape, strict=True))
        if all(0 <= t < n for t, n in zip(target, shape, strict=True)):
            expected[target] = psf[j]
    np.testing.assert_allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize(("shape", "psf_shape"), CASES)
def test_matches_scipy_full_convolution_cropped(shape, psf_shape, rng) -> None:
    volume = rng.random(shape).astype(np.float32)
    psf = rng.random(psf_shape).astype(np.float32)
    out = convolve(volume, psf)
    assert out.dtype == np.float32
    assert out.shape == volume.shape
    ref = reference_convolve(volume, psf)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-5


@pytest.mark.parametrize(("shape", "psf_shape"), CASES)
def test_adjoint_identity(shape, psf_shape, rng) -> None:
    x = rng.standard_normal(shape)
    y = rng.standard_normal(shape)
    psf = rng.random(psf_shape)
    lhs = np.vdot(convolve(x, psf), y)
    rhs = np.vdot(x, convolve_adjoint(y, psf))
    assert abs(lhs - rhs) <= 1e-5 * abs(lhs)


def test_adjoint_matches_explicit_matrix_transpose(rng) -> None:
    shape, psf_shape = (7, 6), (4, 3)
    psf = rng.random(psf_shape)
    size = int(np.prod(shape))
    basis = np.eye(size).reshape(size, *shape)
    matrix = np.stack([convolve(e, psf).ravel() for e in basis], axis=1)
    adjoint = np.stack([convolve_adjoint(e, psf).ravel() for e in basis], axis=1)
    np.testing.assert_allclose(adjoint, matrix.T, atol=1e-12)


def test_total_intensity_preserved_inside_volume(rng) -> None:
    psf = rng.random((7, 7, 7))
    psf /= psf.sum()
    volume = np.zeros((24, 24, 24), dtype=np.float32)
    volume[8:16, 8:16, 8:16] = rng.random((8, 8, 8))
    out = convolve(volume, psf)
    assert out.sum() == pytest.approx(volume.sum(), rel=1e-5)


def test_float64_stays_float64(rng) -> None:
    assert convolve(rng.random((8, 8)), rng.random((3, 3))).dtype == np.float64


def test_mismatched_ranks_raise() -> None:
    with pytest.raises(InputError):
        convolve(np.zeros((4, 4, 4)), np.zeros((3, 3)))


@pytest.mark.parametrize(("shape", "psf_shape"), CASES)
def test_padded_shape_is_smooth_and_large_enough(shape, psf_shape) -> None:
    for s, n, k in zip(padded_shape(shape, psf_shape), shape, psf_shape, strict=True):
        assert s >= max(n + k // 2, k)
        rest = s
        for prime in (2, 3, 5):
            while rest % prime == 0:
                rest //= prime
        assert rest == 1


@pytest.mark.parametrize(("shape", "psf_shape"), CASES)
def test_torch_matches_numpy(shape, psf_shape, rng) -> None:
    volume = rng.random((2, 3, *shape)).astype(np.float32)
    psf = rng.random(psf_shape).astype(np.float32)
    out = convolve_torch(torch.from_numpy(volume), torch.from_numpy(psf))
    assert out.shape == volume.shape
    assert out.dtype == torch.float32
    for b in range(2):
        for c in range(3):
            ref = convolve(volume[b, c], psf)
            np.testing.assert_allclose(out[b, c].numpy(), ref, rtol=1e-5, atol=1e-5)


def test_fft_convolver_forward_and_adjoint_match_numpy(rng) -> None:
    shape, psf_shape = (10, 9, 12), (5, 4, 6)
    psf = rng.random(psf_shape)
    x = rng.random((2, *shape))
    convolver = FFTConvolver(torch.from_numpy(psf), shape)
    forward = convolver.forward(torch.from_numpy(x)).numpy()
    adjoint = convolver.adjoint(torch.from_numpy(x)).numpy()
    for b in range(2):
        np.testing.assert_allclose(forward[b], convolve(x[b], psf), atol=1e-12)
        np.testing.assert_allclose(adjoint[b], convolve_adjoint(x[b], psf), atol=1e-12)


def test_fft_convolver_rejects_wrong_shape() -> None:
    convolver = FFTConvolver(torch.ones(3, 3), (8, 8))
    with pytest.raises(InputError):
        convolver.forward(torch.zeros(1, 8, 9))


def test_half_precision_input_keeps_dtype_and_accuracy(rng) -> None:
    volume = rng.random((16, 16)).astype(np.float32)
    psf = rng.random((5, 5)).astype(np.float32)
    psf /= psf.sum()
    out = convolve_torch(torch.from_numpy(volume).bfloat16(), torch.from_numpy(psf).bfloat16())
    assert out.dtype == torch.bfloat16
    # Errors are bf16 rounding of inputs and output, not of the FFT (which runs in float32).
    np.testing.assert_allclose(out.float().numpy(), convolve(volume, psf), rtol=2e-2, atol=2e-2)


def test_gradcheck_wrt_input_and_psf() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 5, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    psf = torch.rand(3, 2, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(convolve_torch, (x, psf))


def test_gradcheck_3d() -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(3, 4, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    psf = torch.rand(2, 3, 2, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(convolve_torch, (x, psf))


def test_input_gradient_is_the_adjoint(rng) -> None:
    shape, psf_shape = (9, 8), (4, 5)
    psf = torch.from_numpy(rng.random(psf_shape))
    x = torch.from_numpy(rng.random(shape)).requires_grad_(True)
    y = rng.random(shape)
    (convolve_torch(x, psf) * torch.from_numpy(y)).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), convolve_adjoint(y, psf.numpy()), atol=1e-12)


def test_autocast_keeps_float32_accuracy(rng) -> None:
    volume = rng.random((12, 14, 10)).astype(np.float32)
    psf = rng.random((5, 4, 3)).astype(np.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = convolve_torch(torch.from_numpy(volume), torch.from_numpy(psf))
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), convolve(volume, psf), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_cuda_half_precision_under_autocast(rng) -> None:
    # Odd, non-power-of-two padded sizes: cuFFT refuses these in fp16, so this only passes
    # because the FFTs are cast up to float32.
    volume = rng.random((2, 13, 21, 19)).astype(np.float32)
    psf = rng.random((7, 6, 5)).astype(np.float32)
    psf /= psf.sum()
    x = torch.from_numpy(volume).cuda().half().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.float16):
        out = convolve_torch(x, torch.from_numpy(psf).cuda())
        out.sum().backward()
    assert out.dtype == torch.float16
    assert x.grad is not None and x.grad.dtype == torch.float16
    for b in range(2):
        ref = convolve(volume[b], psf)
        np.testing.assert_allclose(out[b].detach().float().cpu().numpy(), ref, rtol=5e-3, atol=5e-3)
