"""Networks built from their configuration, for training and for inference.

A method asks for its generators and discriminators here with the data's
``spatial_dims`` and channels; inference rebuilds a generator from the record a
checkpoint stores (:func:`generator_record`), without knowing the method.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import TypeAdapter
from torch import nn

from hpcdeconv.config import DiscriminatorConfig, GeneratorConfig, ResNetConfig
from hpcdeconv.data.intensity import INTENSITY_KEY, IntensityMap
from hpcdeconv.models.checkpointing import apply_checkpointing
from hpcdeconv.models.discriminators import MultiScalePatchGAN
from hpcdeconv.models.resnet import ResNetGenerator
from hpcdeconv.models.unet import UNet

_GENERATOR_CONFIG: TypeAdapter[GeneratorConfig] = TypeAdapter(GeneratorConfig)


def _network(
    cfg: GeneratorConfig, spatial_dims: int, in_channels: int, out_channels: int
) -> UNet | ResNetGenerator:
    """The untrained network of ``cfg``; the settings every generator has pass alike."""
    common: dict[str, Any] = {
        "spatial_dims": spatial_dims,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "channels": cfg.channels,
        "final_activation": cfg.final_activation,
        "norm": cfg.norm == "instance",
        "upsample": cfg.upsample,
    }
    if isinstance(cfg, ResNetConfig):
        return ResNetGenerator(
            **common,
            n_downsampling=cfg.n_downsampling,
            n_blocks=cfg.n_blocks,
            global_residual=cfg.global_residual,
        )
    return UNet(**common, depth=cfg.depth)


def build_generator(
    cfg: GeneratorConfig,
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
        Generator configuration: a U-Net or a ResNet generator.
    spatial_dims
        2 or 3.
    in_channels, out_channels
        Channels of input and output images.
    checkpointing
        Activation checkpointing of the network's stages while training
        (:func:`~hpcdeconv.models.checkpointing.apply_checkpointing`); the weights' names
        are the same either way.
    start_mean
        Training data's mean of the domain the generator maps into. With
        ``cfg.head_init == "data"`` the untrained output starts there (each network's
        ``start_at``); ``None`` (inference, where the weights are loaded anyway) keeps
        PyTorch's initialisation.
    """
    net = _network(cfg, spatial_dims, in_channels, out_channels)
    if cfg.head_init == "data" and start_mean is not None:
        net.start_at(start_mean)
    if checkpointing:
        apply_checkpointing(net)
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
        head_kernel=cfg.head_kernel,
    )


def generator_record(
    cfg: GeneratorConfig,
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    intensity: IntensityMap | None = None,
) -> dict[str, Any]:
    """JSON-able description a checkpoint stores to rebuild the generator (its ``kind``
    included) and, when it was trained on mapped intensities, the mapping (under
    ``"intensity"``, applied by inference)."""
    record = {
        "generator": cfg.model_dump(mode="json"),
        "spatial_dims": spatial_dims,
        "in_channels": in_channels,
        "out_channels": out_channels,
    }
    if intensity is not None:
        record[INTENSITY_KEY] = intensity.record()
    return record


def rebuild_generator(record: Mapping[str, Any]) -> nn.Module:
    """The (untrained) generator a :func:`generator_record` describes; load weights next.

    A record's generator without ``kind`` is a U-Net (records written before the ResNet).

    Raises
    ------
    pydantic.ValidationError
        If the record's generator is not a valid generator configuration.
    """
    return build_generator(
        _GENERATOR_CONFIG.validate_python(record["generator"]),
        spatial_dims=int(record["spatial_dims"]),
        in_channels=int(record["in_channels"]),
        out_channels=int(record["out_channels"]),
    )
