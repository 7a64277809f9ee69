"""Hyperparameter sweeps on the dev SLURM (slurm/dev): a grid submitted as job arrays split at
MaxArraySize, the results table and best config, the same trials from local workers, a
preempted trial requeued by submitit and finished from its checkpoint, a failing trial
reported while the others succeed, and a SIGKILLed trial found from sacct and retried."""

from __future__ import annotations

import csv
import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from tests.conftest import TINY_TRAINING

if TYPE_CHECKING:
    from conftest import SlurmCluster

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "data" / "sweep_submission.sh"


def hpcdeconv() -> list[str]:
    script = Path(sys.executable).with_name("hpcdeconv")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "hpcdeconv.cli"]


def sweep_yaml(
    tmp_path: Path,
    data: Path,
    parameters: dict[str, Any],
    *,
    steps: int = 4,
    executor: dict[str, Any] | None = None,
    name: str = "sweep",
    extra: list[str] = (),  # type: ignore[assignment]
) -> Path:
    """A sweep of tiny supervised trainings (validation every 2 steps) over ``parameters``."""
    overrides = [
        "method.name=supervised",
        *TINY_TRAINING,
        f"data.path={data}",
        f"train.steps={steps}",
        "train.val_every=2",
        "train.val_crop=[16, 16, 16]",
        "train.image_every=1000",
        "train.ckpt_every=1000",
        *extra,
    ]
    doc = {
        "overrides": overrides,
        "parameters": parameters,
        "search": {"sampler": "grid"},
        "objective": {"metric": "psnr", "direction": "maximize"},
        "executor": {"kind": "slurm", "workers": 2, "time_min": 10, "mem_gb": 1.0}
        | (executor or {}),
        "output": str(tmp_path / name),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_sweep(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 420):
    env = env | {"PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}
    return subprocess.run(
        [*hpcdeconv(), "sweep", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sweep_while(
    config: Path, env: dict[str, str], cwd: Path, act: Callable[[], None], timeout: float = 400
) -> tuple[int, str]:
    """Run ``hpcdeconv sweep --config`` in the background, ``act`` meanwhile, then wait for
    the sweep; returns its exit status and standard error (it is killed if anything fails)."""
    sweeping = subprocess.Popen(
        [*hpcdeconv(), "sweep", "--config", str(config), "--poll", "1"],
        env=env | {"PATH": f"{Path(sys.executable).parent}:{env['PATH']}"},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        act()
        _out, err = sweeping.communicate(timeout=timeout)
    finally:
        sweeping.kill()
    return sweeping.returncode, err


def table(sweep: Path) -> list[dict[str, str]]:
    with (sweep / "results" / "table.csv").open() as fh:
        return list(csv.DictReader(fh))


def study_of(sweep: Path):
    from hpcdeconv.commands.sweep import _open
    from hpcdeconv.sweep.layout import SweepLayout

    return _open(SweepLayout(sweep))[1]


GRID = {"optim.lr": {"values": [0.0001, 0.001]}, "method.generator.channels": {"values": [2, 4]}}


@pytest.mark.slurm
@pytest.mark.distributed
def test_grid_as_split_arrays_table_best_config_and_local_twin(
    slurm_cluster: SlurmCluster, tiny_dataset: Path, tmp_path: Path
) -> None:
    # Three workers, arrays of at most two tasks: an array of two and a job of one.
    config = sweep_yaml(
        tmp_path,
        tiny_dataset,
        GRID,
        executor={"workers": 3, "max_array_size": 2, "parallelism": 2},
    )
    proc = run_sweep(["--config", str(config), "--poll", "1"], slurm_cluster.env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "sweep"
    rows = table(sweep)
    assert len(rows) == 4 and {r["state"] for r in rows} == {"COMPLETE"}
    values = [float(r["objective"]) for r in rows]
    assert values == sorted(values, reverse=True) and all(v == v for v in values)
    params = {(float(r["optim.lr"]), int(r["method.generator.channels"])) for r in rows}
    assert params == {(1e-4, 2), (1e-4, 4), (1e-3, 2), (1e-3, 4)}
    # Split: workers 0 and 1 are tasks 0 and 1 of one array, worker 2 a job of its own.
    jobs = yaml.safe_load((sweep / "jobs" / "jobs.json").read_text())
    ids = [j["job_id"] for j in sorted(jobs, key=lambda j: j["worker"])]
    array = ids[0].split("_")[0]
    assert ids[:2] == [f"{array}_0", f"{array}_1"] and "_" not in ids[2] and ids[2] != array
    # submitit's script for the array, golden (paths and ids normalised).
    scripts = [p.read_text() for p in (sweep / "jobs").rglob("*_submission.sh")]
    script = next(s for s in scripts if "--array" in s)
    assert normalise(script, sweep) == GOLDEN.read_text()
    # The best config trains as it is.
    best = sweep / "results" / "best.yaml"
    run = tmp_path / "best-run"
    train = subprocess.run(
        [*hpcdeconv(), "train", "--config", str(best), "--output", str(run)],
        env=slurm_cluster.env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert train.returncode == 0, train.stderr[-2000:]
    assert "trained supervised for 4 steps" in train.stdout
    best_row = rows[0]
    trained = yaml.safe_load((run / "config.yaml").read_text())
    assert trained["optim"]["lr"] == float(best_row["optim.lr"])
    # The same grid from local workers: the same trials.
    local = run_sweep(
        [
            "--config",
            str(config),
            "--executor",
            "local",
            "--set",
            f"output={tmp_path / 'local'}",
            "--poll",
            "1",
        ],
        slurm_cluster.env,
        tmp_path,
    )
    assert local.returncode == 0, local.stderr[-3000:]
    local_rows = table(tmp_path / "local")
    assert {
        (float(r["optim.lr"]), int(r["method.generator.channels"])) for r in local_rows
    } == params
    assert {r["state"] for r in local_rows} == {"COMPLETE"}


def normalise(script: str, sweep: Path) -> str:
    """submitit's sbatch script with this run's paths replaced by placeholders."""
    return script.replace(str(sweep), "SWEEP").replace(sys.executable, "PYTHON")


@pytest.mark.slurm
@pytest.mark.distributed
def test_preempted_trial_is_requeued_by_submitit_and_finishes_from_its_checkpoint(
    slurm_cluster: SlurmCluster, tiny_dataset: Path, tmp_path: Path
) -> None:
    steps = 400  # long enough (~10 s) to be signalled mid-run on a loaded machine
    config = sweep_yaml(
        tmp_path,
        tiny_dataset,
        {"optim.lr": {"values": [0.0001]}},
        steps=steps,
        executor={"workers": 1},
        extra=["train.val_every=200"],
    )
    sweep = tmp_path / "sweep"

    def preempt() -> None:
        job = wait_for_training(sweep, min_step=5)
        # What the time limit does: submitit's USR2 to the job's tasks.
        slurm_cluster.run("scancel", "--signal=USR2", job)
        slurm_cluster.wait_until_gone(job)

    code, err = sweep_while(config, slurm_cluster.env, tmp_path, preempt)
    assert code == 0, err[-3000:]
    rows = table(sweep)
    assert [r["state"] for r in rows] == ["COMPLETE"] and int(rows[0]["steps"]) == steps
    log = "".join(p.read_text() for p in (sweep / "jobs").rglob("*_log.err"))
    stopped = re.findall(r"stop signal: checkpoint at step (\d+) written", log)
    resumed = re.findall(r"resumed \S+ at step (\d+)", log)
    # One stop, one resume at that very step: every step trained once.
    assert len(stopped) == 1 and resumed == stopped, log[-3000:]
    assert "Requeued job" in log


def wait_for_training(sweep: Path, min_step: int, timeout: float = 240) -> str:
    """The job id of the first trial once its metrics.jsonl logged ``min_step``."""
    from hpcdeconv.sweep import layout as attrs

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in (sweep / "trials").glob("*") if (sweep / "trials").is_dir() else []:
            metrics = run / "metrics.jsonl"
            if metrics.is_file() and metrics.read_text().count('"kind": "train"') >= min_step:
                trial = next(
                    t
                    for t in study_of(sweep).get_trials()
                    if t.user_attrs.get(attrs.RUN_DIR) == str(run)
                )
                return str(trial.user_attrs[attrs.JOB_ID])
        time.sleep(0.5)
    raise AssertionError("no trial started training")


@pytest.mark.slurm
@pytest.mark.distributed
def test_failing_trial_reported_and_killed_trial_retried(
    slurm_cluster: SlurmCluster, tiny_dataset: Path, tmp_path: Path
) -> None:
    from hpcdeconv.sweep import layout as attrs

    # best_metric "sharpness" is no score of the method: that trial raises at its start.
    parameters = {"train.best_metric": {"values": ["psnr", "sharpness"]}}
    config = sweep_yaml(
        tmp_path,
        tiny_dataset,
        parameters,
        steps=400,
        executor={"workers": 1},
        extra=["train.val_every=200"],
    )
    sweep = tmp_path / "sweep"

    def kill_the_training_trial() -> None:
        wait_for_training(sweep, min_step=3)
        victim = next(t for t in study_of(sweep).get_trials() if t.state.name == "RUNNING")
        # The out-of-memory killer's way: SIGKILL, no chance to report.
        os.kill(int(victim.user_attrs["pid"]), signal.SIGKILL)

    code, err = sweep_while(config, slurm_cluster.env, tmp_path, kill_the_training_trial)
    assert code == 0, err[-3000:]
    trials = study_of(sweep).get_trials()
    # Every trial ran (a retry gets its parameters when a worker takes it).
    seen = [(t.number, t.state.name, t.user_attrs) for t in trials]
    assert all(attrs.PARAMS in t.user_attrs for t in trials), (seen, err[-3000:])
    by_metric: dict[str, list[Any]] = {}
    for t in trials:
        by_metric.setdefault(t.user_attrs[attrs.PARAMS]["train.best_metric"], []).append(t)
    failed = by_metric["sharpness"]
    assert [t.state.name for t in failed] == ["FAIL"]
    assert "sharpness" in failed[0].user_attrs[attrs.ERROR]
    good = sorted(by_metric["psnr"], key=lambda t: t.number)
    assert [t.state.name for t in good] == ["FAIL", "COMPLETE"]
    assert "without reporting" in good[0].user_attrs[attrs.ERROR]
    assert good[1].user_attrs[attrs.RETRY_OF] == good[0].number
    assert good[1].user_attrs[attrs.RETRIES] == 1
    # The retry continued the dead attempt's run directory.
    assert good[1].user_attrs[attrs.RUN_DIR] == good[0].user_attrs[attrs.RUN_DIR]
    rows = table(sweep)
    assert {r["state"] for r in rows} == {"COMPLETE", "FAIL"}


@contextmanager
def holding_ask_lock(sweep: Path, timeout: float = 60) -> Iterator[None]:
    """Hold the lock workers take a trial under, from the moment the sweep directory exists:
    a worker started meanwhile can only die holding no trial."""
    deadline = time.monotonic() + timeout
    while not (sweep / "optuna.journal").exists():
        assert time.monotonic() < deadline, "the sweep directory never appeared"
        time.sleep(0.02)
    with (sweep / "ask.lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def kill_worker_before_its_trial(sweep: Path, timeout: float = 120) -> None:
    """SIGKILL the first worker's Python process (not srun, whose command line names the
    same module) once it runs, while :func:`holding_ask_lock` keeps it from any trial."""
    with holding_ask_lock(sweep):
        kill_worker_process(sweep, timeout)


def kill_worker_process(sweep: Path, timeout: float) -> None:
    """SIGKILL the first worker's Python process once it runs."""
    pattern = rf"^\S*python\S* -u -m submitit\.core\._submit {re.escape(str(sweep))}/jobs"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
        if pids := found.stdout.split():
            os.kill(int(pids[0]), signal.SIGKILL)
            return
        time.sleep(0.2)
    raise AssertionError("the worker never started")


@pytest.mark.slurm
@pytest.mark.distributed
def test_worker_killed_before_taking_a_trial_is_replaced(
    slurm_cluster: SlurmCluster, tiny_dataset: Path, tmp_path: Path
) -> None:
    # The CI failure this replays: a worker job died holding no trial, so nothing RUNNING
    # was left for the monitor to retry; the sweep returned 0 with the trial never run.
    config = sweep_yaml(
        tmp_path, tiny_dataset, {"optim.lr": {"values": [0.001]}}, executor={"workers": 1}
    )
    sweep = tmp_path / "sweep"
    act = partial(kill_worker_before_its_trial, sweep)
    code, err = sweep_while(config, slurm_cluster.env, tmp_path, act)
    assert code == 0, err[-3000:]
    assert re.search(r"worker 0: job \S+ ended FAILED without a trial; resubmitted", err), err
    jobs = yaml.safe_load((sweep / "jobs" / "jobs.json").read_text())
    assert [j["worker"] for j in jobs] == [0, 0]
    rows = table(sweep)
    assert [r["state"] for r in rows] == ["COMPLETE"]


def test_sweep_left_unfinished_exits_1_and_names_the_resume(
    tiny_dataset: Path, tmp_path: Path, launch_env: dict[str, str]
) -> None:
    # No retries: the local worker killed before its trial is not replaced, and the command
    # says so in one line with a non-zero status (it returned 0 with the trial never run).
    config = sweep_yaml(
        tmp_path,
        tiny_dataset,
        {"optim.lr": {"values": [0.001]}},
        executor={"kind": "local", "workers": 1, "max_retries": 0},
    )
    sweep = tmp_path / "sweep"
    act = partial(kill_worker_before_its_trial, sweep)
    code, err = sweep_while(config, launch_env, tmp_path, act, timeout=300)
    assert code == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last == (
        f"hpcdeconv sweep: error: 1 trial(s) left and no worker running; "
        f"continue with: hpcdeconv sweep --resume {sweep}"
    )
    assert [t.state.name for t in study_of(sweep).get_trials()] == ["WAITING"]
    assert (sweep / "results" / "table.csv").is_file()


@pytest.mark.slurm
@pytest.mark.distributed
def test_trial_as_a_two_task_ddp_run(
    slurm_cluster: SlurmCluster, tiny_dataset: Path, tmp_path: Path
) -> None:
    # Each trial is one DDP run over the job's two tasks: task 0 asks and tells, task 1
    # follows; two trials in turn in one job (the process group is made and left twice).
    config = sweep_yaml(
        tmp_path,
        tiny_dataset,
        {"optim.lr": {"values": [0.0001, 0.001]}},
        executor={"workers": 1, "tasks_per_node": 2},
        extra=["strategy.name=ddp", "strategy.backend=gloo", "data.batch_size=2"],
    )
    proc = run_sweep(["--config", str(config), "--poll", "1"], slurm_cluster.env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "sweep"
    rows = table(sweep)
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE"]
    for row in rows:
        config_yaml = yaml.safe_load((Path(row["run_dir"]) / "config.yaml").read_text())
        assert config_yaml["strategy"]["name"] == "ddp"
    log = "".join(p.read_text() for p in (sweep / "jobs").rglob("*_log.err"))
    # Both tasks joined a process group of two for each trial, on a port of its own.
    ports = re.findall(r"rank [01]/2 joined the gloo process group at \S+:(\d+)", log)
    assert len(ports) == 4 and len(set(ports)) == 2, log[-2000:]
