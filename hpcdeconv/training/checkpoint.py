"""Atomic checkpoints in a run directory, with ``latest`` and ``best`` pointers.

Layout::

    RUN/checkpoints/step_00000100.pt
    RUN/checkpoints/latest          # text: the file name of the newest complete checkpoint
    RUN/checkpoints/best            # JSON: file name, step and validation metrics of the
                                    # checkpoint that scored best (absent if none was kept)

A checkpoint is first written to a temporary file in the same directory, flushed and
fsynced, then renamed over its final name; ``latest`` and ``best`` are replaced the same
way. A process killed at any moment therefore leaves the previous checkpoint and pointers
intact. Pruning keeps the newest ``keep`` checkpoints and the one ``best`` names, so the
best checkpoint (and, under DeepSpeed, its shard directory, kept while a listed checkpoint
refers to it) survives however long ago it was written.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from hpcdeconv.errors import InputError

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
LATEST = "latest"
BEST = "best"
_NAME = re.compile(r"^step_(\d{8})\.pt$")
#: Units of the validation metrics, for messages.
_UNITS = {"psnr": " dB", "psnr_input": " dB"}


def save_state(path: Path, state: Mapping[str, Any]) -> None:
    """``torch.save`` of ``state`` to ``path``, atomically (:func:`atomic_write`).

    The state is serialised in memory first and written in one call: torch's zip writer
    turns a full disk into a ``RuntimeError`` ("unexpected pos …") when it fails while
    finishing the archive, whereas a plain write reports it as the ``OSError`` (ENOSPC)
    that the engine turns into one clear line and that leaves the previous checkpoint.

    Raises
    ------
    OSError
        The file could not be written (full disk, permissions).
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, lambda fh: fh.write(buffer.getbuffer()))


def atomic_write(path: Path, write: Any) -> None:
    """Write through ``write(fh)`` into a temporary file beside ``path``, fsync, rename."""
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


def step_tag(step: int) -> str:
    """``step_00000100``: the stem of the checkpoint of ``step``, and the name of the
    directories that hold its per-rank parts (DeepSpeed shards, rank states)."""
    return f"step_{step:08d}"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives in ``run_dir``."""
    return Path(run_dir) / CKPT_DIR / f"{step_tag(step)}.pt"


def prune_unreferenced(run_dir: Path, root: Path, keep: str) -> None:
    """Remove directories under ``root`` that no listed checkpoint (nor ``keep``) names.

    Per-rank parts of a checkpoint live in directories named by :func:`step_tag`; once
    their checkpoint is pruned they are never read again.
    """
    if not root.is_dir():
        return
    referenced = {path.stem for path in list_checkpoints(run_dir)} | {keep}
    for tag_dir in root.iterdir():
        if tag_dir.is_dir() and tag_dir.name not in referenced:
            log.debug("removing unreferenced %s", tag_dir)
            shutil.rmtree(tag_dir)


def count_nonfinite(tree: Any) -> int:
    """Number of NaN/Inf values in the floating-point tensors of a nested state."""
    if isinstance(tree, torch.Tensor):
        return int((~torch.isfinite(tree)).sum()) if tree.is_floating_point() else 0
    if isinstance(tree, Mapping):
        return sum(count_nonfinite(value) for value in tree.values())
    if isinstance(tree, list | tuple):
        return sum(count_nonfinite(value) for value in tree)
    return 0


def save_checkpoint(
    run_dir: Path,
    step: int,
    state: dict[str, Any],
    keep: int = 2,
    best: Mapping[str, float] | None = None,
    metric: str | None = None,
) -> Path:
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
        How many of the newest checkpoints to keep; the one ``best`` names is kept too.
    best
        Validation metrics of this checkpoint if it is the new best: ``best`` is then
        pointed at it (see :func:`mark_best`) before pruning.
    metric
        The key of ``best`` that selected it (e.g. ``"psnr"``), recorded for messages.

    Returns
    -------
    Path
        The checkpoint file.
    """
    ckpt_dir = run_dir / CKPT_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(run_dir, step)
    save_state(path, state)
    atomic_write(ckpt_dir / LATEST, lambda fh: fh.write(path.name.encode()))
    if best is not None:
        mark_best(run_dir, path, best, metric=metric)
    prune_checkpoints(run_dir, keep)
    return path


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all checkpoints but the newest ``keep`` and the one ``best`` names.

    A run therefore holds at most ``keep + 1`` checkpoints: the best one survives when it
    is older than the newest ``keep``.

    Returns
    -------
    list of Path
        The deleted files.
    """
    protected = best_checkpoint(run_dir)
    found = list_checkpoints(run_dir)
    removed = [p for p in found[: max(len(found) - keep, 0)] if p != protected]
    for old in removed:
        old.unlink(missing_ok=True)
    return removed


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


def checkpoint_step(path: Path) -> int | None:
    """The step encoded in a checkpoint's file name (``step_00000100.pt`` → 100)."""
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class BestRecord:
    """What the ``best`` pointer of a run says.

    Attributes
    ----------
    path
        The best checkpoint file.
    step
        Its step.
    metrics
        Its validation metrics (e.g. ``{"psnr": 27.3, "ssim": 0.91}``; PSNR in dB).
    metric
        The key that selected it, or ``None`` if not recorded.
    """

    path: Path
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    metric: str | None = None

    def summary(self) -> str:
        """E.g. ``"step 1000, psnr 27.30 dB, ssim 0.910"`` (the selecting metric first)."""
        keys = [k for k in (self.metric, "psnr", "ssim") if k and k in self.metrics]
        shown = [f"{k} {format_metric(k, self.metrics[k])}" for k in dict.fromkeys(keys)]
        return ", ".join([f"step {self.step}", *shown])


def format_metric(key: str, value: float) -> str:
    """A validation metric for messages: PSNR to 0.01 dB, others to 3 decimals."""
    unit = _UNITS.get(key, "")
    return f"{value:.2f}{unit}" if unit else f"{value:.3f}"


def mark_best(
    run_dir: Path, path: Path, metrics: Mapping[str, float], metric: str | None = None
) -> BestRecord:
    """Point ``best`` at the checkpoint ``path`` of ``run_dir`` (atomic).

    Parameters
    ----------
    run_dir
        The run directory.
    path
        A checkpoint file of this run (``RUN/checkpoints/step_*.pt``), already written.
    metrics
        Its validation metrics; finite numbers only (stored as JSON).
    metric
        The key of ``metrics`` that selected it.

    Returns
    -------
    BestRecord
        What the pointer now says.

    Raises
    ------
    ValueError
        ``path`` is not an existing checkpoint of ``run_dir``, or a metric is not finite.
    """
    ckpt_dir = run_dir / CKPT_DIR
    path = Path(path)
    step = checkpoint_step(path)
    if step is None or path.parent.resolve() != ckpt_dir.resolve() or not path.is_file():
        raise ValueError(f"{path} is not a written checkpoint of {run_dir}")
    values = {str(k): float(v) for k, v in metrics.items()}
    bad = sorted(k for k, v in values.items() if not math.isfinite(v))
    if bad:
        raise ValueError(f"non-finite validation metric(s) {bad} cannot select a checkpoint")
    if metric is not None and metric not in values:
        raise ValueError(f"metric {metric!r} is not among {sorted(values)}")
    record = {"checkpoint": path.name, "step": step, "metric": metric, "metrics": values}
    payload = json.dumps(record, indent=1, sort_keys=True).encode()
    atomic_write(ckpt_dir / BEST, lambda fh: fh.write(payload))
    return BestRecord(ckpt_dir / path.name, step, values, metric)


def read_best(run_dir: Path) -> BestRecord | None:
    """The ``best`` pointer of a run, or ``None`` if it has none (or it names no file).

    A pointer that cannot be read, or names a missing file, is reported with a warning
    and ignored: ``latest`` is then the fallback.
    """
    pointer = run_dir / CKPT_DIR / BEST
    if not pointer.is_file():
        return None
    try:
        record = json.loads(pointer.read_text())
        name = str(record["checkpoint"])
        metrics = {str(k): float(v) for k, v in dict(record.get("metrics", {})).items()}
        metric = record.get("metric")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring unreadable best-checkpoint pointer %s (%s)", pointer, exc)
        return None
    path = pointer.parent / name
    step = checkpoint_step(path)
    if step is None or not path.is_file():
        log.warning("ignoring best-checkpoint pointer %s: %s does not exist", pointer, path)
        return None
    return BestRecord(path, step, metrics, None if metric is None else str(metric))


def best_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``best`` points to, or ``None`` if the run keeps none."""
    record = read_best(run_dir)
    return None if record is None else record.path


CheckpointKind = Literal["best", "latest", "file"]


@dataclass(frozen=True)
class CheckpointChoice:
    """Which checkpoint a path resolved to, and why.

    Attributes
    ----------
    path
        The checkpoint file.
    kind
        ``"best"`` or ``"latest"`` when a run directory was given and that pointer chose
        it; ``"file"`` when the file itself was given.
    step
        Its step (from the file name), or ``None`` for a file named otherwise.
    best
        The run's ``best`` record if ``path`` is the run's best checkpoint, else ``None``.
    """

    path: Path
    kind: CheckpointKind
    step: int | None
    best: BestRecord | None = None

    def describe(self) -> str:
        """One line for logs, e.g. ``"best checkpoint (step 1000, psnr 27.30 dB) RUN/…pt"``."""
        if self.best is not None:
            what = "best checkpoint" if self.kind != "file" else "checkpoint (the run's best)"
            return f"{what} ({self.best.summary()}) {self.path}"
        step = "" if self.step is None else f" (step {self.step})"
        what = {"latest": "latest checkpoint", "file": "checkpoint", "best": "best checkpoint"}
        return f"{what[self.kind]}{step} {self.path}"


def choose_checkpoint(path: Path, prefer: Literal["best", "latest"] = "best") -> CheckpointChoice:
    """Resolve a checkpoint file, a run directory or its ``checkpoints`` directory.

    Parameters
    ----------
    path
        A checkpoint file, a run directory or ``RUN/checkpoints``.
    prefer
        For a directory: ``"best"`` takes the ``best`` checkpoint when the run has one,
        else ``latest``; ``"latest"`` always takes ``latest`` (resuming).

    Raises
    ------
    InputError
        Nothing there is a checkpoint.
    """
    path = Path(path)
    if path.is_file():
        run_dir = path.parent.parent
        record = read_best(run_dir) if path.parent.name == CKPT_DIR else None
        mine = record is not None and record.path.resolve() == path.resolve()
        return CheckpointChoice(path, "file", checkpoint_step(path), record if mine else None)
    for run_dir in (path, path.parent):
        if not run_dir.is_dir():
            continue
        record = read_best(run_dir)
        if record is not None and prefer == "best":
            return CheckpointChoice(record.path, "best", record.step, record)
        found = latest_checkpoint(run_dir)
        if found is not None:
            mine = record is not None and record.path == found
            return CheckpointChoice(
                found, "latest", checkpoint_step(found), record if mine else None
            )
    raise InputError(f"no checkpoint found at {path}")


def resolve_checkpoint(path: Path, prefer: Literal["best", "latest"] = "best") -> Path:
    """The checkpoint file for ``path`` (see :func:`choose_checkpoint`); logs the choice.

    For a run directory this is its ``best`` checkpoint when it has one, else ``latest``.
    """
    choice = choose_checkpoint(path, prefer)
    log.info("using %s", choice.describe())
    return choice.path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    ``path`` may be a run directory: its ``latest`` checkpoint is loaded (the run's
    state, as resuming needs it); inference chooses with :func:`choose_checkpoint`,
    which prefers ``best``.

    Raises
    ------
    InputError
        No checkpoint at ``path``, or the file is not a readable hpcdeconv checkpoint.
    """
    path = choose_checkpoint(path, prefer="latest").path
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path} is not a readable hpcdeconv checkpoint ({first})") from None
    if not isinstance(state, dict) or "format" not in state or "config" not in state:
        raise InputError(f"{path} is not an hpcdeconv checkpoint")
    return state
