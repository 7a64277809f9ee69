"""Frozen loss networks (e.g. VGG-19 features of a perceptual loss) on the run's device.

They belong to a method's losses, not to its trained groups: never given to an
optimiser, never wrapped or broadcast by a strategy (every rank reads the same weights
from the same file) and never written into a checkpoint.
"""

from __future__ import annotations

import torch

from hpcdeconv.methods.base import Method


def place_loss_networks(method: Method, device: torch.device) -> None:
    """Move ``method``'s loss networks to ``device``, in eval mode, without gradients.

    Raises
    ------
    ValueError
        A loss network shares a parameter with a trained group (it would be optimised,
        broadcast and checkpointed with it).
    """
    grouped = {id(p) for group in method.groups().values() for p in group.parameters()}
    for name, net in method.loss_networks().items():
        if any(id(p) in grouped for p in net.parameters()):
            raise ValueError(f"loss network {name!r} shares parameters with a trained group")
        net.to(device).eval().requires_grad_(False)
