"""PSF-parameter regression (Shajkofci & Liebling, IEEE TIP 29, 2020, Sec. III).

A ResNet R maps an image patch to ``(â_1 … â_P, â0)``: the parameters of a PSF model in
its unit scale and the invalidity of the patch. One step minimises eq. 11 over a batch,

    L = γ (a0 − â0)² + (1 − a0) / (2N) Σ_n v_n (a_n − â_n)²,

and validation reports R² per parameter (eq. 15) on the valid samples, in physical units.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from hpcdeconv.config import PSFRegressionConfig
from hpcdeconv.data.samples import PSFSamples
from hpcdeconv.errors import ConfigError
from hpcdeconv.losses.psf_regression import psf_regression_loss
from hpcdeconv.methods.base import Artefact, DataInfo, DataKind, Method, ValidationSettings
from hpcdeconv.metrics import r2_score
from hpcdeconv.models.regressor import MIN_SIZE, build_regressor
from hpcdeconv.psfnet.psf_models import PSFModel, model_from_record
from hpcdeconv.psfnet.regressor import (
    PSF_REGRESSOR,
    REGRESSOR_KEY,
    regress,
    regressor_record,
)

#: Validation patches run through the network at once.
_VAL_BATCH = 64


def regression_scores(
    names: tuple[str, ...],
    pred: np.ndarray,
    invalid: np.ndarray,
    true: np.ndarray,
    valid: np.ndarray,
) -> dict[str, float]:
    """R² per parameter (eq. 15) on the valid entries, their mean, and the a0 accuracy.

    Parameters
    ----------
    names
        The ``P`` parameter names.
    pred, true
        ``(V, P)`` estimated and true parameters in physical units.
    invalid
        ``(V,)`` estimated invalidity ``â0``.
    valid
        ``(V, P)`` bool: which true entries are defined.

    Returns
    -------
    dict
        ``r2`` (mean over parameters of those with a score, NaN if none), ``r2_<name>``,
        ``a0_accuracy`` (share of samples whose ``â0 > 0.5`` matches ``a0``).
    """
    r2 = r2_score(pred, true, valid)
    a0 = ~np.asarray(valid, bool).any(axis=1)
    scores = {f"r2_{n}": float(v) for n, v in zip(names, r2, strict=True)}
    finite = r2[np.isfinite(r2)]
    scores["r2"] = float(finite.mean()) if finite.size else float("nan")
    scores["a0_accuracy"] = float(np.mean((np.asarray(invalid) > 0.5) == a0)) if len(a0) else 0.0
    return scores


class PSFRegression(Method):
    """Train a ResNet-34 / ResNeXt-50 to regress PSF parameters and patch validity.

    Parameters
    ----------
    cfg
        Network and γ of eq. 11.
    data
        The samples' description: 1-channel 2D square patches of at least 32 pixels, with
        the PSF model that made them (``psf_model``).
    checkpointing
        Activation checkpointing of the regressor's stages.

    Raises
    ------
    ConfigError
        The samples name no PSF model, or their patches are not 1-channel, 2D, square,
        of at least 32 pixels.
    """

    data_kind: ClassVar[DataKind] = "psf_samples"
    metrics: ClassVar[Mapping[str, bool]] = {"r2": True}

    def __init__(self, cfg: PSFRegressionConfig, data: DataInfo, *, checkpointing: bool) -> None:
        super().__init__()
        if data.psf_model is None:
            raise ConfigError(
                "psf_regression needs a samples store that names its PSF model "
                "(made by hpcdeconv psfnet make-dataset)"
            )
        shape = tuple(data.patch_shape or ())
        if data.channels != 1 or len(shape) != 2 or shape[0] != shape[1] or shape[0] < MIN_SIZE:
            raise ConfigError(
                f"psf_regression trains on 1-channel square 2D patches of >= {MIN_SIZE} px, "
                f"the store holds {data.channels}-channel patches of shape {list(shape)}"
            )
        self.cfg = cfg
        self.model: PSFModel = model_from_record(data.psf_model)
        self.window = int(shape[0])
        #: R, unwrapped: ``(B, 1, W, W)`` → ``(B, P + 1)``.
        self.network = build_regressor(
            cfg.network, len(self.model.names) + 1, checkpointing=checkpointing
        )

    def groups(self) -> dict[str, nn.Module]:
        return {"R": self.network}

    def step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One Adam step on eq. 11 for ``patch`` (B, 1, W, W), ``params``, ``valid`` (B, P)."""
        R = self.t["R"]
        output = R(batch["patch"])
        target = self.model.to_unit(batch["params"].float())
        assert isinstance(target, torch.Tensor)
        loss, validity, params = psf_regression_loss(output, target, batch["valid"], self.cfg.gamma)
        R.backward(loss)
        R.step()
        return {"loss": loss.detach(), "loss_a0": validity.detach(), "loss_params": params.detach()}

    def artefact(self) -> Artefact:
        """R with its network config, PSF model, parameter names and window."""
        record = regressor_record(self.cfg.network, self.model, self.window)
        return Artefact(PSF_REGRESSOR, REGRESSOR_KEY, self.network, record)

    def validate(
        self,
        network: nn.Module,
        data: Any,
        device: torch.device,
        settings: ValidationSettings,
    ) -> dict[str, float]:
        """R² per parameter (eq. 15, physical units, valid samples), its mean ``r2`` and
        the a0 accuracy of ``network`` on the validation samples (a
        :class:`~hpcdeconv.data.samples.PSFSamples`)."""
        assert isinstance(data, PSFSamples)
        was_training = network.training
        network.eval()
        preds, invalid = [], []
        try:
            for start in range(0, len(data.patches), _VAL_BATCH):
                patches = torch.from_numpy(data.patches[start : start + _VAL_BATCH])
                p, a0 = regress(network, self.model, patches, settings.autocast_dtype)
                preds.append(p.numpy())
                invalid.append(a0.numpy())
        finally:
            network.train(was_training)
        pred = np.concatenate(preds) if preds else np.zeros((0, len(self.model.names)))
        return regression_scores(
            self.model.names,
            pred,
            np.concatenate(invalid) if invalid else np.zeros(0),
            data.params,
            data.valid,
        )
