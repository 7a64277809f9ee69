"""Collecting a sweep: real Optuna studies in a journal file, real run directories (resolved
``config.yaml``, ``metrics.jsonl``) with trials complete, pruned, failed, running and
without a run directory; the ranked table (CSV, Markdown), ``best.yaml`` and the plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from hpcdeconv.config import ExperimentConfig, build_config, dump_config, load_config
from hpcdeconv.config.loading import parse_overrides
from hpcdeconv.errors import ConfigError
from hpcdeconv.sweep import layout as attrs
from hpcdeconv.sweep.layout import SweepLayout
from hpcdeconv.sweep.plots import objective_vs_param, write_plots
from hpcdeconv.sweep.results import collect

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PARAMS = ["optim.lr", "method.kernel.size"]
KERNELS = {"[5, 5, 5]": [5, 5, 5], "[9, 9, 9]": [9, 9, 9]}

#: number -> (state, lr, kernel, validation psnr by step, extra user attributes)
TRIALS: dict[int, dict[str, Any]] = {
    0: {
        "state": TrialState.COMPLETE,
        "lr": 1e-4,
        "kernel": "[5, 5, 5]",
        "val": {100: 20.0, 200: 24.5, 300: 23.0},
        "attrs": {attrs.STEPS: 300, attrs.WALL_S: 12.5, attrs.GPU_HOURS: 0.0035, attrs.RETRIES: 1},
    },
    1: {
        "state": TrialState.COMPLETE,
        "lr": 1e-3,
        "kernel": "[9, 9, 9]",
        "val": {100: 21.0, 200: 26.25, 300: 25.5},
        "attrs": {attrs.STEPS: 300, attrs.WALL_S: 11.0, attrs.GPU_HOURS: 0.003},
    },
    2: {
        "state": TrialState.PRUNED,
        "lr": 1e-2,
        "kernel": "[5, 5, 5]",
        "val": {100: 15.0, 200: 16.0},
        "attrs": {attrs.PRUNED_AT: 200},
    },
    3: {
        "state": TrialState.FAIL,
        "lr": 3e-5,
        "kernel": "[9, 9, 9]",
        "val": {100: 18.0},
        "attrs": {attrs.ERROR: "RuntimeError: loss is nan | see the log"},
    },
    4: {"state": TrialState.RUNNING, "lr": 5e-4, "kernel": "[5, 5, 5]", "val": {100: 22.0}},
    # Running, its run directory not created yet.
    5: {"state": TrialState.RUNNING, "lr": 2e-4, "kernel": "[9, 9, 9]", "val": None},
    # Died before it had a run directory at all.
    6: {
        "state": TrialState.FAIL,
        "lr": 7e-4,
        "kernel": "[5, 5, 5]",
        "val": None,
        "no_run_dir": True,
        "attrs": {attrs.ERROR: "OUT_OF_MEMORY"},
    },
}


def _pick(values: list[float], direction: str) -> float:
    return max(values) if direction == "maximize" else min(values)


def _write_run(run_dir: Path, spec: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True)
    cfg = build_config(
        ExperimentConfig,
        parse_overrides(
            [f"optim.lr={spec['lr']}", f"method.kernel.size={spec['kernel']}", f"output={run_dir}"]
        ),
    )
    dump_config(cfg, run_dir / "config.yaml")
    lines = []
    last = max(spec["val"])
    for step in range(10, last + 1, 10):
        lines.append(json.dumps({"step": step, "kind": "train", "loss_g": 1.0 / step}))
        if step in spec["val"]:
            record = {"step": step, "kind": "val", "psnr": spec["val"][step], "ssim": 0.5}
            lines.append(json.dumps(record))
            # Other validation kinds must not count towards the objective.
            lines.append(json.dumps({"step": step, "kind": "val_ema", "psnr": 99.0}))
    text = "\n".join(lines) + "\n"
    if spec["state"] == TrialState.RUNNING:
        text += '{"step": 11'  # a line the training is writing right now
    (run_dir / "metrics.jsonl").write_text(text)


def make_sweep(root: Path, direction: str, trials: dict[int, dict[str, Any]]) -> SweepLayout:
    """A sweep directory whose study holds ``trials``, made as the workers make them."""
    layout = SweepLayout(root)
    layout.trials.mkdir(parents=True)
    layout.config.write_text("parameters: {}\n")
    storage = JournalStorage(JournalFileBackend(str(layout.journal)))
    study = optuna.create_study(storage=storage, study_name="sweep", direction=direction)
    for number, spec in sorted(trials.items()):
        study.enqueue_trial({"optim.lr": spec["lr"], "method.kernel.size": spec["kernel"]})
        trial = study.ask()
        assert trial.number == number
        trial.suggest_float("optim.lr", 1e-5, 1e-1, log=True)
        trial.suggest_categorical("method.kernel.size", list(KERNELS))
        run_dir = layout.trials / f"{number:04d}-lr{spec['lr']}"
        decoded = {"optim.lr": spec["lr"], "method.kernel.size": KERNELS[spec["kernel"]]}
        trial.set_user_attr(attrs.PARAMS, decoded)
        if not spec.get("no_run_dir"):
            trial.set_user_attr(attrs.RUN_DIR, str(run_dir))
        for key, value in spec.get("attrs", {}).items():
            trial.set_user_attr(key, value)
        if spec["val"] is not None:
            _write_run(run_dir, spec)
            for step, value in sorted(spec["val"].items()):
                trial.report(value, step)
        if spec["state"] == TrialState.COMPLETE:
            study.tell(trial, _pick(list(spec["val"].values()), direction))
        elif spec["state"] != TrialState.RUNNING:
            study.tell(trial, state=spec["state"])
    return layout


def load(layout: SweepLayout) -> optuna.Study:
    """The study as a collector in another process opens it."""
    storage = JournalStorage(JournalFileBackend(str(layout.journal)))
    return optuna.load_study(storage=storage, study_name="sweep")


def run_collect(layout: SweepLayout, direction: str = "maximize", value: str = "best"):
    return collect(
        layout, load(layout), metric="psnr", direction=direction, value=value, param_names=PARAMS
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> SweepLayout:
    return make_sweep(tmp_path_factory.mktemp("sweep") / "s1", "maximize", TRIALS)


def test_rows_ranked_best_first_with_unscored_trials_last(sweep: SweepLayout) -> None:
    result = run_collect(sweep)
    assert [r.number for r in result.rows] == [1, 0, 4, 3, 2, 5, 6]
    by_number = {r.number: r for r in result.rows}
    assert [by_number[n].state for n in range(7)] == [
        "COMPLETE",
        "COMPLETE",
        "PRUNED",
        "FAIL",
        "RUNNING",
        "RUNNING",
        "FAIL",
    ]
    # Best and final from the "val" records (not "val_ema"), written above.
    assert (by_number[0].best, by_number[0].final, by_number[0].objective) == (24.5, 23.0, 24.5)
    assert (by_number[1].best, by_number[1].final, by_number[1].objective) == (26.25, 25.5, 26.25)
    # Not complete: the objective is computed from the metrics so far.
    assert (by_number[2].objective, by_number[2].pruned_at, by_number[2].steps) == (16.0, 200, 200)
    assert by_number[4].objective == 22.0  # the half-written last line is skipped
    assert by_number[3].error == "RuntimeError: loss is nan | see the log"
    assert by_number[6].error == "OUT_OF_MEMORY" and by_number[6].run_dir is None
    assert by_number[5].objective is None and by_number[5].steps is None
    assert by_number[1].params == {"optim.lr": 1e-3, "method.kernel.size": [9, 9, 9]}
    assert (by_number[0].steps, by_number[0].wall_s, by_number[0].gpu_hours) == (300, 12.5, 0.0035)
    assert (by_number[0].retries, by_number[1].retries) == (1, 0)
    assert result.best_number == 1


def test_final_value_ranks_unfinished_trials_by_their_last_validation(sweep: SweepLayout) -> None:
    rows = {r.number: r for r in run_collect(sweep, value="final").rows}
    assert rows[2].objective == 16.0 and rows[3].objective == 18.0
    assert rows[1].objective == 26.25  # complete: Optuna's value


def test_csv_parses_back_with_the_same_numbers(sweep: SweepLayout) -> None:
    result = run_collect(sweep)
    with result.table_csv.open(newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == [
        "number",
        "state",
        *PARAMS,
        "objective",
        "best_psnr",
        "final_psnr",
        "steps",
        "wall_s",
        "gpu_hours",
        "retries",
        "pruned_at",
        "error",
        "run_dir",
        "log",
    ]
    assert [int(t["number"]) for t in table] == [r.number for r in result.rows]
    for line, row in zip(table, result.rows, strict=True):
        for key, expected in [
            ("objective", row.objective),
            ("best_psnr", row.best),
            ("final_psnr", row.final),
            ("wall_s", row.wall_s),
            ("gpu_hours", row.gpu_hours),
        ]:
            assert (float(line[key]) if line[key] else None) == expected
        assert float(line["optim.lr"]) == TRIALS[row.number]["lr"]
        assert json.loads(line["method.kernel.size"]) == KERNELS[TRIALS[row.number]["kernel"]]
        assert line["state"] == row.state
    failed = next(t for t in table if t["number"] == "3")
    assert failed["error"] == "RuntimeError: loss is nan | see the log"
    assert table[-1]["objective"] == "" and table[-1]["run_dir"] == ""


def test_markdown_has_a_header_and_one_line_per_trial(sweep: SweepLayout) -> None:
    result = run_collect(sweep)
    text = result.table_md.read_text()
    assert text.startswith("# Sweep s1")
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(TRIALS)
    assert "| objective | best_psnr |" in table[0]
    first = table[2].split(" | ")
    assert first[0] == "| 1" and "26.25" in first and "[9, 9, 9]" in first
    assert "0.0035" in table[3]  # 4 significant digits
    failed = next(line for line in table if line.startswith("| 3 |"))
    assert "RuntimeError: loss is nan \\| see the log" in failed


def test_best_yaml_trains_the_best_trial_into_a_fresh_directory(sweep: SweepLayout) -> None:
    result = run_collect(sweep)
    assert result.best_yaml == sweep.results / "best.yaml"
    assert result.best_yaml in result.written
    best = load_config(ExperimentConfig, result.best_yaml)
    run_dir = Path(next(r for r in result.rows if r.number == 1).run_dir)
    trained = load_config(ExperimentConfig, run_dir / "config.yaml")
    assert best.output == (sweep.root / "best-run").resolve()
    assert best.model_copy(update={"output": trained.output}) == trained
    assert best.optim.lr == 1e-3 and list(best.method.kernel.size) == [9, 9, 9]
    # Written atomically: no temporary file is left behind.
    assert sorted(p.name for p in sweep.results.iterdir() if p.is_file()) == [
        "best.yaml",
        "table.csv",
        "table.md",
    ]


def test_plots_are_png_files_including_importance(sweep: SweepLayout) -> None:
    study = load(sweep)
    rows = run_collect(sweep).rows
    paths = write_plots(sweep, study, rows, metric="psnr", direction="maximize", param_names=PARAMS)
    names = sorted(p.name for p in paths)
    assert names == [
        "intermediate_values.png",
        "objective_vs_method.kernel.size.png",
        "objective_vs_optim.lr.png",
        "parallel_coordinates.png",
        "param_importance.png",
    ]
    for path in paths:
        assert path.parent == sweep.results / "plots"
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_parameter_axes_log_for_decades_and_categorical_for_lists(sweep: SweepLayout) -> None:
    rows = run_collect(sweep).rows
    lr = objective_vs_param(rows, "optim.lr", metric="psnr", direction="maximize")
    assert lr is not None and lr.axes[0].get_xscale() == "log"
    kernel = objective_vs_param(rows, "method.kernel.size", metric="psnr", direction="maximize")
    assert kernel is not None
    labels = [t.get_text() for t in kernel.axes[0].get_xticklabels()]
    assert sorted(labels) == ["[5, 5, 5]", "[9, 9, 9]"]


def test_minimise_ranks_the_other_way(tmp_path: Path) -> None:
    layout = make_sweep(tmp_path / "s2", "minimize", TRIALS)
    result = run_collect(layout, direction="minimize")
    # Lowest first: best (lowest) psnr of each trial 15 (2), 18 (3), 20 (0), 21 (1), 22 (4).
    assert [r.number for r in result.rows] == [2, 3, 0, 1, 4, 5, 6]
    rows = {r.number: r for r in result.rows}
    assert (rows[0].best, rows[0].final, rows[0].objective) == (20.0, 23.0, 20.0)
    assert result.best_number == 0
    best = load_config(ExperimentConfig, result.best_yaml)
    assert best.optim.lr == 1e-4


def test_an_early_sweep_has_a_table_but_no_best_and_no_plots(tmp_path: Path) -> None:
    running = {4: TRIALS[4], 5: TRIALS[5]}
    layout = make_sweep(tmp_path / "s3", "maximize", {0: running[4], 1: running[5]})
    result = run_collect(layout)
    assert result.best_number is None and result.best_yaml is None
    assert not (layout.results / "best.yaml").exists()
    assert [r.objective for r in result.rows] == [22.0, None]
    study = load(layout)
    paths = write_plots(
        layout, study, result.rows, metric="psnr", direction="maximize", param_names=PARAMS
    )
    # Importance needs two complete trials; the rest have the running trial's data.
    assert "param_importance.png" not in {p.name for p in paths}
    assert "intermediate_values.png" in {p.name for p in paths}

    empty = make_sweep(tmp_path / "s4", "maximize", {})
    result = run_collect(empty)
    table = [line for line in result.table_md.read_text().splitlines() if line.startswith("|")]
    assert result.rows == [] and len(table) == 2  # header and separator
    assert result.table_csv.read_text().count("\n") == 1
    plots = write_plots(
        empty, load(empty), [], metric="psnr", direction="maximize", param_names=PARAMS
    )
    assert plots == []


def test_unknown_direction_or_value_is_a_config_error(sweep: SweepLayout) -> None:
    with pytest.raises(ConfigError, match="direction"):
        run_collect(sweep, direction="up")
    with pytest.raises(ConfigError, match="value"):
        run_collect(sweep, value="mean")
