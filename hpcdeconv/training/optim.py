"""The optimiser of every trained group, for every strategy, from ``optim:``."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from hpcdeconv.config import OptimConfig


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: OptimConfig, lr: float
) -> torch.optim.Optimizer:
    """The configured optimiser over ``params``.

    Parameters
    ----------
    params
        The trained parameters of one group.
    cfg
        ``optim:``: ``name`` (``adam`` or ``adamw``), ``betas`` and ``weight_decay``.
    lr
        The group's base learning rate (the schedule scales it).

    Returns
    -------
    torch.optim.Optimizer
        ``torch.optim.Adam`` (weight decay as an L2 term of the gradient) or
        ``torch.optim.AdamW`` (decay decoupled from the gradient).
    """
    match cfg.name:
        case "adam":
            return torch.optim.Adam(params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        case "adamw":
            return torch.optim.AdamW(params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimiser {cfg.name!r}")
