"""Load the image-to-image generator G_Θ of a training checkpoint for inference.

A run directory resolves to its ``best`` checkpoint when training kept one, else to
``latest`` (see :func:`~hpcdeconv.training.checkpoint.choose_checkpoint`). A checkpoint
describes its inference artefact in ``state["artefact"]``: its kind, the key of its
weights and the record :func:`~hpcdeconv.models.factory.rebuild_generator` rebuilds the
generator from (any generator, 2D or 3D, any channels), so inference needs to know
nothing of the method that trained it. The trained weights lie under ``state[key]``
and, when ``train.ema_decay`` was set, their exponential moving average under
``state[key + "_ema"]``; ``weights="auto"`` takes the average when present. A checkpoint
written before artefacts were recorded holds a 3D, 1-channel generator built from its
stored configuration under ``deblur``. A generator trained on mapped intensities
(:mod:`hpcdeconv.data.intensity`) comes wrapped in
:class:`~hpcdeconv.models.intensity.IntensityMapped`: it takes and returns raw values.
Which checkpoint and which weights were used is logged (INFO) and kept on
:class:`LoadedModel`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from hpcdeconv.config import ExperimentConfig, build_config
from hpcdeconv.data.intensity import INTENSITY_KEY, IntensityMap
from hpcdeconv.errors import ConfigError, InputError
from hpcdeconv.models.factory import rebuild_generator
from hpcdeconv.models.intensity import IntensityMapped
from hpcdeconv.training.checkpoint import (
    CheckpointChoice,
    choose_checkpoint,
    count_nonfinite,
    load_checkpoint,
)

log = logging.getLogger(__name__)

WeightsChoice = Literal["auto", "raw", "ema"]
#: Artefact kind of a deblurring (image-to-image) generator.
IMAGE_TO_IMAGE = "image_to_image"
#: Suffix of the key of the weights' moving average.
EMA_SUFFIX = "_ema"


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
    spatial_dims
        2 (``(Y, X)`` images) or 3 (``(Z, Y, X)`` volumes).
    channels
        Input (and output) channels of G_Θ.
    """

    net: nn.Module
    config: ExperimentConfig
    checkpoint: Path
    step: int
    weights: Literal["raw", "ema"] = "raw"
    choice: CheckpointChoice | None = None
    spatial_dims: int = 3
    channels: int = 1

    @property
    def size_multiple(self) -> int:
        """Tile sizes must be multiples of this (U-Net down-sampling)."""
        return int(getattr(self.net, "size_multiple", 1))

    @property
    def receptive_field(self) -> int:
        """Receptive field of G_Θ in voxels per axis."""
        return int(self.net.receptive_field())

    @property
    def first_level_channels(self) -> int:
        """Feature channels of G_Θ's first level: its first convolution's outputs."""
        for module in self.net.modules():
            if isinstance(module, nn.modules.conv._ConvNd):
                return int(module.out_channels)
        return 1

    def describe(self) -> str:
        """One line, e.g. ``"best checkpoint (step 1000, psnr 27.30 dB) RUN/…pt, EMA weights"``."""
        what = self.choice.describe() if self.choice else f"checkpoint {self.checkpoint}"
        kind = "EMA weights" if self.weights == "ema" else "trained (non-EMA) weights"
        return f"{what}, {kind}"


def select_weights(
    state: dict[str, Any], key: str, weights: WeightsChoice, ckpt: Path, what: str
) -> tuple[Literal["raw", "ema"], dict[str, Any]]:
    """The trained or EMA weights of an artefact, checked finite.

    Parameters
    ----------
    state
        The loaded checkpoint.
    key
        The artefact's weights key (the EMA's is ``key + "_ema"``).
    weights
        ``"auto"`` (the EMA when present), ``"raw"`` or ``"ema"``.
    ckpt
        The checkpoint file, for messages.
    what
        The network's name in messages (``"generator"``, ``"regressor"``).

    Returns
    -------
    (str, dict)
        ``"raw"`` or ``"ema"``, and that state dict.

    Raises
    ------
    InputError
        An unknown choice, no EMA where it is asked for, no weights under ``key``, or
        NaN/Inf weights.
    """
    if weights not in ("auto", "raw", "ema"):
        raise InputError(f"weights must be 'auto', 'raw' or 'ema', not {weights!r}")
    has_ema = key + EMA_SUFFIX in state
    if weights == "ema" and not has_ema:
        raise InputError(
            f"{ckpt} holds no EMA weights (train with train.ema_decay set); use --weights raw"
        )
    kind: Literal["raw", "ema"] = (
        "ema" if weights == "ema" or (weights == "auto" and has_ema) else "raw"
    )
    stored = state.get(key + EMA_SUFFIX if kind == "ema" else key)
    if not isinstance(stored, dict):
        raise InputError(f"{ckpt} holds no {what} weights under '{key}'")
    # Non-finite weights are refused here: fused CPU kernels can turn NaN activations into
    # zeros, so the network's output itself need not show them.
    bad = count_nonfinite(stored)
    if bad:
        named = f"EMA {what}" if kind == "ema" else what
        raise InputError(
            f"{ckpt}: {bad} {named} weight(s) are NaN or Inf; use an earlier checkpoint"
        )
    return kind, stored


def load_weights(net: nn.Module, stored: dict[str, Any], ckpt: Path, what: str) -> None:
    """``net.load_state_dict(stored)``; weights that do not fit are one InputError line."""
    try:
        net.load_state_dict(stored)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise InputError(f"{ckpt}: weights do not fit the recorded {what} ({first})") from None


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
    choice = choose_checkpoint(path, prefer="best")
    ckpt = choice.path
    state = load_checkpoint(ckpt, map_location="cpu")
    key, record = _artefact(state, ckpt)
    kind, stored = select_weights(state, key, weights, ckpt, "generator")
    try:
        cfg = build_config(ExperimentConfig, state["config"])
    except ConfigError as exc:
        raise InputError(f"{ckpt}: incompatible configuration ({exc})") from None
    try:
        net = rebuild_generator(record)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{ckpt}: cannot rebuild its generator ({exc})") from None
    load_weights(net, stored, ckpt, "generator")
    if INTENSITY_KEY in record:
        # Trained on mapped intensities: raw inputs are mapped in and the output back.
        net = IntensityMapped(net, IntensityMap.from_record(record[INTENSITY_KEY]))
    net.to(device).eval()
    model = LoadedModel(
        net=net,
        config=cfg,
        checkpoint=ckpt,
        step=int(state["step"]),
        weights=kind,
        choice=choice,
        spatial_dims=int(record["spatial_dims"]),
        channels=int(record["in_channels"]),
    )
    log.info("%s: a %dD generator of %d channel(s)", ckpt, model.spatial_dims, model.channels)
    log.info("using %s", model.describe())
    return model


def _artefact(state: dict[str, Any], ckpt: Path) -> tuple[str, dict[str, Any]]:
    """Key of the generator's weights and the record to rebuild it from.

    Raises
    ------
    InputError
        Not an image-to-image artefact, or no weights under its key.
    """
    artefact = state.get("artefact")
    if artefact is None:
        # Written before checkpoints recorded their artefact: the seed's 3D, 1-channel U-Net.
        if "deblur" not in state:
            raise InputError(f"{ckpt} holds no deblurring generator")
        try:
            generator = state["config"]["method"]["generator"]
        except (KeyError, TypeError):
            raise InputError(f"{ckpt}: no generator configuration stored") from None
        record = {"generator": generator, "spatial_dims": 3, "in_channels": 1, "out_channels": 1}
        return "deblur", record
    kind = artefact.get("kind")
    if kind != IMAGE_TO_IMAGE:
        raise InputError(
            f"{ckpt} is a {kind} model; predict/deconvolve need an image-to-image generator"
        )
    key = str(artefact.get("key", ""))
    if key not in state:
        raise InputError(f"{ckpt} holds no generator weights under '{key}'")
    return key, artefact
