"""Atomic checkpoints in a run directory.

Layout::

    RUN/checkpoints/step_00000100.pt
    RUN/checkpoints/latest          # text: the file name of the newest complete checkpoint

A checkpoint is first written to a temporary file in the same directory, flushed and
fsynced, then renamed over its final name; ``latest`` is replaced the same way. A process
killed at any moment therefore leaves the previous checkpoint and pointer intact.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from hpcdeconv.errors import InputError

CKPT_DIR = "checkpoints"
LATEST = "latest"
_NAME = re.compile(r"^step_(\d{8})\.pt$")


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` for ``step`` atomically, point ``latest`` at it, prune old ones.

    Parameters
    ----------
    run_dir
        The run directory.
    step
        Number of completed optimisation steps.
    state
        Tensors, numbers, strings and containers of them only (loadable with
        ``weights_only=True``).
    keep
        How many of the newest checkpoints to keep.
    """
    ckpt_dir = run_dir / CKPT_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step_{step:08d}.pt"
    _atomic_write(path, lambda fh: torch.save(state, fh))
    _atomic_write(ckpt_dir / LATEST, lambda fh: fh.write(path.name.encode()))
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    ckpt_dir = run_dir / CKPT_DIR
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if _NAME.match(p.name))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` points to, or ``None`` if the run has none."""
    pointer = run_dir / CKPT_DIR / LATEST
    if pointer.is_file():
        path = pointer.parent / pointer.read_text().strip()
        if path.is_file():
            return path
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: Path) -> Path:
    """Accept a checkpoint file, a run directory or its ``checkpoints`` directory."""
    if path.is_file():
        return path
    for run_dir in (path, path.parent):
        found = latest_checkpoint(run_dir) if run_dir.is_dir() else None
        if found is not None:
            return found
    raise InputError(f"no checkpoint found at {path}")


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``)."""
    path = resolve_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path} is not a readable hpcdeconv checkpoint ({first})") from None
    if not isinstance(state, dict) or "format" not in state or "config" not in state:
        raise InputError(f"{path} is not an hpcdeconv checkpoint")
    return state
