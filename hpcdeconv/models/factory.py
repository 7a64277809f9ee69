"""Networks built from their configuration, for training and for inference.

A method asks for its generators and discriminators here with the data's
``spatial_dims`` and channels; inference rebuilds a generator from the record a
checkpoint stores (:func:`generator_record`), without knowing the method.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from hpcdeconv.config import DiscriminatorConfig, UNetConfig
from hpcdeconv.models.discriminators import MultiScalePatchGAN
from hpcdeconv.models.unet import UNet


def build_generator(
    cfg: UNetConfig,
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    checkpointing: bool = False,
    start_mean: float | None = None,
) -> nn.Module:
    """The generator of ``cfg``: ``(B, in_channels, *S)`` to ``(B, out_channels, *S)``.

    Parameters
    ----------
    cfg
        Generator configuration.
    spatial_dims
        2 or 3.
    in_channels, out_channels
        Channels of input and output images.
    checkpointing
        Activation checkpointing of the network's stages while training.
    start_mean
        Training data's mean of the domain the generator maps into. With
        ``cfg.head_init == "data"`` the untrained output starts there; ``None``
        (inference, where the weights are loaded anyway) keeps PyTorch's initialisation.
    """
    net = UNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=cfg.channels,
        depth=cfg.depth,
        final_activation=cfg.final_activation,
        checkpointing=checkpointing,
        norm=cfg.norm == "instance",
    )
    if cfg.head_init == "data" and start_mean is not None:
        net.start_at(start_mean)
    return net


def build_discriminator(
    cfg: DiscriminatorConfig, *, spatial_dims: int, in_channels: int
) -> MultiScalePatchGAN:
    """``cfg.n_scales`` independent PatchGANs at 1, 1/2, 1/4 … resolution."""
    return MultiScalePatchGAN(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        channels=cfg.channels,
        n_layers=cfg.n_layers,
        n_scales=cfg.n_scales,
    )


def generator_record(
    cfg: UNetConfig, *, spatial_dims: int, in_channels: int, out_channels: int
) -> dict[str, Any]:
    """JSON-able description a checkpoint stores to rebuild the generator."""
    return {
        "generator": cfg.model_dump(mode="json"),
        "spatial_dims": spatial_dims,
        "in_channels": in_channels,
        "out_channels": out_channels,
    }


def rebuild_generator(record: Mapping[str, Any]) -> nn.Module:
    """The (untrained) generator a :func:`generator_record` describes; load weights next."""
    return build_generator(
        UNetConfig.model_validate(record["generator"]),
        spatial_dims=int(record["spatial_dims"]),
        in_channels=int(record["in_channels"]),
        out_channels=int(record["out_channels"]),
    )
