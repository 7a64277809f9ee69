"""One sweep worker: an array task that takes trials and trains them until the budget is spent.

Every worker opens the study in the shared storage and, under a file lock on the sweep
directory, takes the next trial: a waiting one (a grid point, or a retry the monitor
enqueued) or, while the budget lasts, a new one the sampler fills in. It trains the trial
in this process (:func:`~hpcdeconv.training.engine.train`), reports each validation of
the objective metric to Optuna, stops when the pruner says so, and tells the study the
result. A trial that raises is marked failed with its error line and the log's path; the
worker goes on with the next.

The worker is a submitit ``Checkpointable``: on the time-limit signal the trainer writes its
checkpoint and hands the signal to submitit (``train.requeue: submitit``), which requeues the
job with a new call of this worker. The trial in progress is recorded in
``workers/W.json``, so the requeued worker continues it from its checkpoint instead of
asking for another. A trial run by several tasks (DDP/DeepSpeed across the job's tasks):
task 0 asks and tells, the other tasks follow the trial it records.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from submitit.helpers import Checkpointable

from hpcdeconv.config import ExperimentConfig, load_config
from hpcdeconv.errors import ConfigError
from hpcdeconv.sweep import layout as attrs
from hpcdeconv.sweep.config import SweepConfig
from hpcdeconv.sweep.layout import SweepLayout
from hpcdeconv.sweep.space import budget, suggest, trial_config, trial_dir_name
from hpcdeconv.sweep.study import build_sampler, open_study

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

#: How often tasks other than 0 look for the trial task 0 took, seconds.
_FOLLOW_POLL_S = 0.5


def task_rank(env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(rank, number of tasks) of this process in its job step (SLURM), (0, 1) outside."""
    return int(env.get("SLURM_PROCID", "0")), int(env.get("SLURM_NTASKS", "1"))


def job_id(env: Mapping[str, str] = os.environ) -> str:
    """The SLURM job running this worker (``ARRAY_TASK`` form for arrays), or ``pid:N``."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or f"pid:{os.getpid()}"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    # flock: released by the kernel when a holder dies, on NFS mapped to byte-range locks.
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


#: Trials of one multi-task worker take consecutive rendezvous ports, cycling after this many:
#: the previous trial's store may still hold its port.
_PORT_CYCLE = 50


@contextmanager
def _trial_environment(seq: int) -> Iterator[None]:
    """The rendezvous port of trial ``seq`` of this worker, restored afterwards.

    Several tasks (a DDP/DeepSpeed trial): every task sets the same ``MASTER_PORT``, the
    step's SLURM port moved on by ``seq``, so consecutive trials of one job step never meet
    the store of the one before. (What joining a group exports is put back when the
    trial's strategy closes.)
    """
    from hpcdeconv.training.slurm_env import slurm_master_port

    env = os.environ
    saved = env.get("MASTER_PORT")
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env:
        step = int(env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", "0")))
        port = slurm_master_port(int(env["SLURM_JOB_ID"]), step) + seq % _PORT_CYCLE
        env["MASTER_PORT"] = str(port)
    try:
        yield
    finally:
        if saved is None:
            env.pop("MASTER_PORT", None)
        else:
            env["MASTER_PORT"] = saved


def _log_path() -> str:
    """The submitit job's error log (where tracebacks go), or "" outside submitit."""
    if "SUBMITIT_FOLDER" not in os.environ:
        return ""
    import submitit

    return str(submitit.JobEnvironment().paths.stderr)


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _write_json(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


class SweepWorker(Checkpointable):
    """Worker ``worker`` of the sweep in ``sweep_dir``; call it to run trials.

    Parameters
    ----------
    sweep_dir
        The sweep directory (made by ``hpcdeconv sweep``).
    worker
        This worker's index (its array task).
    requeue
        ``train.requeue`` of the trials: ``submitit`` under submitit's SLURM executor,
        ``none`` for local workers.
    """

    def __init__(self, sweep_dir: Path, worker: int, requeue: str = "submitit") -> None:
        self.sweep_dir = Path(sweep_dir)
        self.worker = worker
        self.requeue = requeue

    def __call__(self) -> int:
        """Run trials until none is left; returns how many this worker finished."""
        # This call is the job process's entry point (submitit's runner configures no
        # logging): the job log records trials taken, resumed, pruned and failed.
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
        layout = SweepLayout(self.sweep_dir).require()
        cfg = load_config(SweepConfig, layout.config)
        # DeepSpeed trials compile their ops once for the whole sweep.
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(layout.root / "torch_extensions"))
        layout.workers.mkdir(exist_ok=True)
        rank, tasks = task_rank()
        if rank > 0:
            return self._follow(cfg, layout)
        study = open_study(cfg, layout)
        done = 0
        state = layout.worker_state(self.worker)
        seq = int(_read_json(state).get("seq", 0))
        while (trial := self._next_trial(study, cfg, layout)) is not None:
            seq += 1
            run_dir, params = self._prepare(trial, cfg, layout)
            record = {"trial": trial.number, "seq": seq, "params": params, "run_dir": str(run_dir)}
            _write_json(state, record)
            with _trial_environment(seq):
                finished = self._run(trial, cfg, params, run_dir, tasks)
            if not finished:
                return done  # stopped by a signal: the trial stays RUNNING for the next call
            done += 1
            _write_json(state, {"trial": None, "seq": seq})
        _write_json(state, {"trial": None, "seq": seq, "done": True})
        return done

    # ----------------------------------------------------------------------------------
    def _next_trial(
        self, study: optuna.Study, cfg: SweepConfig, layout: SweepLayout
    ) -> optuna.Trial | None:
        """The trial in progress before a requeue, else a waiting one, else a new one."""
        import optuna
        from optuna.trial import TrialState

        record = _read_json(layout.worker_state(self.worker))
        if record.get("trial") is not None:
            trial = study.get_trials(deepcopy=False)[int(record["trial"])]
            if trial.state == TrialState.RUNNING:
                log.info("worker %d continues trial %d", self.worker, trial.number)
                return optuna.Trial(study, trial._trial_id)
        with _locked(layout.ask_lock):
            trials = study.get_trials(deepcopy=False)
            waiting = any(t.state == TrialState.WAITING for t in trials)
            originals = sum(attrs.RETRY_OF not in t.user_attrs for t in trials)
            if not waiting and originals >= budget(cfg):
                return None
            study.sampler = build_sampler(cfg, trial_seed=len(trials))
            # Pops a waiting trial first (grid point or retry), else starts a new one.
            return study.ask()

    def _prepare(
        self, trial: optuna.Trial, cfg: SweepConfig, layout: SweepLayout
    ) -> tuple[Path, dict[str, Any]]:
        params = suggest(trial, cfg)
        user = trial.user_attrs
        if attrs.RUN_DIR in user:
            run_dir = Path(user[attrs.RUN_DIR])
        else:
            # A retry continues the dead attempt's run directory (and its checkpoint).
            first = int(user.get(attrs.RETRY_OF, trial.number))
            run_dir = layout.trials / trial_dir_name(first, params)
        for key, value in {
            attrs.PARAMS: params,
            attrs.RUN_DIR: str(run_dir),
            attrs.JOB_ID: job_id(),
            attrs.WORKER: self.worker,
            attrs.LOG: _log_path(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }.items():
            trial.set_user_attr(key, value)
        return run_dir, params

    def _run(
        self,
        trial: optuna.Trial,
        cfg: SweepConfig,
        params: dict[str, Any],
        run_dir: Path,
        tasks: int,
    ) -> bool:
        """Train one trial and tell the study; False when a stop signal cut it short."""
        from optuna.trial import TrialState

        from hpcdeconv.training.engine import train

        study = trial.study
        metric = cfg.objective.metric
        started = time.monotonic()

        def report(step: int, scores: Mapping[str, float]) -> bool:
            if metric not in scores:
                raise ConfigError(
                    f"objective metric {metric!r} is not a validation score of this method "
                    f"(it reports {', '.join(sorted(scores))})"
                )
            trial.report(float(scores[metric]), step)
            return trial.should_prune()

        try:
            tc = self._config(cfg, params, run_dir)
            # The run directory is this trial's own (its number is in the name): continued
            # from its checkpoint, or started again when an earlier attempt died before
            # writing one.
            summary = train(tc, resume="auto", overwrite=True, progress=False, on_validation=report)
        except Exception as exc:  # a failed trial must not stop the sweep
            line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self._account(trial, started, None, tasks)
            trial.set_user_attr(attrs.ERROR, f"{type(exc).__name__}: {line}".rstrip(": "))
            study.tell(trial, state=TrialState.FAIL)
            log.error("trial %d failed: %s: %s", trial.number, type(exc).__name__, line)
            return True
        if summary.stopped_at is not None:
            self._account(trial, started, summary.stopped_at, tasks)
            return False
        if summary.pruned_at is not None:
            self._account(trial, started, summary.pruned_at, tasks)
            trial.set_user_attr(attrs.PRUNED_AT, summary.pruned_at)
            study.tell(trial, state=TrialState.PRUNED)
            log.info("trial %d pruned at step %d", trial.number, summary.pruned_at)
            return True
        self._account(trial, started, summary.steps, tasks)
        value = objective_value(study, trial, cfg)
        if value is None:
            trial.set_user_attr(attrs.ERROR, f"no validation reported {metric!r}")
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, value)
            log.info("trial %d: %s = %.4g", trial.number, metric, value)
        return True

    def _config(self, cfg: SweepConfig, params: dict[str, Any], run_dir: Path) -> ExperimentConfig:
        tc = trial_config(cfg, params, run_dir)
        # Under submitit the trainer checkpoints on the time-limit signal and submitit
        # requeues; never both (train.requeue).
        return tc.model_copy(
            update={"train": tc.train.model_copy(update={"requeue": self.requeue})}
        )

    def _account(self, trial: optuna.Trial, started: float, steps: int | None, tasks: int) -> None:
        """Add this attempt's wall time and GPU-hours to the trial's totals."""
        user = trial.study.get_trials(deepcopy=False)[trial.number].user_attrs
        wall = float(user.get(attrs.WALL_S, 0.0)) + time.monotonic() - started
        trial.set_user_attr(attrs.WALL_S, wall)
        gpu_s = (time.monotonic() - started) * _visible_gpus() * tasks
        trial.set_user_attr(attrs.GPU_HOURS, float(user.get(attrs.GPU_HOURS, 0.0)) + gpu_s / 3600)
        if steps is not None:
            trial.set_user_attr(attrs.STEPS, steps)

    # ----------------------------------------------------------------------------------
    def _follow(self, cfg: SweepConfig, layout: SweepLayout) -> int:
        """Tasks other than 0 of a multi-task trial: train whatever trial task 0 records."""
        from hpcdeconv.training.engine import train

        state, seen, done = layout.worker_state(self.worker), 0, 0
        while True:
            record = _read_json(state)
            if record.get("done"):
                return done
            seq = int(record.get("seq", 0))
            if record.get("trial") is None or seq == seen:
                time.sleep(_FOLLOW_POLL_S)
                continue
            seen = seq
            tc = self._config(cfg, record["params"], Path(record["run_dir"]))
            try:
                # A hook on every rank: the pruning verdict is a collective (task 0 decides).
                with _trial_environment(seq):
                    train(
                        tc,
                        resume="auto",
                        overwrite=True,
                        progress=False,
                        on_validation=lambda *_: False,
                    )
            except Exception:  # task 0 records the error
                log.exception("trial %s failed on this task", record["trial"])
            done += 1


def objective_value(study: optuna.Study, trial: optuna.Trial, cfg: SweepConfig) -> float | None:
    """The trial's objective from its reported validations: the best or the last one."""
    frozen = study.get_trials(deepcopy=False)[trial.number]
    values = frozen.intermediate_values
    if not values:
        return None
    if cfg.objective.value == "final":
        return values[max(values)]
    pick = max if cfg.objective.direction == "maximize" else min
    return pick(values.values())
