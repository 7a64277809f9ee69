"""Adversarial losses (LSGAN, WGAN-GP, the original log loss) for single- and multi-scale
discriminators.

A discriminator may return one score map or a list of them (one per scale); losses are
computed per scale and averaged over scales.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpcdeconv.errors import ConfigError

Scores = Tensor | Sequence[Tensor]


def as_scales(scores: Scores) -> list[Tensor]:
    """A discriminator's output as a list of per-scale score maps, in fp32.

    Scores of a bf16/fp16 discriminator are reduced in fp32, so the losses stay fp32.
    """
    return [s.float() for s in ([scores] if isinstance(scores, Tensor) else scores)]


def _mean_over_scales(values: list[Tensor]) -> Tensor:
    return torch.stack(values).mean()


class AdversarialLoss(ABC):
    """The two halves of a GAN objective.

    ``discriminator_loss`` evaluates the discriminator itself (WGAN-GP needs it on
    interpolated inputs); ``fake`` must already be detached by the caller so that this
    loss trains only the discriminator. ``generator_loss`` takes the discriminator's
    outputs on non-detached fakes, computed by the caller with frozen discriminator
    parameters.
    """

    @abstractmethod
    def discriminator_loss(self, disc: nn.Module, real: Tensor, fake: Tensor) -> Tensor:
        """Scalar loss minimised by the discriminator; ``real``, ``fake`` (B, C, *S)."""

    @abstractmethod
    def generator_loss(self, fake_outputs: Scores) -> Tensor:
        """Scalar loss minimised by the generator from the discriminator's scores on fakes."""


class LSGAN(AdversarialLoss):
    """Least-squares GAN (Mao et al., ICCV 2017), the paper's default.

    Discriminator: ½ E[(D(y) − 1)²] + ½ E[D(ŷ)²]; generator: E[(D(ŷ) − 1)²],
    with ``y`` real and ``ŷ`` generated; E is the mean over batch and patches.
    """

    def discriminator_loss(self, disc: nn.Module, real: Tensor, fake: Tensor) -> Tensor:
        """See class docstring."""
        per_scale = [
            0.5 * ((d_real - 1) ** 2).mean() + 0.5 * (d_fake**2).mean()
            for d_real, d_fake in zip(as_scales(disc(real)), as_scales(disc(fake)), strict=True)
        ]
        return _mean_over_scales(per_scale)

    def generator_loss(self, fake_outputs: Scores) -> Tensor:
        """See class docstring."""
        return _mean_over_scales([((d - 1) ** 2).mean() for d in as_scales(fake_outputs)])


class LogGAN(AdversarialLoss):
    """The original GAN log loss (Goodfellow et al., "Generative adversarial nets", NeurIPS
    2014), on raw scores (logits) σ⁻¹(D).

    Discriminator: −E[log σ(D(y))] − E[log(1 − σ(D(ŷ)))], the negated value function
    V(D, G) of the paper's eq. 1 (binary cross-entropy of real → 1 plus fake → 0);
    generator: −E[log σ(D(ŷ))], the paper's non-saturating alternative to minimising
    log(1 − σ(D(ŷ))), whose gradient vanishes while the discriminator wins. ``y`` is real,
    ``ŷ`` generated, σ the logistic function, E the mean over batch and patches. Computed
    with ``binary_cross_entropy_with_logits``, stable for any score.
    """

    def discriminator_loss(self, disc: nn.Module, real: Tensor, fake: Tensor) -> Tensor:
        """See class docstring."""
        per_scale = [
            F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
            + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
            for d_real, d_fake in zip(as_scales(disc(real)), as_scales(disc(fake)), strict=True)
        ]
        return _mean_over_scales(per_scale)

    def generator_loss(self, fake_outputs: Scores) -> Tensor:
        """See class docstring."""
        return _mean_over_scales(
            [
                F.binary_cross_entropy_with_logits(d, torch.ones_like(d))
                for d in as_scales(fake_outputs)
            ]
        )


class WGANGP(AdversarialLoss):
    """Wasserstein GAN with gradient penalty (Gulrajani et al., NeurIPS 2017).

    Critic: E[D(ŷ)] − E[D(y)] + η E[(‖∇ D(x̃)‖₂ − 1)²] at random interpolates
    ``x̃ = ε y + (1 − ε) ŷ``, ``ε ~ U[0, 1]`` per sample; generator: −E[D(ŷ)].
    A patch critic's value for one sample is the mean of its patch scores; each scale of
    a multi-scale critic is penalised separately, being an independent critic.

    Parameters
    ----------
    eta
        Weight η of the gradient penalty.
    """

    def __init__(self, eta: float = 10.0) -> None:
        if eta < 0:
            raise ConfigError(f"WGAN-GP penalty weight eta must be >= 0, got {eta}")
        self.eta = eta

    def gradient_penalty(self, disc: nn.Module, real: Tensor, fake: Tensor) -> Tensor:
        """Unweighted penalty E[(‖∇ₓ D(x̃)‖₂ − 1)²], averaged over scales.

        Parameters
        ----------
        disc
            The critic; returns (B, 1, *S') or a list of such maps.
        real, fake
            (B, C, *S); ``fake`` detached.
        """
        eps_shape = (real.shape[0],) + (1,) * (real.ndim - 1)
        eps = torch.rand(eps_shape, device=real.device, dtype=real.dtype)
        mixed = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
        per_scale = []
        for scores in as_scales(disc(mixed)):
            per_sample = scores.flatten(1).mean(dim=1)
            (grad,) = torch.autograd.grad(per_sample.sum(), mixed, create_graph=True)
            norms = grad.flatten(1).norm(dim=1)
            per_scale.append(((norms - 1) ** 2).mean())
        return _mean_over_scales(per_scale)

    def discriminator_loss(self, disc: nn.Module, real: Tensor, fake: Tensor) -> Tensor:
        """See class docstring."""
        per_scale = [
            d_fake.mean() - d_real.mean()
            for d_real, d_fake in zip(as_scales(disc(real)), as_scales(disc(fake)), strict=True)
        ]
        loss = _mean_over_scales(per_scale)
        if self.eta:
            loss = loss + self.eta * self.gradient_penalty(disc, real, fake)
        return loss

    def generator_loss(self, fake_outputs: Scores) -> Tensor:
        """See class docstring."""
        return _mean_over_scales([-d.mean() for d in as_scales(fake_outputs)])


def make_adversarial(
    name: Literal["lsgan", "wgan-gp", "gan"], eta: float = 10.0
) -> AdversarialLoss:
    """The adversarial loss called ``name``; ``eta`` is used by ``"wgan-gp"`` only.

    ``"lsgan"``: :class:`LSGAN`; ``"wgan-gp"``: :class:`WGANGP`; ``"gan"``: :class:`LogGAN`.
    """
    if name == "lsgan":
        return LSGAN()
    if name == "wgan-gp":
        return WGANGP(eta)
    if name == "gan":
        return LogGAN()
    raise ConfigError(f"unknown adversarial loss {name!r}; choose 'lsgan', 'wgan-gp' or 'gan'")
