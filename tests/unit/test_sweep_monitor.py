"""The sweep monitor without a cluster: a RUNNING trial whose (local) worker process is gone is
failed and retried from its run directory, up to the retry limit; a worker that ended out of
memory is resubmitted with more memory and time."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcdeconv.config import dump_config, load_config
from hpcdeconv.sweep import layout as attrs
from hpcdeconv.sweep.config import SweepConfig
from hpcdeconv.sweep.layout import SweepLayout
from hpcdeconv.sweep.monitor import dead_trials, live_workers, retry_dead
from hpcdeconv.sweep.results import collect
from hpcdeconv.sweep.study import open_study
from hpcdeconv.sweep.submit import Submission, job_parameters, record_submissions


def make_sweep(tmp_path: Path, max_retries: int = 2):
    overrides = [
        f"output={tmp_path / 'sweep'}",
        "parameters={optim.lr: {values: [0.0001]}}",
        "search={sampler: grid}",
        f"executor={{kind: local, workers: 1, max_retries: {max_retries}, time_min: 10, "
        "mem_gb: 2.0}",
    ]
    cfg = load_config(SweepConfig, None, overrides)
    layout = SweepLayout(cfg.output)
    layout.root.mkdir()
    dump_config(cfg, layout.config)
    return cfg, layout, open_study(cfg, layout, create=True)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def running_trial(study, pid: int, run_dir: Path) -> int:
    trial = study.ask()
    trial.suggest_categorical("optim.lr", ["0.0001"])
    for key, value in {
        attrs.JOB_ID: f"pid:{pid}",
        attrs.WORKER: 0,
        attrs.RUN_DIR: str(run_dir),
        attrs.PARAMS: {"optim.lr": 0.0001},
    }.items():
        trial.set_user_attr(key, value)
    return trial.number


def test_dead_local_worker_fails_its_trial_and_enqueues_a_retry(tmp_path: Path) -> None:
    cfg, layout, study = make_sweep(tmp_path)
    run_dir = layout.trials / "0000-lr=0.0001"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 2, "kind": "val", "psnr": 21.5}\n')
    number = running_trial(study, dead_pid(), run_dir)
    # The worker record says the dead job was worker 0's latest; it is not replaced here
    # because it was "local" and would start a real worker: give it a live twin instead.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record_submissions(layout, [Submission(0, f"pid:{sleeper.pid}", "local")])
        assert [d.number for d in dead_trials(study)] == [number]
        dead = retry_dead(study, cfg, layout)
        assert [(d.number, d.end) for d in dead] == [(number, "FAILED")]
        trials = study.get_trials()
        assert trials[number].state.name == "FAIL"
        assert "without reporting" in trials[number].user_attrs[attrs.ERROR]
        retry = trials[-1]
        assert retry.state.name == "WAITING"
        assert retry.user_attrs[attrs.RETRY_OF] == number
        assert retry.user_attrs[attrs.RETRIES] == 1
        assert retry.user_attrs[attrs.RUN_DIR] == str(run_dir)
        assert retry.system_attrs["fixed_params"] == {"optim.lr": "0.0001"}
        # The table shows the queued retry with its (decoded) parameters.
        rows = collect(
            layout,
            study,
            metric="psnr",
            direction="maximize",
            value="best",
            param_names=["optim.lr"],
        ).rows
        assert {(r.number, r.state, r.params["optim.lr"], r.best) for r in rows} == {
            # The run directory's metrics belong to the retry that continues it.
            (number, "FAIL", 0.0001, None),
            (retry.number, "WAITING", 0.0001, 21.5),
        }
        # The live worker was not replaced.
        assert [s.job_id for s in live_workers(layout)] == [f"pid:{sleeper.pid}"]
        assert dead_trials(study) == []
    finally:
        sleeper.kill()


def test_no_retry_past_the_limit(tmp_path: Path) -> None:
    cfg, layout, study = make_sweep(tmp_path, max_retries=0)
    running_trial(study, dead_pid(), layout.trials / "t")
    retry_dead(study, cfg, layout)
    states = [t.state.name for t in study.get_trials()]
    assert states == ["FAIL"]


def test_out_of_memory_worker_comes_back_with_more(tmp_path: Path) -> None:
    cfg, layout, study = make_sweep(tmp_path)
    # The budget is spent, so the resubmitted local worker finds nothing and exits.
    trial = study.ask()
    study.tell(trial, 1.0)
    record_submissions(layout, [Submission(0, "pid:1", "local")])
    from hpcdeconv.sweep.monitor import replace_ended_workers

    replace_ended_workers(cfg, layout, {"pid:1": "OUT_OF_MEMORY"})
    jobs = json.loads((layout.jobs / "jobs.json").read_text())
    assert [(j["worker"], j["scale"]) for j in jobs] == [(0, 1.0), (0, 2.0)]
    deadline = time.monotonic() + 60
    while live_workers(layout) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert live_workers(layout) == []


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_job_parameters_scale_memory_and_time(scale: float, tmp_path: Path) -> None:
    cfg, _, _ = make_sweep(tmp_path)
    params = job_parameters(cfg.executor, scale)
    assert params["mem_gb"] == 2.0 * scale and params["timeout_min"] == round(10 * scale)
    assert params["slurm_additional_parameters"] == {"requeue": True}


def test_sqlite_storage_instead_of_the_journal(tmp_path: Path) -> None:
    """``storage:`` names a database URL (here SQLite) in place of the journal file."""
    from hpcdeconv.errors import ConfigError

    cfg, layout, _ = make_sweep(tmp_path)
    db = cfg.model_copy(update={"storage": f"sqlite:///{tmp_path / 'optuna.db'}"})
    study = open_study(db, layout, create=True)
    study.tell(study.ask(), 2.5)
    again = open_study(db, layout)
    assert [t.value for t in again.get_trials()] == [2.5]
    assert (tmp_path / "optuna.db").is_file()
    bad = cfg.model_copy(update={"storage": "nosuchdb://x"})
    with pytest.raises(ConfigError, match="storage 'nosuchdb://x' cannot be opened"):
        open_study(bad, layout)
