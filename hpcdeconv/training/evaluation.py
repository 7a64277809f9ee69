"""Validation during training: the method scores its artefact (and its EMA) on rank 0.

The validation data is read once per run (:meth:`~hpcdeconv.training.feed.Feed.validation`)
so every evaluation scores the same data; what the scores are is the method's business
(:meth:`~hpcdeconv.methods.base.Method.validate`). The scores of the weights inference
uses by default (the EMA's when one is kept) decide the run's best checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from hpcdeconv.config import TrainConfig
from hpcdeconv.methods.base import Method, ValidationSettings
from hpcdeconv.training.ema import GeneratorEMA
from hpcdeconv.training.feed import Feed
from hpcdeconv.training.selection import BestTracker
from hpcdeconv.training.strategy import Strategy

#: Writes one record of scores: ``(kind, scores)``, kind ``"val"`` or ``"val_ema"``.
ScoreLog = Callable[[str, Mapping[str, float]], None]

_UNREAD = object()


class Evaluator:
    """Scores the artefact's network and its EMA, and tracks the best evaluation.

    Parameters
    ----------
    method
        The trained method (its :meth:`~hpcdeconv.methods.base.Method.validate`).
    network
        The artefact's network (:meth:`~hpcdeconv.methods.base.Method.artefact`).
    feed
        The run's feed; its validation data is read at the first evaluation.
    train
        ``train:``: validation tile, overlap and crop.
    strategy
        The run's strategy: device, autocast dtype, collectives.
    ema
        The EMA of ``network``, if one is kept.
    best
        The tracker of ``train.best_metric``.
    """

    def __init__(
        self,
        method: Method,
        network: nn.Module,
        feed: Feed,
        train: TrainConfig,
        strategy: Strategy,
        ema: GeneratorEMA | None,
        best: BestTracker,
    ) -> None:
        self.method = method
        self.network = network
        self.feed = feed
        self.crop = None if train.val_crop is None else tuple(train.val_crop)
        self.settings = ValidationSettings(
            tile=tuple(train.val_tile),
            overlap=train.val_overlap,
            autocast_dtype=strategy.autocast_dtype,
        )
        self.strategy = strategy
        self.ema = ema
        self.best = best
        self._data: Any = _UNREAD

    def score(self, log: ScoreLog) -> dict[str, float]:
        """Rank 0: the method's scores of the network (``val``) and its EMA (``val_ema``).

        Each record goes to ``log``. Returns the scores of the weights inference uses by
        default (the EMA's when it is kept); ``{}`` when the data has no validation part.
        """
        if self._data is _UNREAD:
            # Read and cut once: every evaluation scores the same data.
            self._data = self.feed.validation(self.crop)
        if self._data is None:
            return {}
        nets = {"val": self.network}
        if self.ema is not None:
            nets["val_ema"] = self.ema.module
        scores: dict[str, dict[str, float]] = {}
        for kind, net in nets.items():
            with torch.no_grad():
                scores[kind] = self.method.validate(
                    net, self._data, self.strategy.device, self.settings
                )
            log(kind, scores[kind])
        return scores["val_ema" if self.ema is not None else "val"]

    def evaluate(self, step: int, log: ScoreLog) -> tuple[dict[str, float], bool]:
        """Collective: validation on rank 0, and whether it is the run's best so far.

        Returns
        -------
        (dict, bool)
            The scores (``{}`` on ranks other than 0) and, on every rank, whether this
            step's checkpoint becomes ``best`` (``train.best_metric``).
        """
        metrics = self.strategy.agree(lambda: self.score(log), True) or {}
        improved = self.best.update(step, metrics)
        agreed_flag = self.strategy.all_reduce_max(torch.tensor(float(improved)))
        return metrics, bool(agreed_flag > 0)
