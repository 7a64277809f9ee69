"""Network configurations: generators and discriminators."""

from __future__ import annotations

from typing import Literal

from hpcdeconv.config.base import PositiveInt, StrictModel


class UNetConfig(StrictModel):
    """3D U-Net of the seed paper (two 3x3x3 conv-IN-ReLU per level, skip per level)."""

    channels: PositiveInt = 16
    depth: PositiveInt = 3
    final_activation: Literal["sigmoid", "none"] = "sigmoid"
    # "data": the untrained output starts at the training data's mean of the domain it
    # maps into (UNet.start_at); "default": PyTorch's initialisation, where a sigmoid head
    # starts at 0.5 whatever the data. Only a fresh run's start changes; resuming loads
    # the weights over it.
    head_init: Literal["data", "default"] = "data"
    # Instance norm (the paper's choice) makes outputs depend on the whole tile;
    # "none" gives a strictly local network whose tiled inference is exact.
    norm: Literal["instance", "none"] = "instance"


class DiscriminatorConfig(StrictModel):
    """Multi-scale 3D PatchGAN: independent discriminators at 1, 1/2, 1/4 resolution."""

    channels: PositiveInt = 16
    n_layers: PositiveInt = 3
    n_scales: PositiveInt = 3
