"""Training methods: one file per method, each step reading like its paper."""

from __future__ import annotations

from collections.abc import Mapping

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
    data_means: Mapping[str, float] | None = None,
) -> Method:
    """Instantiate the configured method (a closed ``match`` on the typed config).

    Parameters
    ----------
    cfg
        Method configuration.
    dataset_psf
        The dataset's PSF (Z, Y, X), if it stores one.
    seed
        This rank's seed for method-owned randomness (history pools).
    checkpointing
        Activation checkpointing of the generators.
    voxel_size
        Voxel size of the training data (Z, Y, X) in µm.
    data_means
        Mean intensity of the training data by batch key (``"x"``: sharp domain,
        ``"y"``: blurred domain), where known; each generator's output starts at the mean
        of the domain it maps into (``generator.head_init: data``). Must be the same on
        every rank.
    """
    means = dict(data_means or {})
    from hpcdeconv.methods.blind_cyclegan import BlindCycleGAN
    from hpcdeconv.methods.cyclegan import CycleGAN
    from hpcdeconv.methods.nonblind_cyclegan import NonBlindCycleGAN
    from hpcdeconv.methods.supervised import Supervised

    match cfg:
        case BlindCycleGANConfig():
            return BlindCycleGAN(cfg, dataset_psf, seed, checkpointing, voxel_size, means)
        case NonBlindCycleGANConfig():
            return NonBlindCycleGAN(cfg, dataset_psf, seed, checkpointing, means)
        case CycleGANConfig():
            return CycleGAN(cfg, seed, checkpointing, means)
        case SupervisedConfig():
            return Supervised(cfg, checkpointing, means)
    raise TypeError(f"unknown method configuration {type(cfg).__name__}")
