"""ResNet generator, the generator configuration union and its size checks, the factory."""

from __future__ import annotations

import json
from itertools import pairwise

import pytest
import torch
from pydantic import TypeAdapter, ValidationError
from torch import nn

from hpcdeconv.config import (
    ExperimentConfig,
    GeneratorConfig,
    ResNetConfig,
    SupervisedConfig,
    UNetConfig,
)
from hpcdeconv.errors import ConfigError
from hpcdeconv.models.factory import build_generator, generator_record, rebuild_generator
from hpcdeconv.models.resnet import ResNetGenerator
from hpcdeconv.models.unet import UNet

GENERATOR = TypeAdapter(GeneratorConfig)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def resnet_param_formula(
    d: int, c_in: int, c_out: int, channels: int, n_down: int, blocks: int
) -> int:
    """Independent count with instance norm: no conv bias before a norm, affine norms."""
    widths = [channels * 2**i for i in range(n_down + 1)]
    total = 7**d * c_in * channels + 2 * channels  # stem
    for a, b in pairwise(widths):
        total += 3**d * a * b + 2 * b  # stride-2 convolution
        total += 3**d * b * a + 2 * a  # upsampling back (transposed or resize: 3-wide)
    total += blocks * 2 * (3**d * widths[-1] ** 2 + 2 * widths[-1])
    return total + 7**d * channels * c_out + c_out  # head with bias


@pytest.mark.parametrize("upsample", ["transpose", "resize"])
@pytest.mark.parametrize(
    ("dims", "c_in", "c_out", "shape"),
    [(2, 1, 1, (16, 24)), (2, 3, 3, (8, 20)), (3, 1, 1, (8, 12, 16)), (3, 3, 1, (16, 8, 8))],
)
def test_shapes_channels_and_parameter_count(
    dims: int, c_in: int, c_out: int, shape: tuple[int, ...], upsample: str
) -> None:
    net = ResNetGenerator(dims, c_in, c_out, channels=4, n_blocks=2, upsample=upsample)  # type: ignore[arg-type]
    y = net(torch.randn(2, c_in, *shape))
    assert y.shape == (2, c_out, *shape)
    assert n_params(net) == resnet_param_formula(dims, c_in, c_out, 4, 2, 2)


def test_default_is_the_cyclegan_generator() -> None:
    # ngf 64, two down-samplings, nine blocks: 11.38 M parameters for RGB in 2D, the size
    # of cycleGAN's 256x256 generator (it has conv biases and no norm affines instead).
    net = ResNetGenerator(2, 3, 3)
    assert n_params(net) == resnet_param_formula(2, 3, 3, 64, 2, 9)
    assert round(n_params(net) / 1e6, 2) == 11.38
    assert net.size_multiple == 4
    assert len(net.checkpoint_stages()) == 1 + 2 + 9 + 2


def test_tanh_range() -> None:
    net = ResNetGenerator(2, 1, 1, channels=4, n_blocks=1)
    y = net(torch.randn(3, 1, 16, 16) * 10)
    assert torch.all(y.abs() < 1)
    assert (y < 0).any() and (y > 0).any()


def test_global_residual_adds_the_input() -> None:
    torch.manual_seed(0)
    net = ResNetGenerator(2, 3, 3, channels=4, n_blocks=1, global_residual=True)
    x = torch.randn(2, 3, 16, 16) * 5
    branch = ResNetGenerator(2, 3, 3, channels=4, n_blocks=1)
    branch.load_state_dict(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(net(x), x + branch(x))
        net.head.weight.zero_()
        net.head.bias.zero_()
        torch.testing.assert_close(net(x), x, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="in_channels"):
        ResNetGenerator(2, 3, 1, global_residual=True)


def test_start_at_data_mean_or_identity() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 1, 16, 16) * 0.2
    plain = ResNetGenerator(2, channels=4, n_blocks=1)
    plain.start_at(0.1)
    residual = ResNetGenerator(2, channels=4, n_blocks=1, global_residual=True)
    residual.start_at(0.1)
    with torch.no_grad():
        assert float(plain(x).mean()) == pytest.approx(0.1, rel=0.15)
        # The correction starts at zero: the untrained network is the identity.
        torch.testing.assert_close(residual(x), x, rtol=0, atol=0)
    assert float(residual.head.weight.detach().abs().max()) == 0.0
    with pytest.raises(ValueError, match="finite"):
        residual.start_at(float("inf"))


def test_rejects_bad_inputs_and_configuration() -> None:
    net = ResNetGenerator(3, channels=2, n_blocks=1, n_downsampling=2)
    assert (net.size_multiple, net.min_size) == (4, 8)
    with pytest.raises(ValueError, match="size_multiple=4"):
        net(torch.randn(1, 1, 8, 10, 8))
    with pytest.raises(ValueError, match="at least 8"):
        net(torch.randn(1, 1, 4, 8, 8))
    with pytest.raises(ValueError, match="B, C, Z, Y, X"):
        net(torch.randn(1, 8, 8, 8))
    with pytest.raises(ConfigError, match="n_blocks"):
        ResNetGenerator(n_blocks=0)
    with pytest.raises(ConfigError, match="upsample"):
        ResNetGenerator(upsample="bilinear")  # type: ignore[arg-type]
    assert ResNetGenerator(2, n_downsampling=0, n_blocks=1).min_size == 4


# ----------------------------------------------------------------------------- configuration


def test_union_without_kind_is_a_unet() -> None:
    cfg = GENERATOR.validate_python({"channels": 8, "depth": 2})
    assert isinstance(cfg, UNetConfig) and cfg.kind == "unet"
    assert (cfg.upsample, cfg.final_activation) == ("transpose", "sigmoid")
    resnet = GENERATOR.validate_python({"kind": "resnet", "global_residual": True})
    assert isinstance(resnet, ResNetConfig)
    assert (resnet.channels, resnet.n_downsampling, resnet.n_blocks) == (64, 2, 9)
    assert (resnet.final_activation, resnet.upsample, resnet.norm) == (
        "tanh",
        "transpose",
        "instance",
    )
    with pytest.raises(ValidationError, match="depth"):
        GENERATOR.validate_python({"kind": "resnet", "depth": 3})
    with pytest.raises(ValidationError, match="kind"):
        GENERATOR.validate_python({"kind": "vit"})
    assert UNetConfig(final_activation="tanh", upsample="resize").upsample == "resize"


@pytest.mark.parametrize(
    ("net", "patch", "message"),
    [
        (
            UNetConfig(depth=3),
            (32, 36),
            r"multiple of 8 along every axis \(method.generator.depth=3",
        ),
        (UNetConfig(depth=3), (8, 8), "one voxel at the bottleneck"),
        (
            ResNetConfig(),
            (32, 34),
            r"multiple of 4 along every axis \(method.generator.n_downsampling=2",
        ),
        (ResNetConfig(), (4, 32), "reflection padding needs every side >= 8"),
        (ResNetConfig(n_downsampling=0), (3, 32), "reflection padding needs every side >= 4"),
    ],
)
def test_check_patch_messages(net: GeneratorConfig, patch: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        net.check_patch(patch, "method.generator")


def test_check_patch_accepts_fitting_patches() -> None:
    UNetConfig(depth=3).check_patch((8, 16), "g")
    UNetConfig(depth=3, norm="none").check_patch((8, 8), "g")
    ResNetConfig().check_patch((8, 8), "g")
    ResNetConfig(n_downsampling=3).check_patch((16, 32, 48), "g")


def _experiment(generator: GeneratorConfig, patch: list[int], **train: object) -> ExperimentConfig:
    # The method is built around its generator without revalidation, so the experiment's
    # own checks see a ResNet whatever the method's field declares.
    method = SupervisedConfig.model_construct(
        **{**SupervisedConfig().__dict__, "generator": generator, "adversarial_weight": 0.0}
    )
    return ExperimentConfig.model_validate(
        {"data": {"kind": "paired", "patch": patch}, "method": method, "train": train}
    )


def test_experiment_checks_a_resnet_generator() -> None:
    _experiment(ResNetConfig(), [8, 12, 16])
    with pytest.raises(ValidationError, match="n_downsampling=2"):
        _experiment(ResNetConfig(), [8, 12, 18])
    with pytest.raises(ValidationError, match="reflection padding"):
        _experiment(ResNetConfig(n_downsampling=3), [8, 16, 16])
    # Validation tiles round up to the ResNet's multiple (4), not a U-Net's.
    cfg = _experiment(ResNetConfig(), [8, 8, 8], val_tile=[6, 6, 6], val_overlap=7)
    assert cfg.method.generator.size_multiple() == 4
    with pytest.raises(ValidationError, match=r"multiples of 4: \[8, 8, 8\]"):
        _experiment(ResNetConfig(), [8, 8, 8], val_tile=[6, 6, 6], val_overlap=8)


# ----------------------------------------------------------------------------- factory


@pytest.mark.parametrize(
    ("cfg", "dims", "channels"),
    [
        (UNetConfig(channels=2, depth=2, upsample="resize"), 3, 1),
        (ResNetConfig(channels=2, n_blocks=1, global_residual=True), 2, 3),
        (ResNetConfig(channels=2, n_blocks=1, upsample="resize", final_activation="none"), 3, 1),
    ],
)
def test_record_round_trips(cfg: GeneratorConfig, dims: int, channels: int) -> None:
    torch.manual_seed(0)
    kw = {"spatial_dims": dims, "in_channels": channels, "out_channels": channels}
    trained = build_generator(cfg, checkpointing=True, start_mean=0.2, **kw)
    record = json.loads(json.dumps(generator_record(cfg, **kw)))
    assert record["generator"]["kind"] == cfg.kind
    rebuilt = rebuild_generator(record)
    assert type(rebuilt) is type(trained)
    rebuilt.load_state_dict(trained.state_dict())
    x = torch.rand(1, channels, *([16] * dims))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), trained.eval()(x))


def test_record_without_kind_rebuilds_a_unet() -> None:
    record = {
        "generator": {"channels": 2, "depth": 1, "final_activation": "none"},
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 1,
    }
    net = rebuild_generator(record)
    assert isinstance(net, UNet) and net.depth == 1 and net.upsample == "transpose"


def test_head_init_default_keeps_pytorch_initialisation() -> None:
    kw = {"spatial_dims": 2, "in_channels": 1, "out_channels": 1}
    torch.manual_seed(0)
    default = build_generator(
        ResNetConfig(channels=2, n_blocks=1, head_init="default"), start_mean=0.3, **kw
    )
    torch.manual_seed(0)
    data = build_generator(ResNetConfig(channels=2, n_blocks=1), start_mean=0.3, **kw)
    assert not torch.equal(default.head.bias, data.head.bias)
    assert float(data.head.bias.detach()[0]) == pytest.approx(float(torch.atanh(torch.tensor(0.3))))
