"""``hpcdeconv sweep`` without a cluster: refused input (one line, nothing made), the dry run,
the budget and the pruners on a deterministic toy objective, local workers end to end."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from hpcdeconv.config import ExperimentConfig, load_config
from hpcdeconv.sweep.config import PrunerConfig
from hpcdeconv.sweep.study import build_pruner
from tests.conftest import TINY_TRAINING, assert_one_line_error, run_cli


def write_sweep(tmp_path: Path, **fields: Any) -> Path:
    doc = {
        "overrides": ["method.name=supervised", "train.steps=4"],
        "parameters": {"optim.lr": {"values": [0.0001, 0.001]}},
        "search": {"sampler": "grid"},
        "executor": {"kind": "local", "workers": 1},
        "output": str(tmp_path / "sweep"),
    } | fields
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"parameters": {"optim.lrr": {"values": [1]}}}, "did you mean 'optim.lr'"),
        ({"parameters": {"optim.lr": {"values": []}}}, "optim.lr"),
        ({"search": {"sampler": "random", "trials": 0}}, "trials"),
        ({"search": {"sampler": "random"}}, "trials"),
        ({"parameters": {}}, "parameters"),
    ],
)
def test_bad_sweep_is_one_line_and_makes_nothing(
    fields: dict[str, Any], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_sweep(tmp_path, **fields)
    code, _, err = run_cli(["sweep", "--config", str(config)], capsys)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "sweep").exists()


def test_unreachable_slurm_hints_at_local(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A PATH on which no SLURM client exists.
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    config = write_sweep(tmp_path, executor={"kind": "slurm"})
    code, _, err = run_cli(["sweep", "--config", str(config)], capsys)
    assert_one_line_error(code, err, "--executor local")
    assert not (tmp_path / "sweep").exists()


def test_resume_and_collect_of_a_non_sweep_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "keep.txt").write_text("data")
    for verb in ("--resume", "--collect"):
        code, _, err = run_cli(["sweep", verb, str(plain)], capsys)
        assert_one_line_error(code, err, "not a sweep directory")
    assert sorted(p.name for p in plain.iterdir()) == ["keep.txt"]
    assert (plain / "keep.txt").read_text() == "data"


def test_resume_and_collect_take_no_other_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_sweep(tmp_path)
    sweep = str(tmp_path / "sweep")
    for argv, fragment in [
        (["--resume", sweep, "--dry-run"], "--dry-run cannot be combined"),
        (["--collect", sweep, "--config", str(config)], "--config cannot be combined"),
        (["--collect", sweep, "--executor", "local"], "--executor cannot be combined"),
        (["--resume", sweep, "--set", "search.seed=1"], "--set cannot be combined"),
    ]:
        code, _, err = run_cli(["sweep", *argv], capsys)
        assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "sweep").exists()


def test_concurrent_workers_draw_different_parameters(tmp_path: Path) -> None:
    """Two workers asking at once (each its own study object, as in two processes) must not
    draw the same random parameters; a requeued worker must not repeat its draws either."""
    from hpcdeconv.commands.sweep import _open
    from hpcdeconv.config import dump_config, load_config
    from hpcdeconv.sweep.config import SweepConfig
    from hpcdeconv.sweep.layout import SweepLayout
    from hpcdeconv.sweep.space import suggest
    from hpcdeconv.sweep.study import open_study
    from hpcdeconv.sweep.worker import SweepWorker

    for sampler in ("random", "tpe"):
        cfg = load_config(
            SweepConfig,
            write_sweep(
                tmp_path,
                parameters={"optim.lr": {"low": 1e-5, "high": 1e-2, "log": True}},
                search={"sampler": sampler, "trials": 4, "seed": 0},
                output=str(tmp_path / sampler),
            ),
        )
        layout = SweepLayout(cfg.output)
        layout.root.mkdir()
        dump_config(cfg, layout.config)
        open_study(cfg, layout, create=True)
        drawn = []
        for worker in (0, 1, 0, 1):
            study = _open(layout)[1]
            trial = SweepWorker(layout.root, worker)._next_trial(study, cfg, layout)
            assert trial is not None
            drawn.append(suggest(trial, cfg)["optim.lr"])
        assert len(set(drawn)) == 4, (sampler, drawn)
        assert SweepWorker(layout.root, 0)._next_trial(_open(layout)[1], cfg, layout) is None


def test_dry_run_lists_grid_trials_and_job_parameters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_sweep(
        tmp_path,
        parameters={
            "optim.lr": {"values": [0.0001, 0.001]},
            "data.patch": {"values": [[16, 16, 16], [32, 32, 32]]},
        },
        executor={"kind": "slurm", "workers": 3, "partition": "gpu", "gpus_per_task": 1},
    )
    code, out, err = run_cli(["sweep", "--config", str(config), "--dry-run"], capsys)
    assert code == 0, err
    assert out.count("optim.lr") >= 4 and "[32, 32, 32]" in out
    assert "gpu" in out and "gpus_per_node" in out
    assert not (tmp_path / "sweep").exists()


def toy_curve(trial: optuna.Trial, slope: float, pruned: list[int]) -> float:
    """Deterministic validation curve: value = slope * step, reported at steps 1..9."""
    value = 0.0
    for step in range(1, 10):
        value = slope * step
        trial.report(value, step)
        if trial.should_prune():
            pruned.append(trial.number)
            raise optuna.TrialPruned()
    return value


@pytest.mark.parametrize("kind", ["successive_halving", "hyperband"])
def test_pruner_stops_the_clearly_worse_trial(kind: str) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        # Hyperband assigns trials to brackets by a hash of the study name: fixed here.
        study_name="toy",
        direction="maximize",
        pruner=build_pruner(PrunerConfig(kind=kind, min_resource=1, reduction_factor=2)),
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    pruned: list[int] = []
    good = [1.0, 1.1, 1.2, 0.9, 1.05, 0.95, 1.15, 1.0]
    for slope in [*good, -5.0, -5.0, -5.0, -5.0]:
        study.optimize(lambda t, s=slope: toy_curve(t, s, pruned), n_trials=1)
    # Every clearly worse trial is stopped; the first trial, with nothing to compare, is not.
    assert {8, 9, 10, 11} <= set(pruned)
    states = [t.state.name for t in study.get_trials()]
    assert states[0] == "COMPLETE" and states[8:] == ["PRUNED"] * 4


def test_no_pruner_prunes_nothing() -> None:
    study = optuna.create_study(direction="maximize", pruner=build_pruner(PrunerConfig()))
    pruned: list[int] = []
    for slope in (1.0, -5.0):
        study.optimize(lambda t, s=slope: toy_curve(t, s, pruned), n_trials=1)
    assert pruned == []


def test_local_grid_sweep_end_to_end(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = [
        "method.name=supervised",
        *TINY_TRAINING,
        f"data.path={tiny_dataset}",
        "train.steps=2",
        "train.val_every=2",
        "train.val_crop=[16, 16, 16]",
    ]
    config = write_sweep(tmp_path, overrides=overrides)
    code, out, err = run_cli(["sweep", "--config", str(config), "--poll", "0.5"], capsys)
    assert code == 0, err
    with (tmp_path / "sweep" / "results" / "table.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE"]
    assert {float(r["optim.lr"]) for r in rows} == {1e-4, 1e-3}
    assert all(r["log"].endswith("_log.err") and Path(r["log"]).is_file() for r in rows)
    # The best config trains on its own like any training: it requeues itself.
    best = load_config(ExperimentConfig, tmp_path / "sweep" / "results" / "best.yaml")
    assert best.train.requeue == "trainer"
    # A second start on the same directory is refused: resume it instead.
    code, _, err = run_cli(["sweep", "--config", str(config)], capsys)
    assert_one_line_error(code, err, "--resume")
    code, out, err = run_cli(["sweep", "--resume", str(tmp_path / "sweep")], capsys)
    assert code == 0, err
    assert "0 trial(s) left" in out
