"""Graceful stop on SIGUSR1 / SIGUSR2 / SIGTERM: checkpoint, then requeue the SLURM job.

SLURM sends ``--signal=USR1@120`` (our batch scripts) or ``USR2@90`` (submitit's default)
to every task some time before the time limit; SIGTERM comes from ``scancel`` or from
preemption. The handler only records the request; the training loop checks it between
steps (agreed across ranks) and writes a checkpoint. After a time-limit signal the job is
requeued by one owner (``train.requeue``): the trainer (``scontrol requeue``), the handler
that was installed before the trainer's (submitit's: :meth:`StopRequest.pass_on`), or
nobody. On SIGTERM it just stops, so ``scancel`` ends a job instead of requeueing it (a
preempting scheduler requeues by itself).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from collections.abc import Mapping
from types import FrameType

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
#: Signals that announce the time limit (or a preemption with notice): stop and requeue.
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


class StopRequest:
    """Records the first stop signal received; installs handlers from the main thread only."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        # Kept after uninstall() for pass_on().
        self._original: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived."""
        return self.signum is not None

    @property
    def level(self) -> float:
        """0: none; 1: stop (SIGTERM); 2: stop and requeue (SIGUSR1/2). Reduced by max."""
        if self.signum is None:
            return 0.0
        return 2.0 if self.signum in REQUEUE_SIGNALS else 1.0

    def install(self) -> StopRequest:
        """Catch the stop signals (no-op outside the main thread, e.g. in notebooks)."""
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            self._original = dict(self._previous)
        return self

    def pass_on(self) -> None:
        """Call the handler that was installed before :meth:`install` with the received
        signal (submitit's checkpoint-and-requeue, which exits the process); nothing when no
        signal arrived or that handler was the default or ignored one."""
        previous = self._original.get(self.signum) if self.signum is not None else None
        if callable(previous):
            previous(self.signum, None)

    def uninstall(self) -> None:
        """Restore the previous handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()


def requeue_slurm_job(env: Mapping[str, str] = os.environ) -> bool:
    """``scontrol requeue $SLURM_JOB_ID``; returns whether a requeue was requested."""
    job = env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID")
    job_id = (
        f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        if job
        else env.get("SLURM_JOB_ID")
    )
    if not job_id:
        return False
    result = subprocess.run(
        ["scontrol", "requeue", job_id], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        log.warning("scontrol requeue %s failed: %s", job_id, result.stderr.strip())
        return False
    log.info("requeued SLURM job %s", job_id)
    return True
