"""A trained PSF-parameter regressor, loaded from its checkpoint, and batched prediction.

A ``psf_regression`` checkpoint (:class:`~hpcdeconv.methods.psf_regression.PSFRegression`)
records its artefact as kind ``"psf_regressor"`` with the network configuration, the PSF
model (:meth:`~hpcdeconv.psfnet.psf_models.PSFModel.record`), the parameter names and the
window (patch side in pixels) it was trained on; its weights lie under ``"regressor"`` and,
with ``train.ema_decay``, their moving average under ``"regressor_ema"``. Loading needs
neither the method nor the training data.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from hpcdeconv.config import RegressorConfig
from hpcdeconv.errors import ConfigError, InputError
from hpcdeconv.inference.model import WeightsChoice, load_weights, select_weights
from hpcdeconv.models.regressor import Regressor
from hpcdeconv.psfnet.psf_models import PSFModel, model_from_record
from hpcdeconv.training.checkpoint import (
    CheckpointChoice,
    choose_checkpoint,
    load_checkpoint,
)

log = logging.getLogger(__name__)

#: Artefact kind and weights key of a PSF-parameter regressor.
PSF_REGRESSOR = "psf_regressor"
REGRESSOR_KEY = "regressor"


def regress(
    network: nn.Module,
    model: PSFModel,
    patches: Tensor,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Parameters and invalidity of a batch of patches.

    The network's outputs are clamped to ``[0, 1]`` (the parameters to the model's
    ranges) and the parameters mapped to physical units (``PSFModel.from_unit``).

    Parameters
    ----------
    network
        A :class:`~hpcdeconv.models.regressor.Regressor` of ``P + 1`` outputs, in eval mode.
    model
        The PSF model it estimates (``P`` parameters).
    patches
        ``(B, 1, W, W)`` raw patches (any device; moved to the network's).
    autocast_dtype
        Run under autocast with this dtype (``None``: float32).

    Returns
    -------
    (Tensor, Tensor)
        ``(B, P)`` float32 parameters in the model's units (µm, waves, rad) and ``(B,)``
        float32 invalidity ``â0`` in ``[0, 1]``, on ``patches``' device.
    """
    device = next(network.parameters()).device
    x = patches.to(device, torch.float32)
    with (
        torch.no_grad(),
        torch.autocast(
            device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
        ),
    ):
        out = network(x)
    out = out.float().clamp(0.0, 1.0)
    count = len(model.names)
    params = model.from_unit(out[:, :count])
    assert isinstance(params, Tensor)
    return params.to(patches.device), out[:, count].to(patches.device)


@dataclass(frozen=True)
class LoadedRegressor:
    """A trained regressor ready to estimate PSF parameters of image patches.

    Attributes
    ----------
    network
        The regressor in eval mode on its device.
    model
        The PSF model it was trained for (compare ``model.name`` with the one expected).
    window
        Side in pixels of the square patches it takes (its training patches).
    checkpoint
        The checkpoint file.
    step
        Its training step.
    weights
        ``"raw"`` (the trained weights) or ``"ema"`` (their moving average).
    choice
        How ``checkpoint`` was chosen (best/latest/file), for messages.
    """

    network: nn.Module
    model: PSFModel
    window: int
    checkpoint: Path
    step: int = 0
    weights: Literal["raw", "ema"] = "raw"
    choice: CheckpointChoice | None = None

    @property
    def device(self) -> torch.device:
        """Where the network runs."""
        return next(self.network.parameters()).device

    def predict(self, patches: Tensor) -> tuple[Tensor, Tensor]:
        """Estimate the PSF of each patch.

        Parameters
        ----------
        patches
            ``(B, 1, W, W)`` raw intensities, ``W = window``, any device.

        Returns
        -------
        (Tensor, Tensor)
            ``(B, P)`` float32 parameters in physical units, clamped to the model's ranges,
            and ``(B,)`` float32 invalidity ``â0`` clamped to ``[0, 1]`` (1: no texture to
            tell the PSF from), on ``patches``' device.

        Raises
        ------
        ValueError
            ``patches`` is not ``(B, 1, window, window)``.
        """
        if patches.ndim != 4 or tuple(patches.shape[1:]) != (1, self.window, self.window):
            raise ValueError(
                f"the regressor takes (B, 1, {self.window}, {self.window}) patches, "
                f"got {tuple(patches.shape)}"
            )
        return regress(self.network, self.model, patches)

    def describe(self) -> str:
        """One line: which checkpoint, which weights, which PSF model."""
        what = self.choice.describe() if self.choice else f"checkpoint {self.checkpoint}"
        kind = "EMA weights" if self.weights == "ema" else "trained (non-EMA) weights"
        return f"{what}, {kind}, PSF model {self.model.name}, window {self.window} px"


def regressor_record(network: RegressorConfig, model: PSFModel, window: int) -> dict[str, Any]:
    """The checkpoint's description of a regressor (:func:`load_regressor` reads it)."""
    return {
        "network": network.model_dump(mode="json"),
        "psf_model": model.record(),
        "names": list(model.names),
        "window": int(window),
        "in_channels": 1,
    }


def rebuild_regressor(record: Mapping[str, Any]) -> tuple[Regressor, PSFModel, int]:
    """Network (fresh weights), PSF model and window of a :func:`regressor_record`.

    Raises
    ------
    InputError
        The record does not describe a regressor of its PSF model.
    """
    try:
        cfg = RegressorConfig(**record["network"])
        model = model_from_record(record["psf_model"])
        window = int(record["window"])
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise InputError(f"not a PSF-regressor description ({first})") from None
    if list(record.get("names", [])) != list(model.names):
        raise InputError(
            f"regressor names {record.get('names')} but its PSF model {model.name} has "
            f"{list(model.names)}"
        )
    return Regressor(cfg, len(model.names) + 1), model, window


def load_regressor(
    path: Path,
    device: torch.device | str = "cpu",
    weights: WeightsChoice = "auto",
) -> LoadedRegressor:
    """Rebuild a PSF-parameter regressor from a checkpoint file or run directory.

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
        No checkpoint, not a ``psf_regressor`` checkpoint (e.g. a deblurring generator),
        no (EMA) weights, weights that do not fit the record or are NaN/Inf.
    """
    choice = choose_checkpoint(Path(path), prefer="best")
    ckpt = choice.path
    state = load_checkpoint(ckpt, map_location="cpu")
    artefact = state.get("artefact") or {"kind": "image_to_image"}
    if artefact.get("kind") != PSF_REGRESSOR:
        raise InputError(
            f"{ckpt} is a {artefact.get('kind')} model, not a PSF-parameter regressor "
            "(train one with method psf_regression)"
        )
    key = str(artefact.get("key", REGRESSOR_KEY))
    kind, stored = select_weights(state, key, weights, ckpt, "regressor")
    try:
        network, model, window = rebuild_regressor(artefact)
    except InputError as exc:
        raise InputError(f"{ckpt}: {exc}") from None
    load_weights(network, stored, ckpt, "regressor")
    network.to(device).eval()
    loaded = LoadedRegressor(network, model, window, ckpt, int(state.get("step", 0)), kind, choice)
    log.info("using %s", loaded.describe())
    return loaded
