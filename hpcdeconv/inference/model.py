"""Load the deblurring generator G_Θ of a training checkpoint for inference.

A run directory resolves to its ``best`` checkpoint when training kept one, else to
``latest`` (see :func:`~hpcdeconv.training.checkpoint.choose_checkpoint`). A checkpoint
holds the trained weights under ``deblur`` and, when ``train.ema_decay`` was set, their
exponential moving average under ``deblur_ema``; ``weights="auto"`` takes the average
when present. Which checkpoint and which weights were used is logged (INFO) and kept on
:class:`LoadedModel`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from hpcdeconv.config import ExperimentConfig, build_config
from hpcdeconv.errors import ConfigError, InputError
from hpcdeconv.models.factory import build_generator
from hpcdeconv.training.checkpoint import (
    CheckpointChoice,
    choose_checkpoint,
    count_nonfinite,
    load_checkpoint,
)

log = logging.getLogger(__name__)

WeightsChoice = Literal["auto", "raw", "ema"]
#: Checkpoint key of each kind of weights.
WEIGHT_KEYS = {"raw": "deblur", "ema": "deblur_ema"}


@dataclass(frozen=True)
class LoadedModel:
    """G_Θ ready for inference with what produced it.

    Attributes
    ----------
    net
        G_Θ in eval mode on the requested device.
    config
        The training configuration stored in the checkpoint.
    checkpoint
        The checkpoint file.
    step
        Its training step.
    weights
        ``"raw"`` (the trained weights) or ``"ema"`` (their moving average).
    choice
        How ``checkpoint`` was chosen (best/latest/file, metrics), for messages.
    """

    net: nn.Module
    config: ExperimentConfig
    checkpoint: Path
    step: int
    weights: Literal["raw", "ema"] = "raw"
    choice: CheckpointChoice | None = None

    @property
    def size_multiple(self) -> int:
        """Tile sizes must be multiples of this (U-Net down-sampling)."""
        return int(getattr(self.net, "size_multiple", 1))

    @property
    def receptive_field(self) -> int:
        """Receptive field of G_Θ in voxels per axis."""
        return int(self.net.receptive_field())

    def describe(self) -> str:
        """One line, e.g. ``"best checkpoint (step 1000, psnr 27.30 dB) RUN/…pt, EMA weights"``."""
        what = self.choice.describe() if self.choice else f"checkpoint {self.checkpoint}"
        kind = "EMA weights" if self.weights == "ema" else "trained (non-EMA) weights"
        return f"{what}, {kind}"


def load_model(
    path: Path, device: torch.device | str = "cpu", weights: WeightsChoice = "auto"
) -> LoadedModel:
    """Rebuild G_Θ from a checkpoint file or run directory (``weights_only=True``).

    Parameters
    ----------
    path
        A checkpoint file, or a run directory (its ``best`` checkpoint when it has one,
        else ``latest``) or its ``checkpoints`` directory.
    device
        Where the network is placed.
    weights
        ``"auto"``: the EMA of the weights when the checkpoint holds one, else the trained
        weights; ``"raw"``: the trained weights; ``"ema"``: the EMA (refused if absent).

    Raises
    ------
    InputError
        No checkpoint, not an hpcdeconv checkpoint, no (EMA) generator in it, weights that
        do not fit the stored configuration or are NaN/Inf.
    """
    if weights not in ("auto", "raw", "ema"):
        raise InputError(f"weights must be 'auto', 'raw' or 'ema', not {weights!r}")
    choice = choose_checkpoint(path, prefer="best")
    ckpt = choice.path
    state = load_checkpoint(ckpt, map_location="cpu")
    if "deblur" not in state:
        raise InputError(f"{ckpt} holds no deblurring generator")
    has_ema = WEIGHT_KEYS["ema"] in state
    if weights == "ema" and not has_ema:
        raise InputError(
            f"{ckpt} holds no EMA weights (train with train.ema_decay set); use --weights raw"
        )
    kind: Literal["raw", "ema"] = (
        "ema" if weights == "ema" or (weights == "auto" and has_ema) else "raw"
    )
    key = WEIGHT_KEYS[kind]
    try:
        cfg = build_config(ExperimentConfig, state["config"])
    except ConfigError as exc:
        raise InputError(f"{ckpt}: incompatible configuration ({exc})") from None
    # Non-finite weights are refused here: fused CPU kernels can turn NaN activations into
    # zeros, so the prediction itself need not show them.
    bad = count_nonfinite(state[key])
    if bad:
        what = "EMA generator weight(s)" if kind == "ema" else "generator weight(s)"
        raise InputError(f"{ckpt}: {bad} {what} are NaN or Inf; use an earlier checkpoint")
    net = build_generator(cfg.method.generator, spatial_dims=3, in_channels=1, out_channels=1)
    try:
        net.load_state_dict(state[key])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise InputError(f"{ckpt}: weights do not fit the configured U-Net ({first})") from None
    net.to(device).eval()
    model = LoadedModel(
        net=net, config=cfg, checkpoint=ckpt, step=int(state["step"]), weights=kind, choice=choice
    )
    log.info("using %s", model.describe())
    return model
