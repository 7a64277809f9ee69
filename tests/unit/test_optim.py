"""One optimiser factory for every strategy: Adam or AdamW, with or without weight decay."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hpcdeconv.config import ExperimentConfig, OptimConfig, load_config
from hpcdeconv.errors import ConfigError
from hpcdeconv.training.optim import build_optimizer
from hpcdeconv.training.strategy import SingleStrategy

LR, BETAS = 1e-2, (0.5, 0.999)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))


def _train(net: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 5) -> None:
    torch.manual_seed(1)
    for _ in range(steps):
        loss = net(torch.randn(8, 4)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize(
    ("name", "decay", "reference"),
    [
        ("adam", 0.0, lambda p: torch.optim.Adam(p, lr=LR, betas=BETAS)),
        ("adam", 1e-3, lambda p: torch.optim.Adam(p, lr=LR, betas=BETAS, weight_decay=1e-3)),
        ("adamw", 1e-5, lambda p: torch.optim.AdamW(p, lr=LR, betas=BETAS, weight_decay=1e-5)),
        ("adamw", 0.0, lambda p: torch.optim.AdamW(p, lr=LR, betas=BETAS, weight_decay=0.0)),
    ],
)
def test_updates_equal_torch_reference_bit_for_bit(name: str, decay: float, reference) -> None:
    cfg = OptimConfig(name=name, weight_decay=decay, betas=BETAS)
    ours, theirs = _net(), _net()
    _train(ours, build_optimizer(ours.parameters(), cfg, LR))
    _train(theirs, reference(theirs.parameters()))
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_default_is_todays_adam_without_decay() -> None:
    cfg = OptimConfig()
    assert (cfg.name, cfg.weight_decay) == ("adam", 0.0)
    optimizer = build_optimizer(_net().parameters(), cfg, LR)
    assert type(optimizer) is torch.optim.Adam
    assert optimizer.param_groups[0]["weight_decay"] == 0.0


def test_first_step_matches_the_hand_computed_update() -> None:
    """Step 1 of Adam moves every weight by lr * g / (|g| + eps) (bias-corrected moments).

    Adam's decay enters the gradient (g + wd * w); AdamW's shrinks the weight first,
    w * (1 - lr * wd), apart from the gradient.
    """
    wd, eps = 0.1, 1e-8
    w0 = torch.tensor([1.0, -2.0, 3.0])
    grad = torch.tensor([0.5, 0.25, -4.0])
    for name in ("adam", "adamw"):
        w = nn.Parameter(w0.clone())
        optimizer = build_optimizer([w], OptimConfig(name=name, weight_decay=wd), LR)
        w.grad = grad.clone()
        optimizer.step()
        if name == "adam":
            g = grad + wd * w0
            expected = w0 - LR * g / (g.abs() + eps)
        else:
            expected = w0 * (1 - LR * wd) - LR * grad / (grad.abs() + eps)
        torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-6)


def test_the_strategy_trains_with_the_configured_optimiser() -> None:
    cfg = OptimConfig(name="adamw", weight_decay=1e-5, lr=3e-4)
    trainable = SingleStrategy(torch.device("cpu"), "fp32").wrap(_net(), cfg, total_steps=10)
    optimizer = trainable.optimizer  # type: ignore[attr-defined]
    assert type(optimizer) is torch.optim.AdamW
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (3e-4, 1e-5, (0.5, 0.999))


def test_configuration_is_checked() -> None:
    cfg = load_config(ExperimentConfig, None, ["optim.name=adamw", "optim.weight_decay=1e-5"])
    assert (cfg.optim.name, cfg.optim.weight_decay) == ("adamw", 1e-5)
    with pytest.raises(ConfigError, match=r"optim\.name"):
        load_config(ExperimentConfig, None, ["optim.name=sgd"])
    with pytest.raises(ConfigError, match=r"optim\.weight_decay"):
        load_config(ExperimentConfig, None, ["optim.weight_decay=-1"])
