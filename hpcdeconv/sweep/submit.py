"""Submitting sweep workers: SLURM job arrays through submitit, or local processes.

Each worker (:class:`~hpcdeconv.sweep.worker.SweepWorker`) is one array task. An array
with more tasks than the cluster's ``MaxArraySize`` (``scontrol show config``; or
``executor.max_array_size``) is split into several arrays of at most that many tasks.
Every submission is recorded in ``jobs/jobs.json`` (worker, job id, resource scale), which
the monitor reads to tell live workers from dead ones.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Any

from hpcdeconv.errors import ConfigError
from hpcdeconv.sweep.config import ExecutorConfig
from hpcdeconv.sweep.layout import SweepLayout
from hpcdeconv.sweep.worker import SweepWorker

#: SLURM's default MaxArraySize.
DEFAULT_MAX_ARRAY_SIZE = 1001


@dataclass(frozen=True)
class Submission:
    """One submitted worker: its index, job id (``A_T`` for array tasks, ``pid:N`` local),
    the executor, and the factor its memory and time were scaled by."""

    worker: int
    job_id: str
    executor: str
    scale: float = 1.0


def check_slurm_reachable() -> None:
    """Raise :class:`ConfigError` (with a hint to ``--executor local``) when SLURM's
    controller cannot be reached from here."""
    if shutil.which("sbatch") is None:
        raise ConfigError("SLURM is not installed here (no sbatch on PATH); use --executor local")
    try:
        proc = subprocess.run(
            ["scontrol", "ping"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"SLURM is not reachable ({exc}); use --executor local") from None
    if proc.returncode != 0 or "UP" not in proc.stdout:
        said = (proc.stdout + proc.stderr).strip().splitlines()
        detail = said[-1] if said else f"scontrol ping exited {proc.returncode}"
        raise ConfigError(f"SLURM is not reachable ({detail}); use --executor local")


def max_array_size(cfg: ExecutorConfig) -> int:
    """Tasks one array may have: ``cfg.max_array_size``, else the cluster's MaxArraySize."""
    if cfg.max_array_size is not None:
        return cfg.max_array_size
    try:
        proc = subprocess.run(
            ["scontrol", "show", "config"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return DEFAULT_MAX_ARRAY_SIZE
    found = re.search(r"^MaxArraySize\s*=\s*(\d+)", proc.stdout, re.MULTILINE)
    return int(found.group(1)) if found else DEFAULT_MAX_ARRAY_SIZE


def job_parameters(cfg: ExecutorConfig, scale: float = 1.0) -> dict[str, Any]:
    """submitit's parameters for one worker job; memory and time multiplied by ``scale``."""
    params: dict[str, Any] = {
        "name": "hpcdeconv-sweep",
        "timeout_min": round(cfg.time_min * scale),
        "nodes": cfg.nodes,
        "tasks_per_node": cfg.tasks_per_node,
        "cpus_per_task": cfg.cpus_per_task,
        "mem_gb": round(cfg.mem_gb * scale, 3),
        "slurm_array_parallelism": cfg.parallelism or cfg.workers,
        "slurm_signal_delay_s": cfg.signal_delay_s,
        # scontrol requeue (submitit's, after a time-limit signal) needs a requeueable job.
        "slurm_additional_parameters": {"requeue": True},
    }
    if cfg.gpus_per_task:
        params["gpus_per_node"] = cfg.gpus_per_task * cfg.tasks_per_node
    if cfg.partition is not None:
        params["slurm_partition"] = cfg.partition
    return params


def chunks(workers: list[int], size: int) -> list[list[int]]:
    """``workers`` in consecutive arrays of at most ``size`` tasks."""
    return [workers[i : i + size] for i in range(0, len(workers), size)]


def submit_workers(
    layout: SweepLayout,
    cfg: ExecutorConfig,
    workers: list[int],
    *,
    executor: str,
    scale: float = 1.0,
) -> list[Submission]:
    """Start ``workers`` (indices) as SLURM array tasks or local processes; record them.

    Raises
    ------
    ConfigError
        SLURM was asked for and is not reachable.
    """
    import submitit

    layout.jobs.mkdir(parents=True, exist_ok=True)
    folder = layout.jobs / "%j"
    submitted: list[Submission] = []
    if executor == "local":
        local = submitit.LocalExecutor(folder=folder)
        local.update_parameters(timeout_min=round(cfg.time_min * scale))
        for worker in workers:
            job = local.submit(SweepWorker(layout.root, worker, requeue="none"))
            submitted.append(Submission(worker, f"pid:{job.job_id}", "local", scale))
    else:
        check_slurm_reachable()
        slurm = submitit.AutoExecutor(folder=folder, cluster="slurm")
        slurm.update_parameters(**job_parameters(cfg, scale))
        for group in chunks(workers, max_array_size(cfg)):
            with slurm.batch():
                jobs = [slurm.submit(SweepWorker(layout.root, w, "submitit")) for w in group]
            submitted += [
                Submission(w, str(job.job_id), "slurm", scale)
                for w, job in zip(group, jobs, strict=True)
            ]
    record_submissions(layout, submitted)
    return submitted


def record_submissions(layout: SweepLayout, new: list[Submission]) -> None:
    """Append ``new`` to ``jobs/jobs.json`` (atomically replaced)."""
    layout.jobs.mkdir(parents=True, exist_ok=True)
    path = layout.jobs / "jobs.json"
    entries = [*(asdict(s) | {"time": time.time()} for s in new)]
    old = json.loads(path.read_text()) if path.is_file() else []
    tmp = path.with_name(f".jobs.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(old + entries, indent=1))
    os.replace(tmp, path)


def submissions(layout: SweepLayout) -> list[Submission]:
    """Every recorded submission, oldest first."""
    path = layout.jobs / "jobs.json"
    if not path.is_file():
        return []
    return [
        Submission(e["worker"], e["job_id"], e["executor"], e.get("scale", 1.0))
        for e in json.loads(path.read_text())
    ]
