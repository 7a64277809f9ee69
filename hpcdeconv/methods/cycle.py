"""The cycle-consistent GAN step shared by the blind, non-blind and conventional cycleGANs.

Notation of the seed paper (Lim et al., IEEE TCI 2020): X is the sharp domain, Y the
blurred one, G_Θ : Y → X the deep deblurring generator and the blurring path
``blur`` : X → Y, which is the single linear PSF convolution ``h *`` for the proposed
methods or a second deep generator for the conventional cycleGAN. φ judges X, ψ judges Y.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hpcdeconv.config import DiscriminatorConfig, GANLossConfig, GeneratorConfig
from hpcdeconv.errors import ConfigError
from hpcdeconv.losses.adversarial import AdversarialLoss, make_adversarial
from hpcdeconv.losses.cycle import cycle_loss, identity_loss
from hpcdeconv.losses.terms import weighted_sum
from hpcdeconv.methods.base import DataInfo
from hpcdeconv.methods.image_pool import ImagePool
from hpcdeconv.methods.image_to_image import ImageToImageMethod
from hpcdeconv.models.factory import build_discriminator

#: Name under which each generator loss term is logged: the names existing run logs use.
LOGGED_AS = {
    "adversarial": "adv_g",
    "cycle": "cycle",
    "identity": "identity",
    "kernel_penalty": "kernel_penalty",
    "content": "content",
}


@dataclass
class CycleOutputs:
    """The images of one cycle pass, each (B, C, *S).

    ``x_idt`` and ``y_idt`` are the identity mappings, present only when asked for.
    """

    x_fake: torch.Tensor  # G(y): deblurred real blurred image
    y_fake: torch.Tensor  # blur(x): blurred real sharp image
    x_rec: torch.Tensor  # G(blur(x))
    y_rec: torch.Tensor  # blur(G(y))
    x_idt: torch.Tensor | None = None  # G(x)
    y_idt: torch.Tensor | None = None  # blur(y)


class CycleGenerators(nn.Module):
    """Group ``G``: the deblurring generator and the blurring path, one forward per step.

    Parameters
    ----------
    deblur
        G_Θ : Y → X.
    blur
        The blurring path X → Y (PSF layer or deep generator F).
    identity
        Also map sharp images through G (``x_idt``) for the identity term.
    blur_identity
        With ``identity``, also map blurred images through the blurring path
        (``y_idt``); only meaningful for a deep F, as ``h ∗ y ≈ y`` would pull a PSF
        towards a delta.
    """

    def __init__(
        self,
        deblur: nn.Module,
        blur: nn.Module,
        identity: bool = False,
        blur_identity: bool = False,
    ) -> None:
        super().__init__()
        self.deblur = deblur
        self.blur = blur
        self.identity = identity
        self.blur_identity = blur_identity

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> CycleOutputs:
        """Both cycles: x → blur(x) → G(blur(x)) and y → G(y) → blur(G(y)).

        ``x`` and ``y`` are (B, C, *S); with :attr:`identity` also G(x) (and blur(y)).
        """
        y_fake = self.blur(x)
        x_fake = self.deblur(y)
        out = CycleOutputs(
            x_fake=x_fake, y_fake=y_fake, x_rec=self.deblur(y_fake), y_rec=self.blur(x_fake)
        )
        if self.identity:
            out.x_idt = self.deblur(x)
            if self.blur_identity:
                out.y_idt = self.blur(y)
        return out


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


def check_kernel_size(size: Sequence[int], spatial_dims: int) -> None:
    """Refuse a PSF-layer ``kernel.size`` without one side per spatial axis of the data.

    Raises
    ------
    ConfigError
        If ``len(size) != spatial_dims``.
    """
    if len(size) != spatial_dims:
        axes = "(Z, Y, X)" if spatial_dims == 3 else "(Y, X)"
        raise ConfigError(
            f"method.kernel.size {list(size)} has {len(size)} axes but the training data is "
            f"{spatial_dims}D: give one side per axis {axes}"
        )


def domain_discriminators(
    cfg: DiscriminatorConfig, data: DataInfo, domains: tuple[str, ...]
) -> dict[str, nn.Module]:
    """One discriminator of ``cfg`` per judged domain, for the data's images."""
    return {
        name: build_discriminator(cfg, spatial_dims=data.spatial_dims, in_channels=data.channels)
        for name in domains
    }


class CycleGANMethod(ImageToImageMethod):
    """Shared step of the cycleGAN family (seed paper eqs. 13 and 15-18).

    The generator loss is ``Σ_k w_k L_k`` over the terms of :meth:`generator_terms`
    with the weights :attr:`weights` from the configuration: ``adversarial`` (1),
    ``cycle`` (γ, ``loss.cycle_weight``) and ``identity`` (``loss.identity_weight``, not
    computed at 0); subclasses add terms (the blind method's kernel penalty).

    Parameters
    ----------
    generator
        Configuration of G_Θ (built by :class:`ImageToImageMethod`).
    data
        The training data's description.
    checkpointing
        Activation checkpointing of the generators.
    blur
        Builds the blurring path X → Y; called after G_Θ is built, so that the random
        initial weights are drawn in one fixed order (G_Θ, blurring path,
        discriminators): a given seed starts every run of a method identically.
    domains
        Judged domains (``"x"``: φ on X; ``"y"``: ψ on Y), each with a discriminator
        of ``discriminator``.
    loss
        Adversarial loss, weights and history size.
    seed
        Seed of the history pools (one per judged domain).
    blur_identity
        Whether the identity term also maps ``y`` through the blurring path.
    """

    def __init__(
        self,
        generator: GeneratorConfig,
        data: DataInfo,
        checkpointing: bool,
        *,
        blur: Callable[[], nn.Module],
        discriminator: DiscriminatorConfig,
        domains: tuple[str, ...],
        loss: GANLossConfig,
        seed: int,
        blur_identity: bool = False,
    ) -> None:
        super().__init__(generator, data, checkpointing)
        self.adversarial = make_adversarial(loss.adversarial, loss.gp_eta)
        self.generators = CycleGenerators(
            self.generator, blur(), identity=loss.identity_weight > 0, blur_identity=blur_identity
        )
        discs = domain_discriminators(discriminator, data, domains)
        self.discriminators = DomainDiscriminators(self.adversarial, **discs)
        #: Weight of each generator loss term by name.
        self.weights: dict[str, float] = {
            "adversarial": 1.0,
            "cycle": loss.cycle_weight,
            "identity": loss.identity_weight,
        }
        # One 50-image history per judged domain, per rank.
        self.pools = {
            name: ImagePool(loss.pool_size, seed=seed + i) for i, name in enumerate(discs)
        }
        self._last: dict[str, torch.Tensor] = {}

    def groups(self) -> dict[str, nn.Module]:
        return {"G": self.generators, "D": self.discriminators}

    def generator_terms(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        out: CycleOutputs,
        discs: Mapping[str, nn.Module],
    ) -> dict[str, torch.Tensor]:
        """The unweighted generator loss terms of one step, by name.

        Parameters
        ----------
        x, y
            The batch's sharp and blurred images, (B, C, *S).
        out
            The generators' outputs for them.
        discs
            The discriminators by judged domain, parameters frozen.
        """
        fakes = {"x": out.x_fake, "y": out.y_fake}
        terms = {
            "adversarial": sum(
                self.adversarial.generator_loss(disc(fakes[name])) for name, disc in discs.items()
            ),
            "cycle": cycle_loss(x, out.x_rec, y, out.y_rec),
        }
        if out.x_idt is not None:
            identity = identity_loss(x, out.x_idt)
            if out.y_idt is not None:
                identity = identity + identity_loss(y, out.y_idt)
            terms["identity"] = identity
        return terms  # type: ignore[return-value]

    def step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = batch["x"], batch["y"]
        G, D = self.t["G"], self.t["D"]
        discs = D.module.discs
        # Generator step: min over Θ (and h) of the weighted terms, D frozen.
        with D.frozen():
            out: CycleOutputs = G(x, y)
            terms = self.generator_terms(x, y, out, discs)
            loss_g = weighted_sum(terms, self.weights)
            G.backward(loss_g)
            G.step()
        # Discriminator step on fakes drawn from the history pools.
        fakes = {"x": out.x_fake, "y": out.y_fake}
        reals = {"x": x, "y": y}
        pooled = {name: self.pools[name].query(fakes[name].detach()) for name in discs}
        loss_d = D(reals, pooled)
        D.backward(loss_d)
        D.step()
        self._last = {"input": y[0, 0], "output": out.x_fake[0, 0], "sharp": x[0, 0]}
        named = {LOGGED_AS[k]: v for k, v in terms.items()}
        # The order of earlier releases' logs: loss_g, adv_g, cycle, loss_d, then the rest.
        losses = {
            "loss_g": loss_g,
            "adv_g": named.pop("adv_g"),
            "cycle": named.pop("cycle"),
            "loss_d": loss_d,
            **named,
        }
        return {k: torch.as_tensor(v).detach().float() for k, v in losses.items()}

    def images(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float() for k, v in self._last.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"pools": {name: pool.state_dict() for name, pool in self.pools.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, pool in self.pools.items():
            pool.load_state_dict(state["pools"][name])
