"""Where a sweep keeps its files.

::

    SWEEP/
      sweep.yaml          the resolved sweep configuration (marks the directory as a sweep)
      optuna.journal      the Optuna study (JournalStorage, file backend) unless storage is set
      ask.lock            serialises "is a trial left? then take it" among the workers
      trials/NNNN-SLUG/   one training run directory per trial (SLUG: its parameters)
      workers/W.json      worker W's trial in progress (survives a requeue)
      jobs/               submitit's scripts and logs (``%j`` = job id)
      results/            table.csv, table.md, best.yaml, plots/*.png
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hpcdeconv.errors import InputError

#: Trial user attributes written by the worker and read by the monitor and the results.
RUN_DIR = "run_dir"  # str: the trial's training run directory
JOB_ID = "job_id"  # str: the SLURM job (array id_task) or local PID that runs the trial
WORKER = "worker"  # int: the worker index
LOG = "log"  # str: the worker's log file
RETRIES = "retries"  # int: how many earlier attempts of these parameters died
RETRY_OF = "retry_of"  # int: the trial number this one retries
ERROR = "error"  # str: why a failed trial failed (exception line or SLURM end state)
STEPS = "steps"  # int: training steps done
WALL_S = "wall_s"  # float: training wall time over all attempts, seconds
GPU_HOURS = "gpu_hours"  # float: GPUs x wall hours
PRUNED_AT = "pruned_at"  # int: the step at which the pruner stopped the trial
PARAMS = "params"  # dict: the decoded parameter values (YAML-able, lists kept as lists)


@dataclass(frozen=True)
class SweepLayout:
    """Paths of one sweep directory.

    Parameters
    ----------
    root
        The sweep directory.
    """

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "sweep.yaml"

    @property
    def journal(self) -> Path:
        return self.root / "optuna.journal"

    @property
    def ask_lock(self) -> Path:
        return self.root / "ask.lock"

    @property
    def trials(self) -> Path:
        return self.root / "trials"

    @property
    def workers(self) -> Path:
        return self.root / "workers"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    @property
    def results(self) -> Path:
        return self.root / "results"

    def worker_state(self, worker: int) -> Path:
        return self.workers / f"{worker}.json"

    def is_sweep(self) -> bool:
        """Whether ``root`` was made by ``hpcdeconv sweep`` (it holds ``sweep.yaml``)."""
        return self.config.is_file()

    def require(self) -> SweepLayout:
        """This layout, or :class:`InputError` when ``root`` is not a sweep directory."""
        if not self.root.exists():
            raise InputError(f"sweep directory {self.root} does not exist")
        if not self.root.is_dir():
            raise InputError(f"{self.root} is not a sweep directory (it is a file)")
        if not self.is_sweep():
            raise InputError(
                f"{self.root} is not a sweep directory (no sweep.yaml); "
                "start one with hpcdeconv sweep --config SWEEP.yaml"
            )
        return self
