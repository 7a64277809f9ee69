"""Adversarial, cycle and identity losses and their weighted sum: closed-form values and one
descent step each."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from hpcdeconv.errors import ConfigError
from hpcdeconv.losses.adversarial import LSGAN, WGANGP, LogGAN, make_adversarial
from hpcdeconv.losses.cycle import cycle_loss, identity_loss
from hpcdeconv.losses.terms import weighted_sum
from hpcdeconv.models.discriminators import MultiScalePatchGAN, PatchGAN
from hpcdeconv.models.psf_layer import PSFLayer
from hpcdeconv.models.unet import UNet


class PixelScores(nn.Module):
    """Critic whose patch scores are the input voxels times fixed factors, one per scale."""

    def __init__(self, factors: tuple[float, ...]) -> None:
        super().__init__()
        self.factors = factors

    def forward(self, x: Tensor) -> list[Tensor]:
        return [f * x for f in self.factors]


class LinearCritic(nn.Module):
    """D(x) = <w, x> per sample, with ‖w‖₂ = norm; returned as a (B, 1, 1, 1, 1) score map."""

    def __init__(self, shape: tuple[int, ...], norm: float, seed: int = 0) -> None:
        super().__init__()
        w = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        self.w = nn.Parameter(norm * w / w.norm())

    def forward(self, x: Tensor) -> Tensor:
        return (x * self.w).flatten(1).sum(dim=1).view(-1, 1, 1, 1, 1)


# ----------------------------------------------------------------------------- LSGAN


def test_lsgan_values_match_formula_and_average_scales(rng: np.random.Generator) -> None:
    real, fake = rng.standard_normal((2, 2, 1, 4, 4, 4))
    loss = LSGAN().discriminator_loss(
        PixelScores((1.0, 2.0)), torch.from_numpy(real), torch.from_numpy(fake)
    )
    per_scale = [
        0.5 * np.mean((f * real - 1) ** 2) + 0.5 * np.mean((f * fake) ** 2) for f in (1, 2)
    ]
    assert float(loss) == pytest.approx(np.mean(per_scale))
    outs = [torch.from_numpy(fake), torch.from_numpy(3 * fake[:, :, :2])]
    expected = np.mean([np.mean((fake - 1) ** 2), np.mean((3 * fake[:, :, :2] - 1) ** 2)])
    assert float(LSGAN().generator_loss(outs)) == pytest.approx(expected)
    assert float(LSGAN().generator_loss(outs[0])) == pytest.approx(np.mean((fake - 1) ** 2))


def test_lsgan_optimum_is_zero_loss() -> None:
    real = torch.ones(1, 1, 2, 2, 2)
    fake = torch.zeros(1, 1, 2, 2, 2)
    assert float(LSGAN().discriminator_loss(PixelScores((1.0,)), real, fake)) == 0.0
    assert float(LSGAN().generator_loss([torch.ones(3, 1, 2, 2, 2)])) == 0.0


def _descent_step(params, loss_fn, lr: float) -> tuple[float, float]:
    opt = torch.optim.SGD(params, lr=lr)
    before = loss_fn()
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss_fn()
    return before.item(), after.item()


@pytest.mark.parametrize("loss", [LSGAN(), WGANGP(eta=10.0)], ids=["lsgan", "wgan-gp"])
def test_discriminator_step_lowers_discriminator_loss(loss) -> None:
    torch.manual_seed(0)
    disc = MultiScalePatchGAN(3, channels=2, n_layers=1, n_scales=2)
    real = torch.rand(2, 1, 8, 8, 8)
    fake = torch.rand(2, 1, 8, 8, 8) * 0.5

    def d_loss() -> Tensor:
        torch.manual_seed(1)  # same interpolates before and after the step
        with torch.enable_grad():
            return loss.discriminator_loss(disc, real, fake)

    before, after = _descent_step(disc.parameters(), d_loss, lr=1e-3)
    assert after < before


@pytest.mark.parametrize("loss", [LSGAN(), WGANGP()], ids=["lsgan", "wgan-gp"])
def test_generator_step_lowers_generator_loss(loss) -> None:
    torch.manual_seed(0)
    disc = PatchGAN(3, channels=2, n_layers=2).requires_grad_(False)
    gen = UNet(3, channels=2, depth=1)
    z = torch.rand(2, 1, 8, 8, 8)
    before, after = _descent_step(
        gen.parameters(), lambda: loss.generator_loss(disc(gen(z))), lr=1e-2
    )
    assert after < before


# ----------------------------------------------------------------------------- WGAN-GP


def test_gradient_penalty_vanishes_for_unit_norm_linear_critic() -> None:
    real = torch.rand(3, 1, 4, 4, 4, dtype=torch.float64)
    fake = torch.rand(3, 1, 4, 4, 4, dtype=torch.float64)
    critic = LinearCritic((1, 4, 4, 4), norm=1.0)
    assert WGANGP().gradient_penalty(critic, real, fake).item() == pytest.approx(0.0, abs=1e-20)


def test_gradient_penalty_for_steep_critic_and_its_gradient() -> None:
    real = torch.rand(3, 1, 4, 4, 4, dtype=torch.float64)
    fake = torch.rand(3, 1, 4, 4, 4, dtype=torch.float64)
    critic = LinearCritic((1, 4, 4, 4), norm=3.0)
    penalty = WGANGP().gradient_penalty(critic, real, fake)
    assert penalty.item() == pytest.approx(4.0)  # (‖w‖ − 1)² with ‖w‖ = 3
    penalty.backward()
    # d/dw (‖w‖ − 1)² = 2 (‖w‖ − 1) w / ‖w‖: the penalty trains the critic.
    torch.testing.assert_close(critic.w.grad, 2 * 2 * critic.w.detach() / 3)


def test_gradient_penalty_averages_independent_scales() -> None:
    real = torch.rand(2, 1, 4, 4, 4, dtype=torch.float64)
    fake = torch.rand(2, 1, 4, 4, 4, dtype=torch.float64)
    unit = LinearCritic((1, 4, 4, 4), norm=1.0)
    steep = LinearCritic((1, 4, 4, 4), norm=3.0, seed=1)

    class TwoScales(nn.Module):
        def forward(self, x: Tensor) -> list[Tensor]:
            return [unit(x), steep(x)]

    assert WGANGP().gradient_penalty(TwoScales(), real, fake).item() == pytest.approx(2.0)


def test_wgan_losses_match_formula() -> None:
    real = torch.rand(3, 1, 4, 4, 4, dtype=torch.float64)
    fake = torch.rand(3, 1, 4, 4, 4, dtype=torch.float64)
    critic = LinearCritic((1, 4, 4, 4), norm=3.0)
    with torch.no_grad():
        wasserstein = critic(fake).mean() - critic(real).mean()
    loss = WGANGP(eta=2.5).discriminator_loss(critic, real, fake)
    assert loss.item() == pytest.approx(float(wasserstein) + 2.5 * 4.0)
    assert WGANGP(eta=0.0).discriminator_loss(critic, real, fake).item() == pytest.approx(
        float(wasserstein)
    )
    outs = [torch.full((2, 1, 2, 2, 2), 3.0), torch.full((2, 1, 1, 1, 1), -1.0)]
    assert float(WGANGP().generator_loss(outs)) == pytest.approx(-1.0)


def test_make_adversarial() -> None:
    assert isinstance(make_adversarial("lsgan", 10.0), LSGAN)
    wgan = make_adversarial("wgan-gp", 5.0)
    assert isinstance(wgan, WGANGP)
    assert wgan.eta == 5.0
    with pytest.raises(ConfigError, match="unknown adversarial loss"):
        make_adversarial("hinge", 1.0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        WGANGP(eta=-1.0)


# ----------------------------------------------------------------------------- cycle


def test_cycle_loss_is_sum_of_mean_absolute_errors(rng: np.random.Generator) -> None:
    x, x_rec, y, y_rec = (rng.standard_normal((2, 1, 3, 4, 5)) for _ in range(4))
    loss = cycle_loss(*(torch.from_numpy(a) for a in (x, x_rec, y, y_rec)))
    assert float(loss) == pytest.approx(np.abs(x - x_rec).mean() + np.abs(y - y_rec).mean())
    t = torch.from_numpy(x)
    assert float(cycle_loss(t, t, t, t)) == 0.0


def test_cycle_loss_rejects_mismatched_shapes() -> None:
    a = torch.zeros(1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="y has shape"):
        cycle_loss(a, a, a, torch.zeros(1, 1, 4, 4, 1))


def test_cycle_step_lowers_cycle_loss() -> None:
    # Both cycles of the blind method: x → h∗x → G(h∗x) and y → G(y) → h∗G(y).
    torch.manual_seed(0)
    gen = UNet(3, channels=2, depth=1)
    psf = PSFLayer((3, 3, 3), init="gaussian", constraint="simplex")
    x = torch.rand(1, 1, 8, 8, 8)
    y = psf(torch.rand(1, 1, 8, 8, 8)).detach()

    def loss() -> Tensor:
        return cycle_loss(x, gen(psf(x)), y, psf(gen(y)))

    params = [*gen.parameters(), *psf.parameters()]
    before, after = _descent_step(params, loss, lr=1e-2)
    assert after < before


# ----------------------------------------------------------------------------- identity


def test_identity_loss_is_the_mean_absolute_error_in_2d_and_3d(rng: np.random.Generator) -> None:
    for shape in ((2, 3, 6, 7), (1, 1, 3, 4, 5)):
        a, b = rng.standard_normal((2, *shape))
        loss = identity_loss(torch.from_numpy(a), torch.from_numpy(b))
        assert loss.dtype == torch.float32
        assert float(loss) == pytest.approx(np.abs(a - b).mean(), rel=1e-6)
    with pytest.raises(ValueError, match="generator's output"):
        identity_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))


def test_identity_step_pulls_a_generator_towards_the_identity() -> None:
    torch.manual_seed(0)
    gen = UNet(2, in_channels=3, out_channels=3, channels=2, depth=1, final_activation="none")
    x = torch.rand(2, 3, 8, 8)
    before, after = _descent_step(list(gen.parameters()), lambda: identity_loss(x, gen(x)), 1e-2)
    assert after < before


# ----------------------------------------------------------------------------- terms


def test_weighted_sum_weighs_each_term_and_ignores_unformed_ones() -> None:
    terms = {"adversarial": torch.tensor(2.0), "cycle": torch.tensor(0.5)}
    weights = {"adversarial": 1.0, "cycle": 10.0, "identity": 3.0}
    assert float(weighted_sum(terms, weights)) == 7.0
    # A lone term of weight one is returned unchanged, bit for bit.
    lone = torch.tensor(0.123456789)
    assert torch.equal(weighted_sum({"mse": lone}, {"mse": 1.0}), lone)


def test_weighted_sum_gradients_carry_the_weights() -> None:
    a, b = torch.tensor(1.0, requires_grad=True), torch.tensor(2.0, requires_grad=True)
    weighted_sum({"a": a * a, "b": b * b}, {"a": 0.5, "b": 3.0}).backward()
    assert float(a.grad) == 1.0 and float(b.grad) == 12.0  # type: ignore[arg-type]


def test_weighted_sum_refuses_a_term_without_a_weight_and_no_terms() -> None:
    with pytest.raises(ValueError, match="without a weight: perceptual"):
        weighted_sum({"cycle": torch.tensor(1.0), "perceptual": torch.tensor(1.0)}, {"cycle": 1})
    with pytest.raises(ValueError, match="at least one"):
        weighted_sum({}, {"cycle": 1.0})


# ----------------------------------------------------------------------------- log loss (GAN)


def _log_sigmoid(z: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -z)


def test_log_gan_values_match_hand_computed_bce(rng: np.random.Generator) -> None:

    real, fake = 3 * rng.standard_normal((2, 2, 1, 4, 4))

    def d_loss(f: float) -> float:
        # −log σ(D(y)) − log(1 − σ(D(ŷ))), with 1 − σ(z) = σ(−z).
        return -np.mean(_log_sigmoid(f * real)) - np.mean(_log_sigmoid(-f * fake))

    single = LogGAN().discriminator_loss(
        PixelScores((1.0,)), torch.from_numpy(real), torch.from_numpy(fake)
    )
    assert float(single) == pytest.approx(d_loss(1.0))
    multi = LogGAN().discriminator_loss(
        PixelScores((1.0, 2.0)), torch.from_numpy(real), torch.from_numpy(fake)
    )
    assert float(multi) == pytest.approx(np.mean([d_loss(1.0), d_loss(2.0)]))
    outs = [torch.from_numpy(fake), torch.from_numpy(-2 * fake[:, :, :2])]
    expected = np.mean([-np.mean(_log_sigmoid(fake)), -np.mean(_log_sigmoid(-2 * fake[:, :, :2]))])
    assert float(LogGAN().generator_loss(outs)) == pytest.approx(expected)
    assert float(LogGAN().generator_loss(outs[0])) == pytest.approx(-np.mean(_log_sigmoid(fake)))


def test_log_gan_on_fixed_scores() -> None:

    # D(y) = 0, D(ŷ) = 0: each term is log 2.
    zeros = torch.zeros(2, 1, 3, 3)
    assert float(LogGAN().discriminator_loss(PixelScores((1.0,)), zeros, zeros)) == pytest.approx(
        2 * np.log(2)
    )
    assert float(LogGAN().generator_loss(zeros)) == pytest.approx(np.log(2))
    # Saturated scores stay finite (logits, not probabilities).
    big = torch.full((1, 1, 2, 2), 200.0)
    assert float(LogGAN().discriminator_loss(PixelScores((1.0,)), big, -big)) == pytest.approx(0.0)
    assert float(LogGAN().generator_loss(-big)) == pytest.approx(200.0)


def test_log_gan_steps_lower_both_losses() -> None:

    torch.manual_seed(0)
    disc = MultiScalePatchGAN(3, channels=2, n_layers=1, n_scales=2)
    real, fake = torch.rand(2, 1, 8, 8, 8), torch.rand(2, 1, 8, 8, 8) * 0.5
    before, after = _descent_step(
        disc.parameters(), lambda: LogGAN().discriminator_loss(disc, real, fake), lr=1e-3
    )
    assert after < before
    frozen = PatchGAN(3, channels=2, n_layers=2).requires_grad_(False)
    gen = UNet(3, channels=2, depth=1)
    z = torch.rand(2, 1, 8, 8, 8)
    before, after = _descent_step(
        gen.parameters(), lambda: LogGAN().generator_loss(frozen(gen(z))), lr=1e-2
    )
    assert after < before


def test_make_adversarial_gan_is_the_log_loss() -> None:

    assert isinstance(make_adversarial("gan"), LogGAN)
    with pytest.raises(ConfigError, match="'gan'"):
        make_adversarial("hinge")  # type: ignore[arg-type]
