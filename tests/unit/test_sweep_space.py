"""Sweep configuration and search space: checked against the base training config, the
grid, Optuna's suggestions, and each trial's training configuration."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from hpcdeconv.config import build_config, load_config, parse_overrides
from hpcdeconv.errors import ConfigError
from hpcdeconv.sweep.config import SweepConfig
from hpcdeconv.sweep.space import (
    budget,
    check_parameters,
    decode_params,
    decode_value,
    describe,
    encode_value,
    encoded_grid,
    grid_points,
    suggest,
    trial_config,
    trial_dir_name,
    trial_overrides,
)

ROOT = Path(__file__).resolve().parents[2]

#: Keeps every probe of the default training config small (it validates sizes only).
SMALL = [
    "data.patch=[32, 32, 32]",
    "method.discriminator.n_layers=2",
    "method.discriminator.n_scales=2",
    "train.val_tile=[32, 32, 32]",
    "train.val_overlap=4",
]


def sweep(parameters: dict[str, Any], **extra: Any) -> SweepConfig:
    """A sweep over the built-in default training config."""
    return build_config(SweepConfig, {"overrides": SMALL, "parameters": parameters, **extra})


def grid(parameters: dict[str, Any]) -> SweepConfig:
    return sweep(parameters, search={"sampler": "grid"})


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def test_misspelled_path_is_named_with_the_closest_valid_one() -> None:
    cfg = grid({"optim.lrr": {"values": [1e-4]}})
    with pytest.raises(ConfigError) as info:
        check_parameters(cfg)
    assert str(info.value) == (
        "sweep parameter 'optim.lrr' is not a setting of the base config; did you mean 'optim.lr'?"
    )


def test_nested_misspelling_and_sub_mappings() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'method\.loss\.cycle_weight'\?"):
        check_parameters(grid({"method.loss.cycle_wieght": {"values": [1.0]}}))
    # A sub-mapping is a setting too: its values merge into the base block.
    cfg = grid({"method.loss": {"values": [{"adversarial": "wgan-gp", "gp_eta": 5.0}]}})
    check_parameters(cfg)
    trial = trial_config(cfg, grid_points(cfg)[0], Path("r"))
    assert trial.method.loss.adversarial == "wgan-gp" and trial.method.loss.cycle_weight == 10.0


def test_output_cannot_be_swept() -> None:
    with pytest.raises(ConfigError, match="'output' cannot be swept"):
        check_parameters(grid({"output": {"values": ["a", "b"]}}))


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"values": []}, "values is empty"),
        ({"values": [1, 1]}, "listed twice"),
        ({"low": 1.0}, "both low and high"),
        ({"values": [1], "low": 0.0, "high": 1.0}, "not both"),
        ({"values": [1], "log": True}, "apply to a range"),
        ({"low": 2.0, "high": 1.0}, "low 2 must be smaller than high 1"),
        ({"low": 0.0, "high": 1.0, "log": True}, "log range needs low > 0"),
        ({"low": 1.0, "high": 4.5, "integer": True}, "whole high"),
        ({"low": 1e-5, "high": 1e-3, "log": True, "step": 1e-5}, "step and log"),
    ],
)
def test_bad_spaces_are_rejected_at_load(space: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        sweep({"optim.lr": space})
    assert "parameters.optim.lr" in str(info.value) and "\n" not in str(info.value)


def test_no_parameters_and_zero_budget_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no parameters to sweep"):
        sweep({})
    path = tmp_path / "sweep.yaml"
    path.write_text(
        yaml.safe_dump({"parameters": {"optim.lr": {"values": [1e-4]}}, "search": {"trials": 0}})
    )
    with pytest.raises(ConfigError, match=r"'search\.trials': Input should be greater than 0"):
        load_config(SweepConfig, path)


def test_overlapping_paths_are_rejected() -> None:
    with pytest.raises(ConfigError, match=r"'optim' and 'optim\.lr' overlap"):
        sweep({"optim": {"values": [{"lr": 1e-3}]}, "optim.lr": {"values": [1e-4]}})


def test_grid_over_a_range_is_rejected() -> None:
    cfg = grid({"optim.lr": {"low": 1e-5, "high": 1e-3, "log": True}})
    with pytest.raises(ConfigError, match=r"'optim\.lr' is a range .* grid sampler needs values"):
        check_parameters(cfg)


def test_samplers_need_a_budget_and_a_grid_caps_it() -> None:
    with pytest.raises(ConfigError, match=r"search\.trials is needed for the tpe sampler"):
        check_parameters(sweep({"optim.lr": {"low": 1e-5, "high": 1e-3}}))
    cfg = sweep({"optim.lr": {"values": [1e-4, 3e-4]}}, search={"sampler": "grid", "trials": 3})
    with pytest.raises(ConfigError, match="3 is more than the grid's 2 points"):
        check_parameters(cfg)
    assert budget(grid({"optim.lr": {"values": [1e-4, 3e-4]}})) == 2


def test_a_bad_value_is_named_with_its_parameter() -> None:
    cfg = grid({"optim.lr": {"values": [1e-4, -1]}})
    with pytest.raises(ConfigError) as info:
        check_parameters(cfg)
    message = str(info.value)
    assert message.startswith("sweep parameter optim.lr=-1 gives an invalid training config")
    assert "greater than 0" in message and "\n" not in message
    # Range ends are probed too.
    with pytest.raises(ConfigError, match=r"train\.steps=0 gives an invalid"):
        check_parameters(
            sweep(
                {"train.steps": {"low": 0, "high": 10, "integer": True}},
                search={"sampler": "random", "trials": 2},
            )
        )


def test_grid_points_are_checked_together() -> None:
    # Each value is valid alone, but a 2D patch with a 3D validation tile is not.
    cfg = grid({"data.patch": {"values": [[32, 32, 32], [64, 64]]}})
    with pytest.raises(ConfigError, match=r"data\.patch=\[64, 64\] gives an invalid"):
        check_parameters(cfg)


# --------------------------------------------------------------------------------------
# Grid, encoding, trial configuration
# --------------------------------------------------------------------------------------


def test_grid_points_are_the_product_in_declaration_order() -> None:
    cfg = grid(
        {
            "optim.lr": {"values": [1e-4, 3e-4]},
            "method.loss.cycle_weight": {"values": [1, 5, 10]},
        }
    )
    points = grid_points(cfg)
    assert len(points) == 6
    assert points[:4] == [
        {"optim.lr": 1e-4, "method.loss.cycle_weight": 1},
        {"optim.lr": 1e-4, "method.loss.cycle_weight": 5},
        {"optim.lr": 1e-4, "method.loss.cycle_weight": 10},
        {"optim.lr": 3e-4, "method.loss.cycle_weight": 1},
    ]
    assert encoded_grid(cfg) == {
        "optim.lr": ["0.0001", "0.0003"],
        "method.loss.cycle_weight": ["1", "5", "10"],
    }


@pytest.mark.parametrize(
    "value", [[32, 32, 32], 1e-4, 1e-5, 3e-4 + 1e-19, 0.1 + 0.2, 10, True, None, "true", "a: b"]
)
def test_values_round_trip_through_the_encoding_and_overrides(value: Any) -> None:
    text = encode_value(value)
    assert isinstance(text, str) and "\n" not in text
    assert decode_value(text) == value and type(decode_value(text)) is type(value)
    assert parse_overrides(trial_overrides({"a.b": value})) == {"a": {"b": value}}


def test_trial_config_applies_values_overrides_and_output(tmp_path: Path) -> None:
    cfg = sweep(
        {"data.patch": {"values": [[48, 48, 48]]}, "optim.lr": {"values": [1e-4]}},
        overrides=[*SMALL, "train.steps=7"],
    )
    run_dir = tmp_path / "trials" / "0000-x"
    trial = trial_config(cfg, {"data.patch": [48, 48, 48], "optim.lr": 2.5e-05}, run_dir)
    assert trial.data.patch == (48, 48, 48)
    assert trial.optim.lr == 2.5e-05
    assert trial.train.steps == 7 and trial.train.val_overlap == 4
    assert trial.output == run_dir
    # An output path YAML would read as a number stays a path.
    assert trial_config(cfg, {}, Path("2024")).output == Path("2024")


def test_trial_dir_names_are_numbered_short_and_safe() -> None:
    params = {"optim.lr": 1e-4, "method.loss.cycle_weight": 10}
    assert trial_dir_name(3, params) == "0003-lr=0.0001,cycle_weight=10"
    assert trial_dir_name(12, {"data.patch": [32, 32, 32]}) == "0012-patch=32x32x32"
    odd = trial_dir_name(0, {"a.name": "x/y z*", "a.long": "v" * 200})
    assert re.fullmatch(r"0000-[A-Za-z0-9._=,+-]+", odd) and len(odd) == 5 + 80
    assert odd.startswith("0000-name=x_y_z_,long=vvv")


# --------------------------------------------------------------------------------------
# Optuna
# --------------------------------------------------------------------------------------


def test_suggest_stays_in_the_space_and_decodes() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = sweep(
        {
            "optim.lr": {"low": 1e-5, "high": 1e-3, "log": True},
            "method.loss.identity_weight": {"low": 0.0, "high": 1.0, "step": 0.25},
            "train.steps": {"low": 10, "high": 20, "step": 2, "integer": True},
            "data.patch": {"values": [[32, 32, 32], [48, 48, 48]]},
        },
        search={"sampler": "random", "trials": 8},
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_patches = set()
    for _ in range(8):
        trial = study.ask()
        params = suggest(trial, cfg)
        assert list(params) == list(cfg.parameters)
        assert 1e-5 <= params["optim.lr"] <= 1e-3
        assert params["method.loss.identity_weight"] in (0.0, 0.25, 0.5, 0.75, 1.0)
        steps = params["train.steps"]
        assert isinstance(steps, int) and 10 <= steps <= 20 and steps % 2 == 0
        assert params["data.patch"] in ([32, 32, 32], [48, 48, 48])
        seen_patches.add(tuple(params["data.patch"]))
        study.tell(trial, 0.0)
        assert decode_params(cfg, study.trials[-1].params) == params
        trial_config(cfg, params, Path("r"))  # every suggestion is a valid training config
    assert len(seen_patches) == 2


def test_grid_sampler_runs_every_point_once() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = grid(
        {
            "data.patch": {"values": [[32, 32, 32], [48, 48, 48]]},
            "optim.lr": {"values": [1e-4, 3e-4]},
        }
    )
    study = optuna.create_study(sampler=optuna.samplers.GridSampler(encoded_grid(cfg), seed=0))
    got = []
    for _ in range(budget(cfg)):
        trial = study.ask()
        got.append(suggest(trial, cfg))
        try:
            study.tell(trial, 1.0)
        except RuntimeError as exc:
            # Optuna 5's GridSampler calls study.stop() when its last point is told, which
            # only works inside study.optimize; the trial is stored as complete all the same.
            assert "Study.stop" in str(exc)
    assert sorted(got, key=repr) == sorted(grid_points(cfg), key=repr)
    assert [decode_params(cfg, t.params) for t in study.trials] == got
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def test_decode_keeps_unknown_keys_and_int_ranges() -> None:
    cfg = sweep(
        {
            "train.steps": {"low": 1, "high": 9, "integer": True},
            "data.patch": {"values": [[32] * 3]},
        }
    )
    params = decode_params(cfg, {"data.patch": "[32, 32, 32]", "train.steps": 4.0, "x": "y"})
    assert params == {"train.steps": 4, "data.patch": [32, 32, 32], "x": "y"}
    assert isinstance(params["train.steps"], int)
    assert decode_params(cfg, {}) == {}  # a trial that has not suggested yet


# --------------------------------------------------------------------------------------
# The example and --dry-run
# --------------------------------------------------------------------------------------


def test_example_config_loads_checks_and_describes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # base: is relative to the working directory
    cfg = load_config(SweepConfig, ROOT / "configs" / "sweep_blind.yaml")
    base = check_parameters(cfg)
    assert base.method.name == "blind_cyclegan"
    assert cfg.search.sampler == "grid" and budget(cfg) == 4
    assert cfg.executor.kind == "slurm" and cfg.executor.workers == 2
    text = describe(cfg, {"slurm_array_parallelism": 2, "folder": Path("sweeps/blind/jobs")})
    lines = text.splitlines()
    assert "sampler: grid (seed 0)" in lines
    assert "objective: maximize psnr (best validation value of each trial)" in lines
    assert "  optim.lr: [0.0001, 0.0003]" in lines
    assert "  3: method.loss.cycle_weight=10, optim.lr=0.0003" in lines
    assert lines[-2:] == ["  slurm_array_parallelism: 2", "  folder: sweeps/blind/jobs"]


def test_describe_a_sampler_space() -> None:
    cfg = sweep(
        {
            "optim.lr": {"low": 1e-5, "high": 1e-3, "log": True},
            "train.steps": {"low": 10, "high": 20, "step": 2, "integer": True},
        },
        search={"sampler": "tpe", "trials": 16, "seed": 3},
        pruner={"kind": "hyperband", "min_resource": 2},
    )
    lines = describe(cfg, {}).splitlines()
    assert "sampler: tpe (seed 3)" in lines and "budget: 16 trials" in lines
    assert "pruner: hyperband (min_resource 2 validations, reduction_factor 3)" in lines
    assert "  optim.lr: float in [1e-05, 0.001], log" in lines
    assert "  train.steps: int in [10, 20], step 2" in lines
    assert not any(line.startswith("grid") for line in lines)
