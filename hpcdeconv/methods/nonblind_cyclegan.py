"""Non-blind cycleGAN: the known PSF is a fixed blur path (Lim et al., IEEE TCI 2020, eqs. 15-18).

    min_Θ max_φ  ℓ_GAN(Θ; φ) + γ ℓ_cycle(Θ)

With ``h`` known, y = h * x holds by construction in the blurred domain, so the
discriminator ψ of the blurred domain is dropped and only φ (sharp domain) remains.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from hpcdeconv.config import NonBlindCycleGANConfig
from hpcdeconv.methods.cycle import CycleGANMethod, build_discriminator, build_unet
from hpcdeconv.models.psf_layer import build_psf_layer


class NonBlindCycleGAN(CycleGANMethod):
    """G_Θ (3D U-Net), fixed h from the dataset or a file, discriminator φ on X only."""

    def __init__(
        self,
        cfg: NonBlindCycleGANConfig,
        dataset_psf: np.ndarray | None,
        seed: int,
        checkpointing: bool,
        data_means: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(
            deblur=build_unet(cfg.generator, checkpointing, (data_means or {}).get("x")),
            blur=build_psf_layer(cfg.kernel, dataset_psf, learnable=False),
            discs={"x": build_discriminator(cfg.discriminator)},
            loss=cfg.loss,
            seed=seed,
        )
