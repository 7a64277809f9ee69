"""Activation (gradient) checkpointing applied to a network from outside.

A network only names its stages (``checkpoint_stages() -> list[str]``, dotted submodule
names); whether they are recomputed in the backward pass is decided where the network is
built for training (:func:`hpcdeconv.models.factory.build_generator`), as torchtitan keeps
parallelism and memory policies out of its models. Each named stage is wrapped by
PyTorch's ``checkpoint_wrapper``, whose state-dict hooks drop the wrapper from the keys:
weights saved with checkpointing load into a network built without it, and back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointWrapper,
    checkpoint_wrapper,
)
from torch.utils.checkpoint import checkpoint

from hpcdeconv.errors import ConfigError


def _checkpoint_while_training(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Recompute ``module`` in the backward pass while training with gradients; otherwise
    (validation, inference, ``torch.no_grad``) a plain call, nothing to save memory on."""
    if module.training and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False, **kwargs)
    return module(*args, **kwargs)


def apply_checkpointing(net: nn.Module, stages: Sequence[str] | None = None) -> nn.Module:
    """Wrap the named stages of ``net`` in place with non-reentrant activation checkpointing.

    Parameters
    ----------
    net
        The network; without ``stages`` it must offer ``checkpoint_stages()``.
    stages
        Dotted submodule names; ``None``: ``net.checkpoint_stages()``.

    Returns
    -------
    nn.Module
        ``net`` itself, for chaining.

    Raises
    ------
    ConfigError
        If ``net`` names no stages, a name is not a submodule of ``net``, or a stage is
        already checkpointed.
    """
    if stages is None:
        named = getattr(net, "checkpoint_stages", None)
        if named is None:
            raise ConfigError(
                f"{type(net).__name__} names no stages to checkpoint (no checkpoint_stages())"
            )
        stages = named()
    for name in stages:
        parent_name, _, child = name.rpartition(".")
        try:
            parent = net.get_submodule(parent_name)
            module = parent.get_submodule(child)
        except AttributeError as err:
            raise ConfigError(f"{type(net).__name__} has no stage {name!r} to checkpoint") from err
        if isinstance(module, CheckpointWrapper):
            raise ConfigError(f"stage {name!r} of {type(net).__name__} is already checkpointed")
        setattr(parent, child, checkpoint_wrapper(module, checkpoint_fn=_checkpoint_while_training))
    return net
