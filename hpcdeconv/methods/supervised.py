"""Supervised baseline: the 3D U-Net trained on paired (blurred, sharp) patches.

min_Θ  E‖x − G_Θ(y)‖²  (+ w · LSGAN term with a discriminator φ on X, if w > 0)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from hpcdeconv.config import SupervisedConfig
from hpcdeconv.losses.adversarial import make_adversarial
from hpcdeconv.methods.base import Method
from hpcdeconv.methods.cycle import DomainDiscriminators, build_discriminator, build_unet


class Supervised(Method):
    """MSE (or MSE + LSGAN) training of G_Θ on pairs."""

    paired = True
    data_kind = "paired"

    def __init__(
        self,
        cfg: SupervisedConfig,
        checkpointing: bool,
        data_means: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.weight = cfg.adversarial_weight
        self.generator = build_unet(cfg.generator, checkpointing, (data_means or {}).get("x"))
        self.adversarial = make_adversarial("lsgan", 10.0)
        self.discriminators = (
            DomainDiscriminators(self.adversarial, x=build_discriminator(cfg.discriminator))
            if self.weight > 0
            else None
        )
        self._last: dict[str, torch.Tensor] = {}

    def groups(self) -> dict[str, nn.Module]:
        groups: dict[str, nn.Module] = {"G": self.generator}
        if self.discriminators is not None:
            groups["D"] = self.discriminators
        return groups

    def deblur_net(self) -> nn.Module:
        return self.generator

    def step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = batch["x"], batch["y"]
        G = self.t["G"]
        D = self.t.get("D")
        x_hat = G(y)
        mse = F.mse_loss(x_hat.float(), x.float())
        losses = {"mse": mse}
        if D is None:
            loss_g = mse
            G.backward(loss_g)
            G.step()
        else:
            with D.frozen():
                adv = self.adversarial.generator_loss(D.module.discs["x"](x_hat))
                loss_g = mse + self.weight * adv
                G.backward(loss_g)
                G.step()
            loss_d = D({"x": x}, {"x": x_hat.detach()})
            D.backward(loss_d)
            D.step()
            losses.update(adv_g=adv, loss_d=loss_d)
        losses["loss_g"] = loss_g
        self._last = {"input": y[0, 0], "output": x_hat[0, 0], "sharp": x[0, 0]}
        return {k: v.detach().float() for k, v in losses.items()}

    def images(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float() for k, v in self._last.items()}
