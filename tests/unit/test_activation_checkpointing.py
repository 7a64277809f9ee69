"""Activation checkpointing applied from outside to the named stages of a generator."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hpcdeconv.config import ResNetConfig, UNetConfig
from hpcdeconv.errors import ConfigError
from hpcdeconv.models.checkpointing import apply_checkpointing
from hpcdeconv.models.factory import build_generator
from hpcdeconv.models.resnet import ResNetGenerator
from hpcdeconv.models.unet import UNet

CONFIGS = {
    "unet": UNetConfig(channels=2, depth=2, final_activation="none"),
    "unet_resize": UNetConfig(channels=2, depth=2, upsample="resize"),
    "resnet": ResNetConfig(channels=2, n_blocks=2, global_residual=True),
    "resnet_resize": ResNetConfig(channels=2, n_blocks=2, upsample="resize"),
}


def _first_conv(module: nn.Module) -> nn.Module:
    return next(m for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd))


def _run(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
    """Output, parameter gradients and forward calls of each stage's first convolution
    during one training forward and backward pass."""
    calls = [0] * len(net.checkpoint_stages())
    for i, name in enumerate(net.checkpoint_stages()):
        conv = _first_conv(net.get_submodule(name))
        conv.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    net.train()
    y = net(x)
    (y**2).sum().backward()
    return y.detach(), [p.grad.clone() for p in net.parameters()], calls


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_checkpointing_gives_identical_outputs_and_gradients(kind: str, dims: int) -> None:
    torch.manual_seed(0)
    args = {"spatial_dims": dims, "in_channels": 1, "out_channels": 1}
    plain = build_generator(CONFIGS[kind], **args)
    ckpt = build_generator(CONFIGS[kind], checkpointing=True, **args)
    assert ckpt.state_dict().keys() == plain.state_dict().keys()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, *([8] * dims))
    out0, grads0, calls0 = _run(plain, x)
    out1, grads1, calls1 = _run(ckpt, x)
    # Every stage ran once without checkpointing and again in the backward pass with it.
    assert calls0 == [1] * len(calls0)
    assert calls1 == [2] * len(calls1)
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    assert len(grads0) == len(grads1)
    for g0, g1 in zip(grads0, grads1, strict=True):
        torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-7)


def test_no_recomputation_outside_training_with_gradients() -> None:
    torch.manual_seed(0)
    net = apply_checkpointing(UNet(2, channels=2, depth=1))
    calls = [0]
    _first_conv(net.bottleneck).register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    x = torch.randn(1, 1, 8, 8)
    net.eval()
    net(x).sum().backward()  # eval mode: a plain call, even with gradients
    net.train()
    with torch.no_grad():
        net(x)
    assert calls == [2]


def test_weights_move_between_checkpointed_and_plain_networks() -> None:
    torch.manual_seed(0)
    ckpt = apply_checkpointing(ResNetGenerator(2, channels=2, n_blocks=1))
    plain = ResNetGenerator(2, channels=2, n_blocks=1)
    plain.load_state_dict(ckpt.state_dict())
    again = apply_checkpointing(ResNetGenerator(2, channels=2, n_blocks=1))
    again.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), ckpt.eval()(x))
        torch.testing.assert_close(again.eval()(x), ckpt(x))


def test_bad_stages_are_refused() -> None:
    net = UNet(2, channels=2, depth=1)
    with pytest.raises(ConfigError, match=r"no stage 'decoders\.7'"):
        apply_checkpointing(net, ["decoders.7"])
    apply_checkpointing(net, ["bottleneck"])
    with pytest.raises(ConfigError, match="already checkpointed"):
        apply_checkpointing(net, ["bottleneck"])
    with pytest.raises(ConfigError, match="names no stages"):
        apply_checkpointing(nn.Sequential(nn.Conv2d(1, 1, 3)))
