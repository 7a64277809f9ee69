"""Shapes, parameter counts and receptive fields of the networks."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from torch import nn

from hpcdeconv.errors import ConfigError
from hpcdeconv.models.blocks import (
    ConvNormAct,
    DoubleByRepeat,
    HalveByMean,
    ResizeConv,
    conv_nd,
    final_activation_module,
    instance_norm_nd,
    max_pool_nd,
)
from hpcdeconv.models.discriminators import MultiScalePatchGAN, PatchGAN
from hpcdeconv.models.resnet import ResNetGenerator
from hpcdeconv.models.unet import UNet


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- blocks


@pytest.mark.parametrize(
    ("factory", "two", "three"),
    [
        (conv_nd, nn.Conv2d, nn.Conv3d),
        (instance_norm_nd, nn.InstanceNorm2d, nn.InstanceNorm3d),
        (max_pool_nd, nn.MaxPool2d, nn.MaxPool3d),
    ],
)
def test_factories_pick_layer_by_dimension(factory, two, three) -> None:
    assert factory(2) is two
    assert factory(3) is three
    with pytest.raises(ConfigError, match="spatial_dims"):
        factory(1)


@pytest.mark.parametrize("shape", [(2, 3, 8, 6), (1, 2, 7, 9, 5), (1, 1, 4, 4, 4)])
def test_halve_by_mean_equals_average_pooling(shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    pool = (nn.AvgPool2d if len(shape) == 4 else nn.AvgPool3d)(kernel_size=2, stride=2)
    ours = HalveByMean(len(shape) - 2)(x)
    torch.testing.assert_close(ours, pool(x))
    (grad,) = torch.autograd.grad(ours.sum(), x)
    (ref,) = torch.autograd.grad(pool(x).sum(), x)
    torch.testing.assert_close(grad, ref)
    with pytest.raises(ConfigError, match="spatial_dims"):
        HalveByMean(1)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 2, 3, 4, 2)])
def test_double_by_repeat_equals_nearest_upsampling(shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    ours = DoubleByRepeat()(x)
    ref = nn.functional.interpolate(x, scale_factor=2, mode="nearest")
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    weight = torch.randn_like(ref)
    (grad,) = torch.autograd.grad((ours * weight).sum(), x)
    (grad_ref,) = torch.autograd.grad((ref * weight).sum(), x)
    torch.testing.assert_close(grad, grad_ref)


def test_resize_conv_doubles_and_repeats_before_convolving() -> None:
    up = ResizeConv(2, 3, 5, bias=True)
    x = torch.randn(2, 3, 4, 6)
    y = up(x)
    assert y.shape == (2, 5, 8, 12)
    torch.testing.assert_close(y, up[1](nn.functional.interpolate(x, scale_factor=2)))
    assert n_params(up) == 9 * 3 * 5 + 5


def test_final_activations() -> None:
    x = torch.linspace(-5, 5, 11)
    assert torch.equal(final_activation_module("none")(x), x)
    torch.testing.assert_close(final_activation_module("tanh")(x), torch.tanh(x))
    torch.testing.assert_close(final_activation_module("sigmoid")(x), torch.sigmoid(x))
    with pytest.raises(ConfigError, match="final_activation"):
        final_activation_module("relu")  # type: ignore[arg-type]


def test_conv_norm_act_keeps_size_and_normalises() -> None:
    torch.manual_seed(0)
    block = ConvNormAct(3, 2, 5, act="leaky_relu")
    block[2] = nn.Identity()  # inspect the normalised pre-activation
    y = block(torch.randn(2, 2, 6, 7, 8))
    assert y.shape == (2, 5, 6, 7, 8)
    # Instance norm with its initial affine (1, 0): zero mean, unit variance per channel.
    torch.testing.assert_close(y.mean(dim=(2, 3, 4)), torch.zeros(2, 5), atol=1e-5, rtol=0)
    assert block[0].bias is None


def test_conv_norm_act_stride_two_halves() -> None:
    block = ConvNormAct(2, 1, 3, kernel_size=4, stride=2, norm=False)
    assert block(torch.randn(1, 1, 16, 10)).shape == (1, 3, 8, 5)
    assert n_params(block) == 16 * 3 + 3


# ----------------------------------------------------------------------------- UNet


def unet_param_formula(
    d: int,
    c_in: int,
    c_out: int,
    channels: int,
    depth: int,
    norm: bool = True,
    upsample: str = "transpose",
) -> int:
    """Independent count: k=3 convs (bias only without norm), affine norms, k=2 transposed
    up-convs or k=3 resize up-convs."""
    k = 3**d
    widths = [channels * 2**i for i in range(depth + 1)]

    def conv(a: int, b: int) -> int:
        return k * a * b + (2 * b if norm else b)

    total = 0
    prev = c_in
    for w in widths:  # encoder levels and bottleneck
        total += conv(prev, w) + conv(w, w)
        prev = w
    for i in range(depth):  # decoder levels
        taps = 2**d if upsample == "transpose" else 3**d
        up = taps * widths[i + 1] * widths[i] + (0 if norm else widths[i])
        total += up + conv(2 * widths[i], widths[i]) + conv(widths[i], widths[i])
    return total + widths[0] * c_out + c_out


@pytest.mark.parametrize("upsample", ["transpose", "resize"])
@pytest.mark.parametrize(
    ("dims", "channels", "depth", "norm"), [(3, 32, 3, True), (2, 8, 2, True), (3, 4, 2, False)]
)
def test_unet_parameter_count(
    dims: int, channels: int, depth: int, norm: bool, upsample: str
) -> None:
    net = UNet(dims, 1, 2, channels=channels, depth=depth, norm=norm, upsample=upsample)  # type: ignore[arg-type]
    assert n_params(net) == unet_param_formula(dims, 1, 2, channels, depth, norm, upsample)


def test_unet_default_is_about_5_6_million_parameters() -> None:
    assert n_params(UNet()) == 5_600_897


@pytest.mark.parametrize("upsample", ["transpose", "resize"])
@pytest.mark.parametrize(("dims", "shape"), [(3, (2, 1, 16, 24, 32)), (2, (3, 1, 32, 48))])
def test_unet_shapes_and_sigmoid_range(dims: int, shape: tuple[int, ...], upsample: str) -> None:
    net = UNet(dims, 1, 1, channels=4, depth=3, upsample=upsample)  # type: ignore[arg-type]
    y = net(torch.randn(shape) * 5)
    assert y.shape == shape
    assert torch.all((y > 0) & (y < 1))


def test_unet_tanh_head_and_three_channels_2d() -> None:
    net = UNet(2, 3, 3, channels=4, depth=2, final_activation="tanh")
    y = net(torch.randn(2, 3, 16, 12) * 5)
    assert y.shape == (2, 3, 16, 12)
    assert torch.all(y.abs() < 1) and (y < 0).any() and (y > 0).any()


def test_unet_linear_output_and_channels() -> None:
    net = UNet(3, 2, 3, channels=4, depth=1, final_activation="none")
    y = net(torch.randn(1, 2, 8, 8, 8))
    assert y.shape == (1, 3, 8, 8, 8)
    assert (y < 0).any() or (y > 1).any()


def test_unet_rejects_sizes_not_multiple_of_size_multiple() -> None:
    net = UNet(3, channels=2, depth=3)
    assert net.size_multiple == 8
    with pytest.raises(ValueError, match="size_multiple=8"):
        net(torch.randn(1, 1, 16, 20, 16))
    with pytest.raises(ValueError, match="B, C, Z, Y, X"):
        net(torch.randn(1, 16, 16, 16))


def test_unet_rejects_bad_configuration() -> None:
    with pytest.raises(ConfigError):
        UNet(depth=0)
    with pytest.raises(ConfigError, match="final_activation"):
        UNet(final_activation="relu")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="upsample"):
        UNet(upsample="bilinear")  # type: ignore[arg-type]


def _reach(net: nn.Module, length: int, side: int, positions: range) -> tuple[int, int]:
    """Largest distance below/above an input voxel at which the output changes, probed
    along the first spatial axis by a bump at each of ``positions``."""
    dims = net.spatial_dims
    shape = (1, 1, length, *([side] * (dims - 1)))
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(3)).double()
    bumped = x.repeat(len(positions), *([1] * (dims + 1)))
    for b, z in enumerate(positions):
        bumped[(b, 0, z, *([side // 2] * (dims - 1)))] += 1e3
    with torch.no_grad():
        other = (1, *range(3, dims + 2))
        changed = (net(bumped) - net(x)).abs().amax(dim=other) > 1e-12  # (B, length)
    pairs = list(zip(positions, changed, strict=True))
    below = max(z - int(torch.nonzero(row).min()) for z, row in pairs)
    above = max(int(torch.nonzero(row).max()) - z for z, row in pairs)
    return below, above


def _positive(net: nn.Module) -> nn.Module:
    """Positive weights on a positive input keep every ReLU open and let a large bump win
    every max-pool window, so each structural path shows up as a change."""
    net = net.double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.uniform_(0.1, 1.0, generator=torch.Generator().manual_seed(p.numel()))
    return net


def _probe(net: nn.Module, radius: int) -> tuple[int, int]:
    m = net.size_multiple
    length = -(-(2 * radius + 4 * m + 16) // m) * m
    side = max(m, getattr(net, "min_size", 8))
    # The reach depends on the output position modulo size_multiple: probe a full period.
    return _reach(net, length, side, range(length // 2, length // 2 + m))


@pytest.mark.parametrize("upsample", ["transpose", "resize"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_unet_receptive_field_matches_perturbation(depth: int, upsample: str) -> None:
    # Without instance norm the network is local.
    net = UNet(3, channels=2, depth=depth, norm=False, final_activation="none", upsample=upsample)  # type: ignore[arg-type]
    radius = _positive(net).receptive_field() // 2
    assert _probe(net, radius) == (radius, radius)


@pytest.mark.parametrize("upsample", ["transpose", "resize"])
@pytest.mark.parametrize(("n_downsampling", "n_blocks"), [(0, 1), (1, 2), (2, 1), (3, 1)])
def test_resnet_receptive_field_matches_perturbation(
    n_downsampling: int, n_blocks: int, upsample: str
) -> None:
    net = ResNetGenerator(
        2,
        channels=2,
        n_downsampling=n_downsampling,
        n_blocks=n_blocks,
        final_activation="none",
        upsample=upsample,  # type: ignore[arg-type]
        norm=False,
    )
    below, above = _positive(net).reaches()
    # A bump at input z changes outputs from z - above to z + below.
    assert _probe(net, max(below, above)) == (above, below)
    assert net.receptive_field() == 2 * max(below, above) + 1


def test_unet_receptive_field_values() -> None:
    assert [UNet(depth=d).receptive_field() for d in (1, 2, 3, 4)] == [19, 47, 103, 215]
    resize = [UNet(depth=d, upsample="resize").receptive_field() for d in (1, 2, 3, 4)]
    assert resize == [21, 53, 117, 245]


# ----------------------------------------------------------------------------- discriminators


def patchgan_param_formula(d: int, c_in: int, channels: int, n_layers: int) -> int:
    widths = [channels * min(2**i, 8) for i in range(n_layers + 1)]
    total = 4**d * c_in * widths[0] + widths[0]  # first layer: bias, no norm
    for a, b in pairwise(widths[:n_layers]):
        total += 4**d * a * b + 2 * b
    total += 3**d * widths[n_layers - 1] * widths[n_layers] + 2 * widths[n_layers]
    return total + 3**d * widths[n_layers] + 1


@pytest.mark.parametrize(("dims", "n_layers"), [(3, 3), (2, 4), (3, 1)])
def test_patchgan_parameter_count(dims: int, n_layers: int) -> None:
    disc = PatchGAN(dims, in_channels=2, channels=4, n_layers=n_layers)
    assert n_params(disc) == patchgan_param_formula(dims, 2, 4, n_layers)


@pytest.mark.parametrize(
    ("dims", "shape", "expected"),
    [(3, (2, 1, 16, 32, 24), (2, 1, 2, 4, 3)), (2, (2, 1, 32, 16), (2, 1, 4, 2))],
)
def test_patchgan_shapes(dims: int, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    disc = PatchGAN(dims, channels=4, n_layers=3)
    assert disc(torch.randn(shape)).shape == expected


def test_patchgan_rejects_too_small_inputs() -> None:
    disc = PatchGAN(3, channels=2, n_layers=3)
    with pytest.raises(ValueError, match="too small"):
        disc(torch.randn(1, 1, 8, 8, 8))  # a single score: its norm would be all zeros
    with pytest.raises(ValueError, match="too small"):
        disc(torch.randn(1, 1, 4, 32, 32))


def test_multiscale_patchgan_scales_and_independence() -> None:
    disc = MultiScalePatchGAN(3, channels=2, n_layers=2, n_scales=3)
    assert disc.n_scales == 3
    assert disc.reduction == 16
    x = torch.randn(2, 1, 32, 32, 16)
    outs = disc(x)
    assert [o.shape for o in outs] == [(2, 1, 8, 8, 4), (2, 1, 4, 4, 2), (2, 1, 2, 2, 1)]
    assert n_params(disc) == 3 * n_params(PatchGAN(3, channels=2, n_layers=2))
    # Scale 1 judges the 2× average-pooled input with its own weights.
    pooled = nn.functional.avg_pool3d(x, 2)
    torch.testing.assert_close(outs[1], disc.discriminators[1](pooled))
    assert not torch.equal(
        disc.discriminators[0].model[0][0].weight, disc.discriminators[1].model[0][0].weight
    )


def test_multiscale_patchgan_2d_and_scale_count() -> None:
    disc = MultiScalePatchGAN(2, channels=2, n_layers=2, n_scales=2)
    outs = disc(torch.randn(1, 1, 16, 32))
    assert [o.shape for o in outs] == [(1, 1, 4, 8), (1, 1, 2, 4)]
    with pytest.raises(ConfigError):
        MultiScalePatchGAN(2, n_scales=0)
