"""Content (perceptual) loss of COMI and its configuration."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from hpcdeconv.config.perceptual import ContentLossConfig
from hpcdeconv.errors import ConfigError
from hpcdeconv.losses.perceptual import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ContentLoss,
    build_content_loss,
)
from hpcdeconv.models.vgg import VGG19Features

LAYERS = ("relu1_2", "relu2_2")


@pytest.fixture(scope="module")
def vgg() -> VGG19Features:
    torch.manual_seed(0)
    return VGG19Features().eval().requires_grad_(False)


def _images(channels: int, seed: int, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(2, channels, 32, 32, generator=g)


@pytest.mark.parametrize("channels", [1, 3])
def test_zero_for_identical_images_positive_otherwise(vgg: VGG19Features, channels: int) -> None:
    loss = ContentLoss(vgg, LAYERS, channels, (-1.0, 1.0))
    a, b = _images(channels, 0), _images(channels, 1)
    assert loss(a, a.clone()).item() == 0.0
    assert loss(a, b).item() > 0.0


def test_value_is_the_mean_over_layers_of_feature_mse(vgg: VGG19Features) -> None:
    lo, hi = 0.0, 4.0
    loss = ContentLoss(vgg, LAYERS, 1, (lo, hi))
    target, generated = _images(1, 2, lo, hi), _images(1, 3, lo, hi)

    def normalised(x: torch.Tensor) -> torch.Tensor:
        rgb = ((x - lo) / (hi - lo)).repeat(1, 3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        return (rgb - mean) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    ft, fg = vgg(normalised(target), LAYERS), vgg(normalised(generated), LAYERS)
    expected = sum(F.mse_loss(fg[n], ft[n]) for n in LAYERS) / len(LAYERS)
    torch.testing.assert_close(loss(target, generated), expected)


def test_gradients_reach_the_generated_image_only(vgg: VGG19Features) -> None:
    loss = ContentLoss(vgg, ("relu2_1",), 3, (-1.0, 1.0))
    target = _images(3, 4).requires_grad_(True)
    generated = _images(3, 5).requires_grad_(True)
    loss(target, generated).backward()
    assert target.grad is None
    assert generated.grad is not None and generated.grad.abs().sum() > 0
    assert all(p.grad is None for p in vgg.parameters())
    assert loss.vgg is vgg


def test_without_vgg_it_is_the_pixel_mse() -> None:
    loss = ContentLoss(None, ("relu3_3",), 2, (-1.0, 1.0))
    a, b = _images(2, 6), _images(2, 7)
    torch.testing.assert_close(loss(a, b), F.mse_loss(b, a))
    assert loss.vgg is None


def test_build_without_weights_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="hpcdeconv.losses.perceptual"):
        loss = build_content_loss(ContentLossConfig(), channels=1, data_range=(-1.0, 1.0))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "no VGG-19 weights (method.content.vgg_weights): the content loss is pixel L2"
    ]
    assert loss.vgg is None
    a, b = _images(1, 8), _images(1, 9)
    torch.testing.assert_close(loss(a, b), F.mse_loss(b, a))


def test_build_with_weights_reads_a_frozen_vgg(vgg: VGG19Features, tmp_path: Path) -> None:
    path = tmp_path / "vgg19.pth"
    torch.save({f"features.{k}": v for k, v in vgg.features.state_dict().items()}, path)
    cfg = ContentLossConfig(vgg_weights=path, layers=LAYERS)
    loss = build_content_loss(cfg, channels=3, data_range=(-1.0, 1.0))
    assert isinstance(loss.vgg, VGG19Features)
    assert not loss.vgg.training and not any(p.requires_grad for p in loss.vgg.parameters())
    a, b = _images(3, 10), _images(3, 11)
    torch.testing.assert_close(loss(a, b), ContentLoss(vgg, LAYERS, 3, (-1.0, 1.0))(a, b))


def test_channels_other_than_1_or_3_with_weights_are_a_config_error(
    vgg: VGG19Features, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="needs 1- or 3-channel images, got 2 channels"):
        ContentLoss(vgg, LAYERS, 2, (-1.0, 1.0))
    # Checked before the (absent) weights file is read.
    cfg = ContentLossConfig(vgg_weights=tmp_path / "absent.pth")
    with pytest.raises(ConfigError, match=r"method\.content\.vgg_weights") as exc:
        build_content_loss(cfg, channels=4, data_range=(-1.0, 1.0))
    assert "\n" not in str(exc.value)


def test_rejects_bad_ranges_layers_and_shapes(vgg: VGG19Features) -> None:
    with pytest.raises(ConfigError, match="hi > lo"):
        ContentLoss(None, LAYERS, 1, (1.0, 1.0))
    with pytest.raises(ConfigError, match="VGG-19 layers"):
        ContentLoss(vgg, ("relu9_9",), 1, (-1.0, 1.0))
    loss = ContentLoss(vgg, LAYERS, 1, (-1.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        loss(_images(1, 0), _images(1, 0)[:, :, :16])
    with pytest.raises(ValueError, match=r"\(B, 1, Y, X\)"):
        loss(_images(3, 0), _images(3, 1))


def test_config_defaults_and_validation() -> None:
    cfg = ContentLossConfig()
    assert cfg.vgg_weights is None
    assert cfg.layers == ("relu3_3",)  # the COMI authors' layer (block3_conv3 + ReLU)
    assert ContentLossConfig(vgg_weights="w.pth", layers=["relu1_1", "pool5"]).layers == (
        "relu1_1",
        "pool5",
    )
    for bad in ({"layers": []}, {"layers": ["relu6_1"]}, {"layers": ["relu1_1"] * 2}, {"x": 1}):
        with pytest.raises(ValidationError):
            ContentLossConfig(**bad)
