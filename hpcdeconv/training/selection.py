"""Model selection: which evaluation of a run scored best on the configured metric."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from hpcdeconv.errors import ConfigError

log = logging.getLogger(__name__)


class BestTracker:
    """The best validation score of a run so far, by one metric.

    Parameters
    ----------
    metric
        A key of the method's validation result (e.g. ``"psnr"``, ``"r2"``) or
        ``"none"``, which never improves (no best checkpoint is kept).
    higher_is_better
        The metric's direction (PSNR, SSIM and R² are better when higher, a loss when
        lower).

    Attributes
    ----------
    step
        Step of the best evaluation, or ``None`` before the first.
    value
        Its score (PSNR in dB, SSIM unitless), or ``None``.
    """

    def __init__(self, metric: str, higher_is_better: bool = True) -> None:
        self.metric = metric
        self.higher_is_better = higher_is_better
        self.step: int | None = None
        self.value: float | None = None

    @property
    def enabled(self) -> bool:
        """Whether a best checkpoint is kept at all."""
        return self.metric != "none"

    def update(self, step: int, metrics: Mapping[str, float]) -> bool:
        """Record an evaluation; ``True`` if it beats every earlier one.

        An empty ``metrics`` (nothing was evaluated, e.g. on a rank other than 0) and a
        non-finite score never improve; a tie keeps the earlier step.

        Raises
        ------
        KeyError
            ``metrics`` is not empty but lacks the tracked metric.
        """
        if not self.enabled or not metrics:
            return False
        if self.metric not in metrics:
            raise KeyError(f"validation gave {sorted(metrics)}, not {self.metric!r}")
        value = float(metrics[self.metric])
        if not math.isfinite(value) or (self.value is not None and not self._beats(value)):
            return False
        self.step, self.value = int(step), value
        return True

    def _beats(self, value: float) -> bool:
        assert self.value is not None
        return value > self.value if self.higher_is_better else value < self.value

    def state_dict(self) -> dict[str, Any]:
        """The tracker as numbers and strings (checkpoint-safe)."""
        return {"metric": self.metric, "step": self.step, "value": self.value}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; a record kept by another metric is dropped.

        Scores of different metrics cannot be compared, so after a change of
        ``train.best_metric`` the next evaluation becomes the new best.
        """
        if state.get("metric") != self.metric:
            if state.get("value") is not None and self.enabled:
                log.warning(
                    "best checkpoint was selected by %s, now by %s: the next evaluation "
                    "starts a new record",
                    state.get("metric"),
                    self.metric,
                )
            self.step = self.value = None
            return
        self.step = None if state.get("step") is None else int(state["step"])
        self.value = None if state.get("value") is None else float(state["value"])


def best_tracker(metric: str, metrics: Mapping[str, bool], method: str) -> BestTracker:
    """The tracker of ``train.best_metric`` for a method reporting ``metrics``.

    Parameters
    ----------
    metric
        ``train.best_metric``.
    metrics
        The method's selectable metrics, each with whether higher is better.
    method
        The method's name, for the message.

    Raises
    ------
    ConfigError
        The method does not report ``metric``.
    """
    if metric == "none":
        return BestTracker(metric)
    if metric not in metrics:
        known = ", ".join([*metrics, "none"])
        raise ConfigError(
            f"train.best_metric {metric!r} is not a validation metric of method {method} "
            f"(one of {known})"
        )
    return BestTracker(metric, higher_is_better=bool(metrics[metric]))
