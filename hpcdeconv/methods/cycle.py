"""The cycle-consistent GAN step shared by the blind, non-blind and conventional cycleGANs.

Notation of the seed paper (Lim et al., IEEE TCI 2020): X is the sharp domain, Y the
blurred one, G_Θ : Y → X the deep deblurring generator and the blurring path
``blur`` : X → Y, which is the single linear PSF convolution ``h *`` for the proposed
methods or a second deep generator for the conventional cycleGAN. φ judges X, ψ judges Y.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hpcdeconv.config import DiscriminatorConfig, GANLossConfig, UNetConfig
from hpcdeconv.losses.adversarial import AdversarialLoss, make_adversarial
from hpcdeconv.losses.cycle import cycle_loss
from hpcdeconv.losses.image_pool import ImagePool
from hpcdeconv.methods.base import Method
from hpcdeconv.models.discriminators import MultiScalePatchGAN
from hpcdeconv.models.unet import UNet


def build_unet(cfg: UNetConfig, checkpointing: bool, start_mean: float | None = None) -> UNet:
    """The 3D U-Net generator of the seed paper from its configuration.

    Parameters
    ----------
    cfg
        Generator configuration.
    checkpointing
        Activation checkpointing while training.
    start_mean
        Training data's mean of the domain the generator maps into. With
        ``cfg.head_init == "data"`` the untrained output starts there
        (:meth:`~hpcdeconv.models.unet.UNet.start_at`); ``None`` (inference, where the
        weights are loaded anyway) keeps PyTorch's initialisation.
    """
    net = UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=cfg.channels,
        depth=cfg.depth,
        final_activation=cfg.final_activation,
        checkpointing=checkpointing,
        norm=cfg.norm == "instance",
    )
    if cfg.head_init == "data" and start_mean is not None:
        net.start_at(start_mean)
    return net


def build_discriminator(cfg: DiscriminatorConfig) -> MultiScalePatchGAN:
    """Three (``n_scales``) independent 3D PatchGANs at 1, 1/2, 1/4 resolution."""
    return MultiScalePatchGAN(
        spatial_dims=3,
        in_channels=1,
        channels=cfg.channels,
        n_layers=cfg.n_layers,
        n_scales=cfg.n_scales,
    )


@dataclass
class CycleOutputs:
    """The four volumes of one cycle pass, each (B, 1, Z, Y, X)."""

    x_fake: torch.Tensor  # G(y): deblurred real blurred volume
    y_fake: torch.Tensor  # blur(x): blurred real sharp volume
    x_rec: torch.Tensor  # G(blur(x))
    y_rec: torch.Tensor  # blur(G(y))


class CycleGenerators(nn.Module):
    """Group ``G``: the deblurring generator and the blurring path, one forward per step."""

    def __init__(self, deblur: nn.Module, blur: nn.Module) -> None:
        super().__init__()
        self.deblur = deblur
        self.blur = blur

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> CycleOutputs:
        """Both cycles: x → blur(x) → G(blur(x)) and y → G(y) → blur(G(y))."""
        y_fake = self.blur(x)
        x_fake = self.deblur(y)
        return CycleOutputs(
            x_fake=x_fake, y_fake=y_fake, x_rec=self.deblur(y_fake), y_rec=self.blur(x_fake)
        )


class DomainDiscriminators(nn.Module):
    """Group ``D``: one multi-scale discriminator per judged domain (``x`` = φ, ``y`` = ψ)."""

    def __init__(self, adversarial: AdversarialLoss, **discs: nn.Module) -> None:
        super().__init__()
        self.discs = nn.ModuleDict(discs)
        self.adversarial = adversarial

    def forward(
        self, real: Mapping[str, torch.Tensor], fake: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """Sum over domains of the discriminator loss on real vs (pooled, detached) fakes."""
        losses = [
            self.adversarial.discriminator_loss(disc, real[name], fake[name])
            for name, disc in self.discs.items()
        ]
        return torch.stack(losses).sum()


class CycleGANMethod(Method):
    """Shared step of the cycleGAN family (seed paper eqs. 13 and 15-18).

    Subclasses choose the blurring path and the judged domains.
    """

    def __init__(
        self,
        deblur: nn.Module,
        blur: nn.Module,
        discs: Mapping[str, nn.Module],
        loss: GANLossConfig,
        seed: int,
    ) -> None:
        super().__init__()
        self.loss_cfg = loss
        self.adversarial = make_adversarial(loss.adversarial, loss.gp_eta)
        self.generators = CycleGenerators(deblur, blur)
        self.discriminators = DomainDiscriminators(self.adversarial, **discs)
        # One 50-volume history per judged domain, per rank.
        self.pools = {
            name: ImagePool(loss.pool_size, seed=seed + i) for i, name in enumerate(discs)
        }
        self._last: dict[str, torch.Tensor] = {}

    def groups(self) -> dict[str, nn.Module]:
        return {"G": self.generators, "D": self.discriminators}

    def deblur_net(self) -> nn.Module:
        return self.generators.deblur

    def kernel_penalty(self) -> torch.Tensor | None:
        """Optional regulariser λ Q(h) of the blur path (blind method only)."""
        return None

    def step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = batch["x"], batch["y"]
        G, D = self.t["G"], self.t["D"]
        discs = D.module.discs
        # Generator step: min over Θ (and h) of ℓ_GAN + γ ℓ_cycle (+ λ Q(h)), D frozen.
        with D.frozen():
            out: CycleOutputs = G(x, y)
            fakes = {"x": out.x_fake, "y": out.y_fake}
            adv = sum(
                self.adversarial.generator_loss(disc(fakes[name])) for name, disc in discs.items()
            )
            cyc = cycle_loss(x, out.x_rec, y, out.y_rec)
            loss_g = adv + self.loss_cfg.cycle_weight * cyc
            penalty = self.kernel_penalty()
            if penalty is not None:
                loss_g = loss_g + penalty
            G.backward(loss_g)
            G.step()
        # Discriminator step on fakes drawn from the history pools.
        reals = {"x": x, "y": y}
        pooled = {name: self.pools[name].query(fakes[name].detach()) for name in discs}
        loss_d = D(reals, pooled)
        D.backward(loss_d)
        D.step()
        self._last = {"input": y[0, 0], "output": out.x_fake[0, 0], "sharp": x[0, 0]}
        losses = {"loss_g": loss_g, "adv_g": adv, "cycle": cyc, "loss_d": loss_d}
        if penalty is not None:
            losses["kernel_penalty"] = penalty
        return {k: torch.as_tensor(v).detach().float() for k, v in losses.items()}

    def images(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float() for k, v in self._last.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"pools": {name: pool.state_dict() for name, pool in self.pools.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, pool in self.pools.items():
            pool.load_state_dict(state["pools"][name])
