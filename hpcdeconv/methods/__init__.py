"""Training methods: one file per method, each step reading like its paper."""

from __future__ import annotations

from hpcdeconv.config import (
    BlindCycleGANConfig,
    COMIConfig,
    CycleGANConfig,
    MethodConfig,
    NonBlindCycleGANConfig,
    PSFRegressionConfig,
    SupervisedConfig,
)
from hpcdeconv.methods.base import DataInfo, Method


def build_method(cfg: MethodConfig, data: DataInfo, *, seed: int, checkpointing: bool) -> Method:
    """Instantiate the configured method (a closed ``match`` on the typed config).

    Parameters
    ----------
    cfg
        Method configuration.
    data
        What the training data is: spatial dims, channels, voxel size (µm), the stored
        PSF and the mean of each domain (the same on every rank).
    seed
        This rank's seed for method-owned randomness (history pools).
    checkpointing
        Activation checkpointing of the generators.
    """
    from hpcdeconv.methods.blind_cyclegan import BlindCycleGAN
    from hpcdeconv.methods.comi import COMI
    from hpcdeconv.methods.cyclegan import CycleGAN
    from hpcdeconv.methods.nonblind_cyclegan import NonBlindCycleGAN
    from hpcdeconv.methods.psf_regression import PSFRegression
    from hpcdeconv.methods.supervised import Supervised

    match cfg:
        case BlindCycleGANConfig():
            return BlindCycleGAN(cfg, data, seed=seed, checkpointing=checkpointing)
        case NonBlindCycleGANConfig():
            return NonBlindCycleGAN(cfg, data, seed=seed, checkpointing=checkpointing)
        case CycleGANConfig():
            return CycleGAN(cfg, data, seed=seed, checkpointing=checkpointing)
        case COMIConfig():
            return COMI(cfg, data, seed=seed, checkpointing=checkpointing)
        case SupervisedConfig():
            return Supervised(cfg, data, checkpointing=checkpointing)
        case PSFRegressionConfig():
            return PSFRegression(cfg, data, checkpointing=checkpointing)
    raise TypeError(f"unknown method configuration {type(cfg).__name__}")
