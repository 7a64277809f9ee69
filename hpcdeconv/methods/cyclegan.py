"""Conventional cycleGAN baseline: a second deep 3D U-Net F : X → Y as the blurring path.

Same objective as the blind method (eq. 13) with h * replaced by F, i.e. two deep
generators (about twice the parameters and step time).
"""

from __future__ import annotations

from collections.abc import Mapping

from hpcdeconv.config import CycleGANConfig
from hpcdeconv.methods.cycle import CycleGANMethod, build_discriminator, build_unet


class CycleGAN(CycleGANMethod):
    """G_Θ and F (two 3D U-Nets), discriminators φ on X and ψ on Y."""

    def __init__(
        self,
        cfg: CycleGANConfig,
        seed: int,
        checkpointing: bool,
        data_means: Mapping[str, float] | None = None,
    ) -> None:
        means = data_means or {}
        super().__init__(
            # G : Y → X starts at the sharp domain's mean, F : X → Y at the blurred one's.
            deblur=build_unet(cfg.generator, checkpointing, means.get("x")),
            blur=build_unet(cfg.blur_generator, checkpointing, means.get("y")),
            discs={
                "x": build_discriminator(cfg.discriminator),
                "y": build_discriminator(cfg.discriminator),
            },
            loss=cfg.loss,
            seed=seed,
        )
