"""Watching a sweep: trials whose job died without reporting are found and retried.

A trial is RUNNING in the study from the moment a worker takes it until the worker tells the
result. When the worker's job ends without telling (node failure, out-of-memory kill,
SIGKILL, time limit without a requeue), the trial would stay RUNNING for ever. The monitor
asks SLURM's accounting (``sacct``) how each such job ended (for local workers: whether the
process still lives), marks the trial FAIL with that end, and enqueues the same parameters
again, up to ``executor.max_retries`` times, with the dead attempt's run directory (so the
retry resumes from its checkpoint). A worker whose job ended is replaced; after an
``OUT_OF_MEMORY`` or ``TIMEOUT`` end with ``executor.retry_scale`` times more memory and
time (the resubmit-with-more-resources pattern of large imaging pipelines). A worker whose
job ended abnormally while it held no trial (a node failure at its start, a kill between two
trials) is replaced too while trials wait, up to ``executor.max_retries`` times in a row.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hpcdeconv.sweep import layout as attrs
from hpcdeconv.sweep.space import budget
from hpcdeconv.sweep.submit import Submission, submissions, submit_workers

if TYPE_CHECKING:
    import optuna

    from hpcdeconv.sweep.config import SweepConfig
    from hpcdeconv.sweep.layout import SweepLayout

log = logging.getLogger(__name__)

#: sacct states of a job that will not run again.
ENDED = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "TIMEOUT",
}
#: Ends after which a retry gets more memory and time.
STARVED = {"OUT_OF_MEMORY", "TIMEOUT"}
#: Ends of a worker that holds no trial which call for no replacement: it found nothing
#: left to run, or somebody cancelled it.
DELIBERATE = {"COMPLETED", "CANCELLED"}


@dataclass(frozen=True)
class DeadTrial:
    """A trial whose job ended without telling the study, and how the job ended."""

    number: int
    worker: int
    job_id: str
    end: str


def job_ends(job_ids: list[str]) -> dict[str, str]:
    """How each ended job ended (sacct state); running or pending jobs are left out.

    Local workers (``pid:N``) are alive while their process is; a dead one ends
    ``FAILED``. SLURM jobs are looked up in one ``sacct`` call.
    """
    ends: dict[str, str] = {}
    slurm = [j for j in job_ids if not j.startswith("pid:")]
    for job in job_ids:
        if job.startswith("pid:") and not _process_alive(int(job.removeprefix("pid:"))):
            ends[job] = "FAILED"
    if not slurm:
        return ends
    proc = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(slurm)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    for line in proc.stdout.splitlines():
        job, _, state = line.partition("|")
        # "CANCELLED by 0": the first word is the state.
        word = state.split()[0] if state.strip() else ""
        if job in slurm and word in ENDED:
            ends[job] = word
    return ends


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not alive.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


def dead_trials(study: optuna.Study) -> list[DeadTrial]:
    """RUNNING trials whose job has ended."""
    from optuna.trial import TrialState

    running = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    jobs = sorted({str(t.user_attrs.get(attrs.JOB_ID, "")) for t in running} - {""})
    ends = job_ends(jobs)
    return [
        DeadTrial(t.number, int(t.user_attrs[attrs.WORKER]), job, ends[job])
        for t in running
        if (job := str(t.user_attrs.get(attrs.JOB_ID, ""))) in ends
    ]


def retry_dead(study: optuna.Study, cfg: SweepConfig, layout: SweepLayout) -> list[DeadTrial]:
    """Mark dead trials FAIL, enqueue their retries and replace their workers.

    Returns the dead trials found.
    """
    from optuna.trial import TrialState

    dead = dead_trials(study)
    for d in dead:
        frozen = study.get_trials(deepcopy=False)[d.number]
        retries = int(frozen.user_attrs.get(attrs.RETRIES, 0))
        study._storage.set_trial_user_attr(
            frozen._trial_id, attrs.ERROR, f"job {d.job_id} ended {d.end} without reporting"
        )
        study._storage.set_trial_state_values(frozen._trial_id, TrialState.FAIL)
        if retries >= cfg.executor.max_retries:
            log.warning("trial %d: job %s ended %s; no retries left", d.number, d.job_id, d.end)
            continue
        study.enqueue_trial(
            dict(frozen.params),
            user_attrs={
                attrs.RETRY_OF: int(frozen.user_attrs.get(attrs.RETRY_OF, d.number)),
                attrs.RETRIES: retries + 1,
                attrs.RUN_DIR: frozen.user_attrs[attrs.RUN_DIR],
            },
            skip_if_exists=False,
        )
        log.warning(
            "trial %d: job %s ended %s; retry %d enqueued", d.number, d.job_id, d.end, retries + 1
        )
    replace_ended_workers(cfg, layout, {d.job_id: d.end for d in dead})
    return dead


def replace_ended_workers(cfg: SweepConfig, layout: SweepLayout, ends: dict[str, str]) -> None:
    """Resubmit the workers whose latest job ended abnormally while trials wait."""
    by_scale: dict[tuple[str, float], list[int]] = {}
    for sub in latest_submissions(layout).values():
        end = ends.get(sub.job_id)
        if end is None:
            continue
        scale = sub.scale * (cfg.executor.retry_scale if end in STARVED else 1.0)
        by_scale.setdefault((sub.executor, scale), []).append(sub.worker)
    for (executor, scale), workers in by_scale.items():
        submit_workers(layout, cfg.executor, workers, executor=executor, scale=scale)


def latest_submissions(layout: SweepLayout) -> dict[int, Submission]:
    """The latest submission of each worker, by worker index."""
    return {sub.worker: sub for sub in submissions(layout)}


def replace_lost_workers(study: optuna.Study, cfg: SweepConfig, layout: SweepLayout) -> None:
    """Resubmit the workers whose job ended abnormally while holding no trial.

    :func:`retry_dead` replaces a worker whose trial died with it. A worker that dies while
    it holds none (a node failure before its first trial, a kill between two trials) leaves
    no RUNNING trial behind; unreplaced, it leaves the waiting trials to the other workers,
    or, if it was the last, to nobody. Replaced only while some trial waits for a worker;
    a worker whose last ``executor.max_retries + 1`` jobs all ended without ever taking a
    trial is given up.
    """
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    running = [t for t in trials if t.state == TrialState.RUNNING]
    if unfinished(study, cfg) <= len(running):
        return  # no trial waits for a worker
    holding = {str(t.user_attrs.get(attrs.JOB_ID)) for t in running}
    took = {str(t.user_attrs.get(attrs.JOB_ID)) for t in trials}
    every = submissions(layout)
    latest = {sub.worker: sub for sub in every}
    ends = job_ends([s.job_id for s in latest.values() if s.job_id not in holding])
    lost: dict[str, str] = {}
    for sub in latest.values():
        end = ends.get(sub.job_id)
        if end is None or end in DELIBERATE:
            continue
        # Jobs of this worker since the last one that took a trial: all ended without one.
        history = [s.job_id for s in every if s.worker == sub.worker]
        idle = len(history) - max((i + 1 for i, j in enumerate(history) if j in took), default=0)
        if idle > cfg.executor.max_retries:
            continue
        log.warning(
            "worker %d: job %s ended %s without a trial; resubmitted", sub.worker, sub.job_id, end
        )
        lost[sub.job_id] = end
    replace_ended_workers(cfg, layout, lost)


def unfinished(study: optuna.Study, cfg: SweepConfig) -> int:
    """Trials still to run: waiting or running ones, plus the unspent budget."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    open_ = sum(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in trials)
    originals = sum(attrs.RETRY_OF not in t.user_attrs for t in trials)
    return open_ + max(0, budget(cfg) - originals)


def live_workers(layout: SweepLayout) -> list[Submission]:
    """Latest submission of each worker whose job has not ended."""
    latest = latest_submissions(layout)
    ends = job_ends([s.job_id for s in latest.values()])
    return [s for s in latest.values() if s.job_id not in ends]


def watch(
    study: optuna.Study, cfg: SweepConfig, layout: SweepLayout, *, poll_s: float = 5.0
) -> int:
    """Until every trial has ended: retry dead trials, replace dead workers.

    Returns
    -------
    int
        The trials left: 0 once every trial has ended, more when no worker lives to run
        them and none may be replaced (``hpcdeconv sweep --resume`` submits new ones).
    """
    while True:
        retry_dead(study, cfg, layout)
        replace_lost_workers(study, cfg, layout)
        left = unfinished(study, cfg)
        if not live_workers(layout):
            if left:
                log.warning("%d trial(s) left but no worker is running", left)
            return left
        time.sleep(poll_s)
