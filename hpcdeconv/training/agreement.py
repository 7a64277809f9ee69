"""What every rank must agree on after a step: all losses finite, all weights finite, stop?

A NaN on one rank must end every rank with the same line before anything of the step is
written; a stop signal seen by one rank must stop all of them at the same step. Both are
decided by one all-reduce (max) per step. After a validation, rank 0's validation hook (a
sweep's pruner) decides for every rank whether the run ends there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from hpcdeconv.errors import HpcdeconvError
from hpcdeconv.training.checkpoint import count_nonfinite
from hpcdeconv.training.strategy import Strategy, Trainable, agreed

#: Called on rank 0 after each validation with (step, scores); True stops the run there.
ValidationHook = Callable[[int, Mapping[str, float]], bool]


def agree_on_hook(
    strategy: Strategy, hook: ValidationHook | None, step: int, scores: Mapping[str, float]
) -> bool:
    """Collective when ``hook`` is set: its verdict on rank 0 (where the scores are), on
    every rank. Every rank must pass a hook when one does."""
    if hook is None:
        return False
    verdict = strategy.agree(lambda: hook(step, scores), True)
    flag = torch.tensor(float(bool(verdict)), device=strategy.device)
    return float(strategy.all_reduce_max(flag)) > 0


class TrainingDivergedError(HpcdeconvError):
    """A loss or a weight became NaN or infinite."""


def agree_on_step(
    strategy: Strategy,
    losses: Mapping[str, torch.Tensor],
    stop_level: float,
    step: int,
    last_good: str,
) -> float:
    """Collective, once per step: was the step finite on every rank, and must we stop?

    One all-reduce (max) of ``[stop level, one flag per rank and loss]``. A non-finite
    loss on any rank ends every rank with the same line before anything of the step is
    written; DDP has already averaged that rank's gradients into every rank's weights.

    Parameters
    ----------
    strategy
        The run's strategy (its collectives).
    losses
        This rank's scalar losses of the step, by name.
    stop_level
        This rank's stop request (0: none; 1: stop; 2: stop and requeue).
    step
        The step just taken (1-based), for the message.
    last_good
        The newest good checkpoint in words, for the message.

    Returns
    -------
    float
        The strongest stop request of any rank.

    Raises
    ------
    TrainingDivergedError
        Some rank's loss is NaN or infinite (raised on every rank).
    """
    keys = sorted(losses)
    world, rank = strategy.world_size, strategy.rank
    flags = torch.zeros(1 + world * len(keys), device=strategy.device)
    flags[0] = stop_level
    if keys:
        local = torch.stack([~torch.isfinite(losses[k].float()) for k in keys]).float()
        flags[1 + rank * len(keys) : 1 + (rank + 1) * len(keys)] = local.to(flags.device)
    reduced = strategy.all_reduce_max(flags).cpu()
    bad = reduced[1:].view(world, len(keys)) if keys else reduced[1:1]
    if keys and bool(bad.any()):
        where = "; ".join(
            f"rank {r}: {', '.join(k for k, b in zip(keys, row, strict=True) if b)}"
            for r, row in enumerate(bad.bool().tolist())
            if any(row)
        )
        raise agreed(
            TrainingDivergedError(
                f"non-finite loss at step {step} ({where}); every rank stopped "
                f"before it was checkpointed, {last_good}"
            )
        )
    return float(reduced[0])


def check_weights_finite(
    strategy: Strategy, trainables: Mapping[str, Trainable], step: int, last_good: str
) -> None:
    """Collective: no rank may checkpoint weights that are NaN or infinite.

    Raises
    ------
    TrainingDivergedError
        Some group holds a non-finite weight on some rank (raised on every rank).
    """
    counts = torch.tensor(
        [float(count_nonfinite(list(t.module.parameters()))) for t in trainables.values()]
    )
    counts = strategy.all_reduce_max(counts)
    bad = [name for name, n in zip(trainables, counts.tolist(), strict=True) if n > 0]
    if bad:
        raise agreed(
            TrainingDivergedError(
                f"non-finite weights in group(s) {', '.join(bad)} after step {step}; "
                f"not checkpointed, {last_good}"
            )
        )
