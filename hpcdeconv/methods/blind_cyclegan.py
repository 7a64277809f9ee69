"""Blind cycleGAN with a learnable linear blur kernel (Lim et al., IEEE TCI 2020, eq. 13).

    min_{Θ, h} max_{φ, ψ}  ℓ_GAN(Θ, h; φ, ψ) + γ ℓ_cycle(Θ, h)  (+ λ Q(h))

The blurring generator is one convolution ``h *`` (0.03 M parameters for 31³) instead
of a second deep network, so only G_Θ is deep.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from hpcdeconv.config import BlindCycleGANConfig
from hpcdeconv.methods.base import DataInfo
from hpcdeconv.methods.cycle import CycleGANMethod, CycleOutputs, check_kernel_size
from hpcdeconv.models.psf_layer import PSFLayer, build_psf_layer
from hpcdeconv.physics.psf_io import export_kernel


class BlindCycleGAN(CycleGANMethod):
    """G_Θ, learnable h, discriminators φ on X and ψ on Y.

    Parameters
    ----------
    cfg
        Method configuration; ``kernel.penalty_weight`` is λ of the term
        ``kernel_penalty`` (``Q(h)``, not computed at 0 or without a penalty).
    data
        The training data's description; ``kernel.size`` has its ``spatial_dims`` axes.
    seed
        Seed of the history pools.
    checkpointing
        Activation checkpointing of G_Θ.

    Raises
    ------
    ConfigError
        If ``kernel.size`` does not have one side per spatial axis of the data.
    """

    def __init__(
        self, cfg: BlindCycleGANConfig, data: DataInfo, *, seed: int, checkpointing: bool
    ) -> None:
        check_kernel_size(cfg.kernel.size, data.spatial_dims)
        self.cfg = cfg
        self.kernel = build_psf_layer(cfg.kernel, data.psf, learnable=True)
        super().__init__(
            cfg.generator,
            data,
            checkpointing,
            blur=lambda: self.kernel,
            discriminator=cfg.discriminator,
            domains=("x", "y"),
            loss=cfg.loss,
            seed=seed,
        )
        self.weights["kernel_penalty"] = cfg.kernel.penalty_weight

    def generator_terms(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        out: CycleOutputs,
        discs: Mapping[str, nn.Module],
    ) -> dict[str, torch.Tensor]:
        """The cycleGAN terms plus ``kernel_penalty`` Q(h) when it is weighted."""
        terms = super().generator_terms(x, y, out, discs)
        k = self.cfg.kernel
        if k.penalty != "none" and k.penalty_weight > 0:
            terms["kernel_penalty"] = self.kernel.penalty(k.penalty)
        return terms

    def images(self) -> dict[str, torch.Tensor]:
        return {**super().images(), "psf": self.kernel.kernel().detach().float()}

    def export(self, run_dir: Path, true_psf: torch.Tensor | None) -> dict[str, Path]:
        truth = None if true_psf is None else true_psf.numpy()
        info = export_kernel(self.blur_layer(), run_dir / "psf", self.data.voxel_size, truth)
        (run_dir / "psf" / "psf_learned.json").write_text(json.dumps(info, indent=2))
        return {"psf": run_dir / "psf"}

    def blur_layer(self) -> PSFLayer:
        """The learned PSF layer (as trained, unwrapped)."""
        return self.kernel
