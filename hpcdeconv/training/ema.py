"""Exponential moving average (EMA) of the deblurring generator's weights.

GAN training swings from one evaluation to the next; an average of the generator's recent
weights is usually steadier and scores at least as well. After every optimiser step each
floating-point parameter's shadow moves towards the trained value::

    shadow = d * shadow + (1 - d) * param        # d = train.ema_decay, 0 < d < 1

with no bias correction: the shadow starts as a copy of the weights at the step the EMA
was created, so it is never biased towards zero. Buffers (e.g. normalisation statistics)
and integer tensors are copied, not averaged. The shadow is a full fp32 copy of the
module on the module's device; :attr:`GeneratorEMA.module` is an ordinary ``nn.Module``
in eval mode that validation and prediction can run.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

#: Wrappers that hold the trained network as ``.module`` (named so as not to import them).
_WRAPPERS = {"DistributedDataParallel", "DataParallel", "DeepSpeedEngine"}


def unwrap(module: nn.Module) -> nn.Module:
    """The network inside DDP/DeepSpeed wrappers."""
    while type(module).__name__ in _WRAPPERS and isinstance(
        getattr(module, "module", None), nn.Module
    ):
        module = module.module
    return module


_Pair = tuple[torch.Tensor, torch.Tensor]


class GeneratorEMA:
    """EMA of a module's parameters (and a copy of its buffers), resumable exactly.

    Parameters
    ----------
    module
        The trained network (DDP/DeepSpeed wrappers are looked through). Its current
        weights start the average.
    decay
        ``d`` in ``shadow = d * shadow + (1 - d) * param``, with ``0 < d < 1``; the
        average spans about ``1 / (1 - d)`` steps.

    Raises
    ------
    ValueError
        ``decay`` outside (0, 1), or a parameter is empty (ZeRO-3 partitions parameters
        over the ranks; keep an EMA only with ZeRO stage 0-2).
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < float(decay) < 1.0:
            raise ValueError(f"EMA decay {decay} must lie strictly between 0 and 1")
        source = unwrap(module)
        empty = [n for n, p in source.named_parameters() if p.numel() == 0]
        if empty:
            raise ValueError(
                f"cannot average partitioned parameters ({empty[0]} is empty here); "
                "an EMA needs whole parameters on every rank (DeepSpeed ZeRO stage <= 2)"
            )
        self.decay = float(decay)
        #: Optimiser steps averaged so far (informative; the update does not use it).
        self.updates = 0
        self.module = copy.deepcopy(source)
        # fp32 whatever the training precision: a bf16 shadow would lose the small
        # (1 - d) increments entirely.
        self.module.float().eval().requires_grad_(False)

    def _pairs(self, module: nn.Module) -> tuple[list[_Pair], list[_Pair]]:
        """(shadow, source) parameters and buffers, matched by name."""
        source = unwrap(module)
        params = dict(source.named_parameters())
        shadow_params = dict(self.module.named_parameters())
        buffers = dict(source.named_buffers())
        shadow_buffers = dict(self.module.named_buffers())
        if params.keys() != shadow_params.keys() or buffers.keys() != shadow_buffers.keys():
            raise ValueError("the module does not have the layout the EMA was created from")
        return (
            [(shadow_params[k], params[k]) for k in params],
            [(shadow_buffers[k], buffers[k]) for k in buffers],
        )

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Move the average one step towards ``module``'s current weights.

        Call once after every optimiser step, on every rank (the weights are the same on
        every rank, so are the averages).
        """
        params, buffers = self._pairs(module)
        for shadow, param in params:
            value = param.detach().to(shadow.device, torch.float32)
            if shadow.is_floating_point():
                # shadow + (1 - d) * (param - shadow) == d * shadow + (1 - d) * param
                shadow.lerp_(value, 1.0 - self.decay)
            else:
                shadow.copy_(value)
        for shadow, buffer in buffers:
            shadow.copy_(buffer.detach())
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the average exactly (tensors and numbers only)."""
        return {
            "decay": self.decay,
            "updates": self.updates,
            "module": {k: v.detach().clone() for k, v in self.module.state_dict().items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the configured decay is kept if it differs).

        Raises
        ------
        ValueError
            The stored average does not fit this network.
        """
        try:
            self.module.load_state_dict(state["module"])
        except (KeyError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise ValueError(f"stored EMA does not fit the network ({first})") from None
        self.updates = int(state.get("updates", 0))
