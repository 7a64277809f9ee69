"""COMI: cycleGAN correction of out-of-focus microscopy images (Zhang et al., CSBJ 2022).

Notation of the cycleGAN family (:mod:`hpcdeconv.methods.cycle`): X is the in-focus
domain, Y the out-of-focus one, G : Y → X corrects and F : X → Y defocuses; φ judges X and
ψ judges Y, each a 70×70 PatchGAN. The generator minimises

    l = λ1·l_GAN + λ2·l_content + λ3·l_cycle  (+ λ_idt·l_identity)

with the log-loss adversarial term of both directions, the L1 cycle term
``‖F(G(y)) − y‖₁ + ‖G(F(x)) − x‖₁`` and the content term, the squared distance of VGG-19
feature maps (:class:`~hpcdeconv.losses.perceptual.ContentLoss`) of each generated
image and its target, in both directions. With paired planes (``data.kind: paired``) the
target of G(y) is the in-focus plane x of the same field and that of F(x) is y; on
unpaired domains there is no such image, and the target is the generator's own input
(``G(y)`` keeps the content of ``y``, ``F(x)`` that of ``x``), the perceptual
content-preservation reading of the paper's term.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from hpcdeconv.config import COMIConfig
from hpcdeconv.errors import ConfigError
from hpcdeconv.losses.perceptual import ContentLoss, build_content_loss
from hpcdeconv.methods.base import DataInfo, DataKind
from hpcdeconv.methods.cycle import CycleOutputs
from hpcdeconv.methods.cyclegan import CycleGAN

#: The network range of images without a recorded intensity mapping (raw values).
_UNMAPPED_RANGE = (0.0, 1.0)


class COMI(CycleGAN):
    """G and F (ResNet generators), 70×70 PatchGANs on X and Y, COMI's weighted loss.

    Parameters
    ----------
    cfg
        Method configuration.
    data
        The training data's description: 2D images of 1 or 3 channels; its intensity
        mapping gives the range the VGG-19 input is normalised from.
    seed
        Seed of the history pools.
    checkpointing
        Activation checkpointing of both generators.

    Raises
    ------
    ConfigError
        Data that are not 2D images.
    """

    also_data_kinds: ClassVar[tuple[DataKind, ...]] = ("paired",)

    def __init__(self, cfg: COMIConfig, data: DataInfo, *, seed: int, checkpointing: bool) -> None:
        if data.spatial_dims != 2:
            raise ConfigError(
                f"COMI corrects 2D images; the training data are {data.spatial_dims}D "
                "(give data.patch as [Y, X] on a dataset of 2D images)"
            )
        super().__init__(cfg, data, seed=seed, checkpointing=checkpointing)
        data_range = data.intensity.target if data.intensity is not None else _UNMAPPED_RANGE
        #: The content term's frozen VGG-19 (or pixel L2 without weights).
        self.content: ContentLoss = build_content_loss(cfg.content, data.channels, data_range)
        self.paired = data.paired
        self.weights.update(adversarial=cfg.loss.adversarial_weight)
        self.weights["content"] = cfg.loss.content_weight

    def loss_networks(self) -> dict[str, nn.Module]:
        """The content loss (VGG-19 and its input normalisation): frozen, not checkpointed."""
        return {"content": self.content}

    def generator_terms(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        out: CycleOutputs,
        discs: Mapping[str, nn.Module],
    ) -> dict[str, torch.Tensor]:
        """The cycleGAN terms and ``content``, unweighted (λ applied by the caller)."""
        terms = super().generator_terms(x, y, out, discs)
        if self.weights["content"] > 0:
            # Paired: each generated image against the other domain's image of the same
            # field; unpaired: against the generator's own input.
            target_of_g, target_of_f = (x, y) if self.paired else (y, x)
            terms["content"] = self.content(target_of_g, out.x_fake) + self.content(
                target_of_f, out.y_fake
            )
        return terms
