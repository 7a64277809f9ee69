"""PSFLayer: agreement with an independent scipy convolution, constraints, export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from scipy.signal import fftconvolve

from hpcdeconv.errors import ConfigError, InputError
from hpcdeconv.models.psf_layer import PSFLayer, delta_kernel
from hpcdeconv.physics.psf import gaussian


def scipy_reference(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Full linear convolution of every (B, C) volume, cropped at offset k // 2 per axis."""
    crop = tuple(slice(k // 2, k // 2 + n) for k, n in zip(h.shape, x.shape[2:], strict=True))
    return np.stack(
        [np.stack([fftconvolve(vol, h, mode="full")[crop] for vol in batch]) for batch in x]
    )


def layer_with(h: np.ndarray, fft: bool, **kwargs) -> PSFLayer:
    return PSFLayer(h.shape, init=h, fft_threshold=0 if fft else 1000, **kwargs).double()


@pytest.mark.parametrize("fft", [False, True])
@pytest.mark.parametrize("shape", [(5, 5, 5), (4, 6, 3), (2, 2, 2), (1, 3, 1)])
def test_matches_scipy_linear_convolution(
    rng: np.random.Generator, shape: tuple[int, int, int], fft: bool
) -> None:
    h = rng.random(shape)
    x = rng.random((2, 3, 9, 10, 11))
    layer = layer_with(h, fft)
    assert layer.uses_fft is fft
    h_used = layer.kernel().detach().numpy()  # the float32-stored kernel
    y = layer(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(y, scipy_reference(x, h_used), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fft", [False, True])
@pytest.mark.parametrize("shape", [(5, 5), (4, 7), (1, 3)])
def test_2d_psf_matches_scipy_linear_convolution(
    rng: np.random.Generator, shape: tuple[int, int], fft: bool
) -> None:
    h = rng.random(shape)
    x = rng.random((2, 3, 13, 11))
    layer = layer_with(h, fft)
    h_used = layer.kernel().detach().numpy()
    y = layer(torch.from_numpy(x)).detach().numpy()
    assert y.shape == x.shape
    np.testing.assert_allclose(y, scipy_reference(x, h_used), rtol=1e-10, atol=1e-12)


def test_2d_psf_learns_under_the_simplex_constraint(rng: np.random.Generator) -> None:
    layer = PSFLayer((5, 5), init="gaussian", sigma=1.0, constraint="simplex")
    x = torch.from_numpy(rng.random((2, 1, 16, 16)).astype(np.float32))
    layer(x).square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert float(layer.kernel().detach().sum()) == pytest.approx(1.0, abs=1e-6)
    raw, smoothed = layer.export()
    assert raw.shape == smoothed.shape == (5, 5)


def test_input_rank_must_match_the_psf() -> None:
    with pytest.raises(ValueError, match=r"\(B, C, Y, X\)"):
        PSFLayer((3, 3))(torch.zeros(1, 1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, C, Z, Y, X\)"):
        PSFLayer((3, 3, 3))(torch.zeros(1, 1, 4, 4))


def test_matches_physics_forward_convolve(rng: np.random.Generator) -> None:
    from hpcdeconv.physics.forward import convolve

    h = rng.random((4, 5, 6))
    x = rng.random((1, 1, 12, 9, 10))
    for fft in (False, True):
        layer = layer_with(h, fft)
        y = layer(torch.from_numpy(x)).detach().numpy()[0, 0]
        expected = convolve(x[0, 0], layer.kernel().detach().numpy())
        np.testing.assert_allclose(y, expected, rtol=1e-9, atol=1e-12)


def test_delta_moves_a_point_to_the_kernel_centre() -> None:
    # A point at voxel c must reproduce h with its index n//2 at c (PSF convention).
    h = np.arange(4 * 3 * 2, dtype=np.float64).reshape(4, 3, 2) + 1
    x = np.zeros((1, 1, 10, 10, 10))
    x[0, 0, 5, 5, 5] = 1.0
    y = layer_with(h, fft=False)(torch.from_numpy(x)).detach().numpy()[0, 0]
    np.testing.assert_allclose(y[3:7, 4:7, 4:6], h)
    assert y.sum() == pytest.approx(h.sum())


def test_fft_and_direct_paths_agree_in_value_and_gradient(rng: np.random.Generator) -> None:
    h = rng.random((6, 5, 4))
    x = torch.from_numpy(rng.random((2, 1, 10, 12, 8)))
    target = torch.from_numpy(rng.random((2, 1, 10, 12, 8)))
    results = []
    for fft in (False, True):
        layer = layer_with(h, fft)
        xg = x.clone().requires_grad_(True)
        y = layer(xg)
        ((y - target) ** 2).sum().backward()
        results.append((y.detach(), layer.weight.grad.clone(), xg.grad.clone()))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_large_kernel_fft_path_matches_scipy(rng: np.random.Generator) -> None:
    h = gaussian((31, 31, 31), (3.0, 1.5, 1.5))
    x = rng.random((1, 1, 32, 32, 32))
    layer = PSFLayer((31, 31, 31), init=h)
    assert layer.uses_fft
    y = layer(torch.from_numpy(x).float()).detach().numpy()
    ref = scipy_reference(x, layer.kernel().detach().double().numpy())
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-6)


def test_default_dispatch_uses_fft_above_three() -> None:
    assert not PSFLayer((3, 3, 3)).uses_fft
    assert PSFLayer((3, 5, 3)).uses_fft
    assert PSFLayer((31, 31, 31)).uses_fft


def test_bfloat16_input_keeps_dtype() -> None:
    layer = PSFLayer((3, 3, 3), init="gaussian")
    x = torch.rand(1, 1, 8, 8, 8)
    for fft in (False, True):
        layer.fft_threshold = 0 if fft else 100
        y = layer(x.bfloat16())
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), layer(x).detach(), rtol=0.02, atol=0.02)


def test_initialisations() -> None:
    delta = PSFLayer((4, 5, 3)).kernel().detach().numpy()
    np.testing.assert_array_equal(delta, delta_kernel((4, 5, 3)))
    assert delta[2, 2, 1] == 1.0
    gauss = PSFLayer((6, 7, 5), init="gaussian", sigma=(2.0, 1.0, 1.0)).kernel().detach()
    assert float(gauss.sum()) == pytest.approx(1.0, abs=1e-6)
    assert np.unravel_index(int(gauss.argmax()), gauss.shape) == (3, 3, 2)
    # Wider along z than along y.
    assert float(gauss[1, 3, 2]) > float(gauss[3, 1, 2])


def test_delta_layer_is_identity(rng: np.random.Generator) -> None:
    x = torch.from_numpy(rng.random((1, 2, 6, 6, 6))).float()
    for fft in (False, True):
        layer = PSFLayer((5, 4, 3), fft_threshold=0 if fft else 100)
        torch.testing.assert_close(layer(x), x, rtol=1e-5, atol=1e-6)


def test_simplex_constraint_stays_on_simplex_while_learning(rng: np.random.Generator) -> None:
    layer = PSFLayer((5, 5, 5), init="gaussian", constraint="simplex")
    np.testing.assert_allclose(layer.kernel().detach().numpy(), gaussian((5, 5, 5), 1.0), atol=1e-7)
    opt = torch.optim.SGD(layer.parameters(), lr=50.0)
    x = torch.from_numpy(rng.random((1, 1, 8, 8, 8))).float()
    target = torch.from_numpy(rng.random((1, 1, 8, 8, 8))).float()
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = ((layer(x) - target) ** 2).mean()
        loss.backward()
        assert layer.weight.grad.abs().min() > 0  # every entry receives gradient
        opt.step()
        losses.append(loss.item())
        h = layer.kernel().detach()
        assert float(h.min()) >= 0
        assert float(h.sum()) == pytest.approx(1.0, abs=1e-5)
    assert losses[-1] < losses[0]


def test_simplex_load_clips_and_normalises() -> None:
    layer = PSFLayer((3, 3, 3), constraint="simplex")
    h = np.zeros((3, 3, 3))
    h[1, 1, 1], h[0, 1, 1], h[2, 2, 2] = 3.0, 1.0, -0.5
    layer.load_kernel(h)
    k = layer.kernel().detach().numpy()
    assert k[1, 1, 1] == pytest.approx(0.75, abs=1e-6)
    assert k[0, 1, 1] == pytest.approx(0.25, abs=1e-6)
    assert k[2, 2, 2] < 1e-7
    with pytest.raises(InputError, match="no positive"):
        layer.load_kernel(-np.ones((3, 3, 3)))


def test_raw_weights_without_constraint() -> None:
    h = np.full((3, 3, 3), -0.1)
    layer = PSFLayer((3, 3, 3), init=h)
    np.testing.assert_allclose(layer.kernel().detach().numpy(), h, rtol=1e-6)


def test_load_kernel_rejects_wrong_size_and_non_finite() -> None:
    layer = PSFLayer((3, 3, 3))
    with pytest.raises(InputError, match=r"does not match kernel_size \(3, 3, 3\)"):
        layer.load_kernel(np.ones((3, 3, 4)))
    bad = np.ones((3, 3, 3))
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        layer.load_kernel(bad)
    with pytest.raises(InputError):
        PSFLayer((3, 3, 3), init=np.ones((5, 5, 5)))


def test_bad_configuration() -> None:
    with pytest.raises(ConfigError):
        PSFLayer((3,))
    with pytest.raises(ConfigError):
        PSFLayer((3, 3, 3, 3))
    with pytest.raises(ConfigError):
        PSFLayer((3, 3, 3), constraint="positive")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        PSFLayer((3, 3, 3), init="airy")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        PSFLayer((3, 3, 3), init="gaussian", sigma=0.0)


def test_not_learnable_kernel_has_no_gradient_but_input_does() -> None:
    layer = PSFLayer((3, 3, 3), init="gaussian", learnable=False)
    assert not any(p.requires_grad for p in layer.parameters())
    x = torch.rand(1, 1, 6, 6, 6, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None
    assert "weight" in layer.state_dict()


def test_penalties_match_numpy(rng: np.random.Generator) -> None:
    h = rng.standard_normal((4, 3, 5))
    layer = layer_with(h, fft=False)
    k = layer.kernel().detach().numpy()
    assert layer.penalty("l1").item() == pytest.approx(np.abs(k).sum())
    tv = sum(np.abs(np.diff(k, axis=a)).sum() for a in range(3))
    assert layer.penalty("tv").item() == pytest.approx(tv)
    assert PSFLayer((3, 3, 3)).penalty("tv").item() == pytest.approx(6.0)
    layer.penalty("tv").backward()
    assert layer.weight.grad is not None
    with pytest.raises(ConfigError):
        layer.penalty("l2")  # type: ignore[arg-type]


def test_export_raw_and_smoothed(rng: np.random.Generator) -> None:
    h = rng.random((7, 7, 7))
    layer = PSFLayer((7, 7, 7), init=2.0 * h)
    raw, smooth = layer.export()
    k = layer.kernel().detach().double().numpy()
    np.testing.assert_allclose(raw, k / k.sum(), rtol=1e-12)
    ref = gaussian_filter(k, 1.0, mode="constant")
    np.testing.assert_allclose(smooth, ref / ref.sum(), rtol=1e-10)
    assert raw.sum() == pytest.approx(1.0)
    assert smooth.sum() == pytest.approx(1.0)
    # Smoothing a delta spreads it: the peak drops.
    raw_d, smooth_d = PSFLayer((7, 7, 7)).export(smooth_sigma=1.0)
    assert raw_d.max() == 1.0
    assert smooth_d.max() < 0.1
    assert np.unravel_index(smooth_d.argmax(), smooth_d.shape) == (3, 3, 3)


def test_export_rejects_zero_sum_kernel() -> None:
    with pytest.raises(ValueError, match="sums to zero"):
        PSFLayer((3, 3, 3), init=np.zeros((3, 3, 3))).export()
