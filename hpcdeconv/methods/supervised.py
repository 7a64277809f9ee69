"""Supervised baseline: the generator trained on paired (blurred, sharp) patches.

min_Θ  E‖x − G_Θ(y)‖²  (+ w · adversarial term with a discriminator φ on X, if w > 0)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from hpcdeconv.config import SupervisedConfig
from hpcdeconv.losses.adversarial import make_adversarial
from hpcdeconv.losses.terms import weighted_sum
from hpcdeconv.methods.base import DataInfo, DataKind
from hpcdeconv.methods.cycle import DomainDiscriminators, domain_discriminators
from hpcdeconv.methods.image_to_image import ImageToImageMethod


class Supervised(ImageToImageMethod):
    """MSE (or MSE + adversarial) training of G_Θ on pairs.

    Parameters
    ----------
    cfg
        Method configuration: ``adversarial_weight`` w, and the adversarial loss
        (``adversarial``, ``gp_eta``) of that term and of φ.
    data
        The training data's description.
    checkpointing
        Activation checkpointing of G_Θ.
    """

    data_kind: ClassVar[DataKind] = "paired"

    def __init__(self, cfg: SupervisedConfig, data: DataInfo, *, checkpointing: bool) -> None:
        super().__init__(cfg.generator, data, checkpointing)
        #: Weight of each generator loss term by name.
        self.weights = {"mse": 1.0, "adversarial": cfg.adversarial_weight}
        self.adversarial = make_adversarial(cfg.adversarial, cfg.gp_eta)
        self.discriminators = (
            DomainDiscriminators(
                self.adversarial, **domain_discriminators(cfg.discriminator, data, ("x",))
            )
            if cfg.adversarial_weight > 0
            else None
        )
        self._last: dict[str, torch.Tensor] = {}

    def groups(self) -> dict[str, nn.Module]:
        groups: dict[str, nn.Module] = {"G": self.generator}
        if self.discriminators is not None:
            groups["D"] = self.discriminators
        return groups

    def step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = batch["x"], batch["y"]
        G = self.t["G"]
        D = self.t.get("D")
        x_hat = G(y)
        terms = {"mse": F.mse_loss(x_hat.float(), x.float())}
        if D is None:
            loss_g = weighted_sum(terms, self.weights)
            G.backward(loss_g)
            G.step()
        else:
            with D.frozen():
                terms["adversarial"] = self.adversarial.generator_loss(D.module.discs["x"](x_hat))
                loss_g = weighted_sum(terms, self.weights)
                G.backward(loss_g)
                G.step()
        losses = {"mse": terms["mse"]}
        if D is not None:
            loss_d = D({"x": x}, {"x": x_hat.detach()})
            D.backward(loss_d)
            D.step()
            losses.update(adv_g=terms["adversarial"], loss_d=loss_d)
        losses["loss_g"] = loss_g
        self._last = {"input": y[0, 0], "output": x_hat[0, 0], "sharp": x[0, 0]}
        return {k: v.detach().float() for k, v in losses.items()}

    def images(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float() for k, v in self._last.items()}
