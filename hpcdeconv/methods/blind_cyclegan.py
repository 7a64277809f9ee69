"""Blind cycleGAN with a learnable linear blur kernel (Lim et al., IEEE TCI 2020, eq. 13).

    min_{Θ, h} max_{φ, ψ}  ℓ_GAN(Θ, h; φ, ψ) + γ ℓ_cycle(Θ, h)  (+ λ Q(h))

The blurring generator is one 3D convolution ``h *`` (0.03 M parameters for 31³) instead
of a second deep network, so only G_Θ is deep.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from hpcdeconv.config import BlindCycleGANConfig
from hpcdeconv.methods.cycle import CycleGANMethod, build_discriminator, build_unet
from hpcdeconv.models.psf_layer import PSFLayer, build_psf_layer
from hpcdeconv.physics.psf_io import export_kernel


class BlindCycleGAN(CycleGANMethod):
    """G_Θ (3D U-Net), learnable h, discriminators φ on X and ψ on Y."""

    def __init__(
        self,
        cfg: BlindCycleGANConfig,
        dataset_psf: np.ndarray | None,
        seed: int,
        checkpointing: bool,
        voxel_size: tuple[float, ...],
        data_means: Mapping[str, float] | None = None,
    ) -> None:
        self.cfg = cfg
        self.voxel_size = voxel_size
        self.kernel = build_psf_layer(cfg.kernel, dataset_psf, learnable=True)
        super().__init__(
            deblur=build_unet(cfg.generator, checkpointing, (data_means or {}).get("x")),
            blur=self.kernel,
            discs={
                "x": build_discriminator(cfg.discriminator),
                "y": build_discriminator(cfg.discriminator),
            },
            loss=cfg.loss,
            seed=seed,
        )

    def kernel_penalty(self) -> torch.Tensor | None:
        k = self.cfg.kernel
        if k.penalty == "none" or k.penalty_weight == 0:
            return None
        return k.penalty_weight * self.kernel.penalty(k.penalty)

    def images(self) -> dict[str, torch.Tensor]:
        return {**super().images(), "psf": self.kernel.kernel().detach().float()}

    def export(self, run_dir: Path, true_psf: torch.Tensor | None) -> dict[str, Path]:
        truth = None if true_psf is None else true_psf.numpy()
        info = export_kernel(self.blur_layer(), run_dir / "psf", self.voxel_size, truth)
        (run_dir / "psf" / "psf_learned.json").write_text(json.dumps(info, indent=2))
        return {"psf": run_dir / "psf"}

    def blur_layer(self) -> PSFLayer:
        """The learned PSF layer (as trained, unwrapped)."""
        return self.kernel
