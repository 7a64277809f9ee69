"""What every training method provides to the engine.

A method owns its networks, grouped by optimiser (e.g. ``G`` and ``D``), and a
:meth:`Method.step` that reads like the paper's algorithm. The engine hands it one
:class:`~hpcdeconv.training.strategy.Trainable` per group; the method never sees whether
that is a plain module, DDP or DeepSpeed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from hpcdeconv.training.strategy import Trainable


class Method(ABC):
    """Base class of the training methods.

    Subclasses build their group modules in ``__init__`` and expose them through
    :meth:`groups`; after :meth:`bind` the trainables are available as ``self.t[name]``.
    """

    #: Whether a batch must hold a sharp ``x`` and blurred ``y`` of the same place.
    paired: ClassVar[bool] = False

    def __init__(self) -> None:
        self.t: dict[str, Trainable] = {}

    @abstractmethod
    def groups(self) -> dict[str, nn.Module]:
        """The optimised groups, each one ``nn.Module`` with its own optimiser."""

    def learning_rates(self) -> Mapping[str, float]:
        """Per-group learning rate overrides (default: the configured one for all)."""
        return {}

    def bind(self, trainables: Mapping[str, Trainable]) -> None:
        """Receive the strategy's wrapped groups."""
        self.t = dict(trainables)

    @abstractmethod
    def step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One optimisation step on ``batch`` (``x``: sharp, ``y``: blurred, (B,1,Z,Y,X)).

        Returns the detached scalar losses of the step by name.
        """

    @abstractmethod
    def deblur_net(self) -> nn.Module:
        """The deblurring generator G_Θ: (B,1,Z,Y,X) blurred → (B,1,Z,Y,X) sharp."""

    def images(self) -> dict[str, torch.Tensor]:
        """Volumes of the last step for image summaries, each (Z,Y,X)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Method-owned state that is not in a group (history pools, generators)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore :meth:`state_dict`."""

    def export(self, run_dir: Path, true_psf: torch.Tensor | None) -> dict[str, Path]:
        """Write method artefacts (e.g. the learned PSF) at the end of training."""
        return {}
