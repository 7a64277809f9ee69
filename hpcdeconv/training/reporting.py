"""What a run reports while it trains: mean losses, validation scores, image summaries.

Every rank computes (the loss means are collectives); rank 0 writes, through the run
directory's guarded writes (:meth:`~hpcdeconv.training.rundir.RunDirectory.write`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from hpcdeconv.training.rundir import RunDirectory
from hpcdeconv.training.runlog import RunLogger
from hpcdeconv.training.strategy import Strategy, Trainable


class RunReporter:
    """Logs of one run: ``metrics.jsonl`` and TensorBoard, written by rank 0.

    Parameters
    ----------
    run
        The run directory.
    strategy
        The run's strategy (its rank and collectives).
    """

    def __init__(self, run: RunDirectory, strategy: Strategy) -> None:
        self.run = run
        self.strategy = strategy
        self.logger = RunLogger(run.path, enabled=strategy.is_main)

    def truncate_after(self, step: int) -> int:
        """Collective: drop records after ``step`` (a resumed run logs them again)."""
        return self.strategy.agree(lambda: self.logger.truncate_after(step), True) or 0

    def losses(
        self, step: int, losses: Mapping[str, torch.Tensor], trainable: Trainable
    ) -> dict[str, float]:
        """Collective: the mean of each loss over ranks and the current learning rate.

        Returns
        -------
        dict
            ``{loss name: mean, "lr": learning rate of trainable}``, written by rank 0.
        """
        values = {k: float(self.strategy.all_reduce_mean(v)) for k, v in losses.items()}
        values["lr"] = _current_lr(trainable)
        self.strategy.agree(lambda: self.scores(step, "train", values), True)
        return values

    def scores(self, step: int, kind: str, values: Mapping[str, float]) -> None:
        """Rank 0: one record of ``kind`` (``train``, ``val``, ``val_ema``)."""
        self.run.write("log", step, lambda: self.logger.scalars(step, kind, values))

    def images(self, step: int, images: Mapping[str, torch.Tensor]) -> None:
        """Collective: image summaries of the last step, written by rank 0."""
        self.strategy.agree(
            lambda: self.run.write("image summary", step, lambda: self.logger.images(step, images)),
            True,
        )

    def close(self) -> None:
        """Flush TensorBoard."""
        self.logger.close()


def _current_lr(trainable: Any) -> float:
    optimizer = getattr(trainable, "optimizer", None)
    return float(optimizer.param_groups[0]["lr"]) if optimizer is not None else float("nan")
