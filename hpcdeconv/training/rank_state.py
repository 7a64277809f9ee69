"""Per-rank state of a checkpoint: what differs between the processes of one run.

Weights and optimiser states are identical on every rank (DDP) or written by DeepSpeed;
the method's own state (the history pools of the cycleGANs) and the random streams are
not. Rank 0 keeps its part inline in the checkpoint; every other rank writes its own file::

    RUN/checkpoints/ranks/step_00000100/rank_00001.pt

before rank 0 writes ``step_00000100.pt`` and moves ``latest``, so ``latest`` only ever
names a checkpoint whose rank files are complete. A rank file is written atomically like
the checkpoint; directories no listed checkpoint refers to are pruned at the next save.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hpcdeconv.errors import InputError
from hpcdeconv.training.checkpoint import CKPT_DIR, prune_unreferenced, save_state, step_tag

RANK_DIR = "ranks"


def rank_state_path(run_dir: Path, step: int, rank: int) -> Path:
    """Where rank ``rank`` (>= 1) keeps its part of the checkpoint of ``step``."""
    return Path(run_dir) / CKPT_DIR / RANK_DIR / step_tag(step) / f"rank_{rank:05d}.pt"


def save_rank_state(run_dir: Path, step: int, rank: int, state: dict[str, Any]) -> Path:
    """Write this rank's part of the checkpoint of ``step`` atomically."""
    path = rank_state_path(run_dir, step, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_state(path, state)
    return path


def load_rank_state(run_dir: Path, step: int, rank: int) -> dict[str, Any]:
    """Read this rank's part of the checkpoint of ``step`` (``weights_only=True``).

    Raises
    ------
    InputError
        The file is missing or unreadable.
    """
    path = rank_state_path(run_dir, step, rank)
    if not path.is_file():
        raise InputError(f"rank {rank}'s part of the checkpoint of step {step} ({path}) is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path} is not readable ({first})") from None


def prune_rank_states(run_dir: Path, keep_step: int) -> None:
    """Remove rank directories that no listed checkpoint (nor ``keep_step``) refers to."""
    root = Path(run_dir) / CKPT_DIR / RANK_DIR
    prune_unreferenced(run_dir, root, keep=step_tag(keep_step))
