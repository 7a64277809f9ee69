"""Non-blind cycleGAN: the known PSF is a fixed blur path (Lim et al., IEEE TCI 2020, eqs. 15-18).

    min_Θ max_φ  ℓ_GAN(Θ; φ) + γ ℓ_cycle(Θ)

With ``h`` known, y = h * x holds by construction in the blurred domain, so the
discriminator ψ of the blurred domain is dropped and only φ (sharp domain) remains.
"""

from __future__ import annotations

from hpcdeconv.config import NonBlindCycleGANConfig
from hpcdeconv.methods.base import DataInfo
from hpcdeconv.methods.cycle import CycleGANMethod, check_kernel_size
from hpcdeconv.models.psf_layer import build_psf_layer


class NonBlindCycleGAN(CycleGANMethod):
    """G_Θ, fixed h from the dataset or a file, discriminator φ on X only.

    Parameters
    ----------
    cfg
        Method configuration.
    data
        The training data's description (its stored PSF for ``kernel.init: dataset``);
        ``kernel.size`` has its ``spatial_dims`` axes.
    seed
        Seed of the history pool.
    checkpointing
        Activation checkpointing of G_Θ.

    Raises
    ------
    ConfigError
        If ``kernel.size`` does not have one side per spatial axis of the data.
    InputError
        If the PSF cannot be read or does not match ``kernel.size``.
    """

    def __init__(
        self, cfg: NonBlindCycleGANConfig, data: DataInfo, *, seed: int, checkpointing: bool
    ) -> None:
        check_kernel_size(cfg.kernel.size, data.spatial_dims)
        super().__init__(
            cfg.generator,
            data,
            checkpointing,
            blur=lambda: build_psf_layer(cfg.kernel, data.psf, learnable=False),
            discriminator=cfg.discriminator,
            domains=("x",),
            loss=cfg.loss,
            seed=seed,
        )
