"""The run directory of a training: claimed by one writer, made or emptied, written safely.

Rank 0 holds the run's lock for the life of the run; every write of a checkpoint or a
log goes through :meth:`RunDirectory.write`, so a full disk or a lost permission ends
the run with one line that names the checkpoint still intact.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from hpcdeconv.data.lock import OutputLock
from hpcdeconv.data.safety import empty_output
from hpcdeconv.errors import ConfigError, HpcdeconvError, InputError, OutputExistsError
from hpcdeconv.training.checkpoint import latest_checkpoint

T = TypeVar("T")


class RunWriteError(HpcdeconvError):
    """A checkpoint or log of the run could not be written (full disk, quota, permissions)."""


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, numpy and torch; optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # warn_only: CUDA has no deterministic backward for max_pool3d (the U-Net's
        # pooling) and torch would refuse the whole run. With the U-Net's non-overlapping
        # 2x2x2 windows every input voxel receives at most one gradient, so its atomic adds
        # cannot reorder; every op with a deterministic kernel still gets that kernel.
        torch.use_deterministic_algorithms(True, warn_only=True)
        # cuBLAS is deterministic only with a fixed workspace; read when its handle is made.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision the device cannot train in.

    Raises
    ------
    ConfigError
        fp16 without a GPU.
    """
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision fp16 needs a GPU; use bf16 on the CPU")


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Create the run directory; refuse to clobber a previous run unless asked to.

    ``overwrite`` empties only a directory that holds nothing but a previous run's files
    (:func:`~hpcdeconv.data.safety.check_replaceable`).

    Raises
    ------
    OutputExistsError
        ``run_dir`` is a file, or a used directory without ``resume`` or ``overwrite``.
    InputError
        ``resume`` without a checkpoint in ``run_dir``.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputExistsError(f"run directory {run_dir} is a file; choose another output")
    has_ckpt = latest_checkpoint(run_dir) is not None
    if resume and not has_ckpt:
        raise InputError(f"--resume: no checkpoint in {run_dir}")
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise OutputExistsError(
                f"run directory {run_dir} is not empty; pass --resume to continue it "
                "or --overwrite to start again"
            )
        empty_output(run_dir, "run")
    run_dir.mkdir(parents=True, exist_ok=True)


class RunDirectory:
    """The run directory of one training, its lock and its newest good checkpoint.

    Parameters
    ----------
    path
        The run directory (``output:``).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        # One writer per run directory: rank 0 holds the lock for the life of the run.
        self.lock = OutputLock(self.path, "train")
        #: The newest checkpoint known to hold this run's state (named when a step fails).
        self.last_good: Path | None = None

    def claim(self, resume: bool, overwrite: bool) -> None:
        """Rank 0: lock the run directory, then make (or empty) it (see
        :func:`prepare_run_dir`)."""
        self.lock.acquire()
        prepare_run_dir(self.path, resume, overwrite)

    def release(self) -> None:
        """Give up the lock (idempotent)."""
        self.lock.release()

    def last_good_text(self) -> str:
        """The newest good checkpoint, for error lines."""
        if self.last_good is None:
            return "no checkpoint was written yet"
        return f"last good checkpoint: {self.last_good}"

    def write(self, what: str, step: int, write: Callable[[], T]) -> T:
        """Run a write of the run directory; an OS failure becomes one line naming it.

        Raises
        ------
        RunWriteError
            ``write`` raised an ``OSError``; the line names the file, the reason and the
            checkpoint that stays intact.
        """
        try:
            return write()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            where = exc.filename or self.path
            raise RunWriteError(
                f"could not write the {what} of step {step} ({reason}: {where}); "
                f"{self.last_good_text()} is untouched"
            ) from None
