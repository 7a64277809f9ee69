"""Load the deblurring generator G_Θ of a training checkpoint for inference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hpcdeconv.config import ExperimentConfig, build_config
from hpcdeconv.errors import ConfigError, InputError
from hpcdeconv.methods.cycle import build_unet
from hpcdeconv.training.checkpoint import load_checkpoint, resolve_checkpoint


@dataclass(frozen=True)
class LoadedModel:
    """G_Θ ready for inference with what produced it."""

    net: nn.Module
    config: ExperimentConfig
    checkpoint: Path
    step: int

    @property
    def size_multiple(self) -> int:
        """Tile sizes must be multiples of this (U-Net down-sampling)."""
        return int(getattr(self.net, "size_multiple", 1))

    @property
    def receptive_field(self) -> int:
        """Receptive field of G_Θ in voxels per axis."""
        return int(self.net.receptive_field())


def load_model(path: Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild G_Θ from a checkpoint file or run directory (``weights_only=True``)."""
    ckpt = resolve_checkpoint(path)
    state = load_checkpoint(ckpt, map_location="cpu")
    if "deblur" not in state:
        raise InputError(f"{ckpt} holds no deblurring generator")
    try:
        cfg = build_config(ExperimentConfig, state["config"])
    except ConfigError as exc:
        raise InputError(f"{ckpt}: incompatible configuration ({exc})") from None
    # Non-finite weights are refused here: fused CPU kernels can turn NaN activations into
    # zeros, so the prediction itself need not show them.
    bad = sum(
        int((~torch.isfinite(t)).sum()) for t in state["deblur"].values() if t.is_floating_point()
    )
    if bad:
        raise InputError(
            f"{ckpt}: {bad} generator weight(s) are NaN or Inf; use an earlier checkpoint"
        )
    net = build_unet(cfg.method.generator, checkpointing=False)
    try:
        net.load_state_dict(state["deblur"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise InputError(f"{ckpt}: weights do not fit the configured U-Net ({first})") from None
    net.to(device).eval()
    return LoadedModel(net=net, config=cfg, checkpoint=ckpt, step=int(state["step"]))
