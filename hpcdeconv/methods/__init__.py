"""Training methods: one file per method, each step reading like its paper."""

from __future__ import annotations

import numpy as np

from hpcdeconv.config import (
    BlindCycleGANConfig,
    CycleGANConfig,
    MethodConfig,
    NonBlindCycleGANConfig,
    SupervisedConfig,
)
from hpcdeconv.methods.base import Method


def build_method(
    cfg: MethodConfig,
    *,
    dataset_psf: np.ndarray | None,
    seed: int,
    checkpointing: bool,
    voxel_size: tuple[float, ...],
) -> Method:
    """Instantiate the configured method (a closed ``match`` on the typed config)."""
    from hpcdeconv.methods.blind_cyclegan import BlindCycleGAN
    from hpcdeconv.methods.cyclegan import CycleGAN
    from hpcdeconv.methods.nonblind_cyclegan import NonBlindCycleGAN
    from hpcdeconv.methods.supervised import Supervised

    match cfg:
        case BlindCycleGANConfig():
            return BlindCycleGAN(cfg, dataset_psf, seed, checkpointing, voxel_size)
        case NonBlindCycleGANConfig():
            return NonBlindCycleGAN(cfg, dataset_psf, seed, checkpointing)
        case CycleGANConfig():
            return CycleGAN(cfg, seed, checkpointing)
        case SupervisedConfig():
            return Supervised(cfg, checkpointing)
    raise TypeError(f"unknown method configuration {type(cfg).__name__}")
