"""The search space: checked against the base training config, suggested through Optuna,
and turned into each trial's training configuration.

A parameter's value reaches the trial's configuration as a ``dotted.path=value`` override
(the same path ``--set`` takes), with the value written in YAML flow form so that it parses
back exactly (floats included). Optuna's categorical choices must be scalars, while a
choice here may be any YAML value (``[32, 32, 32]``): every choice is handed to Optuna as
its YAML flow text and decoded back on the way out.
"""

from __future__ import annotations

import difflib
import itertools
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from hpcdeconv.config import ExperimentConfig, load_config
from hpcdeconv.errors import ConfigError
from hpcdeconv.sweep.config import ParameterSpace, SweepConfig, decode_value, encode_value

if TYPE_CHECKING:
    import optuna

#: Characters kept in a trial directory's name; the rest become ``_``.
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
#: Longest parameter slug in a trial directory's name (after the trial number).
SLUG_CHARS = 80
#: Settings a sweep cannot vary: the sweep gives each trial its own run directory.
_RESERVED = ("output",)


def base_config(cfg: SweepConfig) -> ExperimentConfig:
    """The base training configuration: ``cfg.base`` (or the defaults) with ``cfg.overrides``.

    Raises
    ------
    ConfigError
        The base file is missing or invalid, or an override is.
    """
    try:
        return load_config(ExperimentConfig, cfg.base, cfg.overrides)
    except ConfigError as exc:
        where = f"base {cfg.base}" if cfg.base is not None else "the built-in defaults"
        raise ConfigError(f"sweep base config ({where} with the overrides): {exc}") from None


def _dotted_paths(node: Any, prefix: str = "") -> Iterator[str]:
    """Every dotted path of a dumped configuration: sub-mappings and leaves."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            yield path
            yield from _dotted_paths(value, path)


def _in_free_mapping(config: BaseModel, path: str, known: set[str]) -> bool:
    """Whether ``path`` lies below a free-form mapping setting (``strategy.deepspeed.extra``),
    whose keys the model does not list."""
    parts = path.split(".")
    for n in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:n])
        if prefix not in known:
            continue
        node: Any = config
        for part in parts[:n]:
            node = node.get(part) if isinstance(node, Mapping) else getattr(node, part, None)
        return isinstance(node, Mapping)
    return False


def _check_path(path: str, base: ExperimentConfig, known: set[str]) -> None:
    if path in _RESERVED:
        raise ConfigError(
            f"sweep parameter '{path}' cannot be swept: each trial writes to its own "
            "run directory in the sweep directory"
        )
    if path in known or _in_free_mapping(base, path, known):
        return
    close = difflib.get_close_matches(path, sorted(known), n=1, cutoff=0.6)
    if close:
        hint = f"did you mean '{close[0]}'?"
    else:
        top = sorted(p for p in known if "." not in p)
        hint = f"settings start with one of {', '.join(top)}"
    raise ConfigError(f"sweep parameter '{path}' is not a setting of the base config; {hint}")


def _check_applies(cfg: SweepConfig, params: dict[str, Any], run_dir: Path) -> None:
    """``params`` give a valid training configuration, or a ConfigError naming them."""
    try:
        trial_config(cfg, params, run_dir)
    except ConfigError as exc:
        shown = ", ".join(f"{path}={encode_value(value)}" for path, value in params.items())
        raise ConfigError(
            f"sweep parameter {shown} gives an invalid training config: {exc}"
        ) from None


def budget(cfg: SweepConfig) -> int:
    """How many trials the sweep runs: ``search.trials``, or the grid's size for a grid.

    Raises
    ------
    ConfigError
        Random or TPE search without ``search.trials``.
    """
    if cfg.search.sampler == "grid":
        size = grid_size(cfg)
        return size if cfg.search.trials is None else cfg.search.trials
    if cfg.search.trials is None:
        raise ConfigError(
            f"search.trials is needed for the {cfg.search.sampler} sampler: "
            "set the number of trials to run"
        )
    return cfg.search.trials


def check_parameters(cfg: SweepConfig) -> ExperimentConfig:
    """Check the space against the base training config; return that base config.

    Every parameter path must be a setting (leaf or sub-mapping) of the base config;
    every grid value, and the two ends of every range, must give a valid training
    configuration (with the grid sampler: every grid point, all parameters together).

    Raises
    ------
    ConfigError
        The base config is invalid; a path is not a setting (named with the closest
        valid path); a value makes the training config invalid (named with the value);
        the grid sampler is given a range; the budget is missing (random, TPE) or larger
        than the grid.
    """
    base = base_config(cfg)
    known = set(_dotted_paths(base.model_dump(mode="json")))
    for path in cfg.parameters:
        _check_path(path, base, known)
    if cfg.search.sampler == "grid":
        for path, space in cfg.parameters.items():
            if space.is_range:
                raise ConfigError(
                    f"sweep parameter '{path}' is a range (low, high): the grid sampler "
                    "needs values; use sampler random or tpe, or list the values"
                )
    size = budget(cfg)
    if cfg.search.sampler == "grid" and size > grid_size(cfg):
        raise ConfigError(
            f"search.trials {size} is more than the grid's {grid_size(cfg)} points: "
            "a grid trial would run twice"
        )
    run_dir = base.output
    for path, space in cfg.parameters.items():
        for value in _probe_values(space):
            _check_applies(cfg, {path: value}, run_dir)
    if cfg.search.sampler == "grid" and len(cfg.parameters) > 1:
        # Values valid one by one may still clash (e.g. data.patch against val_tile).
        for point in grid_points(cfg):
            _check_applies(cfg, point, run_dir)
    return base


def _probe_values(space: ParameterSpace) -> list[Any]:
    """The values of ``space`` that stand for all of it: its values, or its two ends."""
    if space.values is not None:
        return list(space.values)
    assert space.low is not None and space.high is not None
    if space.integer:
        return [int(space.low), int(space.high)]
    return [space.low, space.high]


def _choices(cfg: SweepConfig) -> dict[str, list[Any]]:
    """The values of every parameter, or a ConfigError naming a range (grid only)."""
    out: dict[str, list[Any]] = {}
    for path, space in cfg.parameters.items():
        if space.values is None:
            raise ConfigError(
                f"sweep parameter '{path}' is a range (low, high); a grid needs values"
            )
        out[path] = space.values
    return out


def grid_size(cfg: SweepConfig) -> int:
    """Number of grid points: the product of the parameters' value counts."""
    return math.prod(len(values) for values in _choices(cfg).values())


def grid_points(cfg: SweepConfig) -> list[dict[str, Any]]:
    """The cartesian product of the parameters' values, first parameter varying slowest.

    Raises
    ------
    ConfigError
        A parameter is a range.
    """
    choices = _choices(cfg)
    points = itertools.product(*choices.values())
    # Through the encoding: each point owns its values (no list shared between points).
    return [
        {path: decode_value(encode_value(v)) for path, v in zip(choices, point, strict=True)}
        for point in points
    ]


def encoded_grid(cfg: SweepConfig) -> dict[str, list[object]]:
    """The grid as Optuna's ``GridSampler`` takes it: each parameter's values as YAML text.

    Raises
    ------
    ConfigError
        A parameter is a range.
    """
    return {path: [encode_value(v) for v in values] for path, values in _choices(cfg).items()}


def suggest(trial: optuna.Trial, cfg: SweepConfig) -> dict[str, Any]:
    """Ask ``trial`` for a value of every parameter (in declaration order).

    Parameters
    ----------
    trial
        A trial of the sweep's study (e.g. from ``study.ask()``).
    cfg
        The sweep configuration.

    Returns
    -------
    dict
        Dotted path -> decoded value (YAML values, lists kept as lists; ``int`` for an
        integer range, ``float`` for a float range).
    """
    params: dict[str, Any] = {}
    for path, space in cfg.parameters.items():
        if space.values is not None:
            text = trial.suggest_categorical(path, [encode_value(v) for v in space.values])
            params[path] = decode_value(str(text))
            continue
        assert space.low is not None and space.high is not None
        if space.integer:
            step = 1 if space.step is None else int(space.step)
            params[path] = trial.suggest_int(
                path, int(space.low), int(space.high), step=step, log=space.log
            )
        else:
            params[path] = trial.suggest_float(
                path, space.low, space.high, step=space.step, log=space.log
            )
    return params


def decode_params(cfg: SweepConfig, trial_params: Mapping[str, Any]) -> dict[str, Any]:
    """Decoded parameter values of a trial from Optuna's ``FrozenTrial.params``.

    Parameters of the space come first, in declaration order (those the trial has);
    keys outside the space are passed through unchanged after them.
    """
    params: dict[str, Any] = {}
    for path, space in cfg.parameters.items():
        if path not in trial_params:
            continue
        value = trial_params[path]
        if space.values is not None and isinstance(value, str):
            value = decode_value(value)
        elif space.integer and isinstance(value, float) and value.is_integer():
            value = int(value)
        params[path] = value
    params.update({k: v for k, v in trial_params.items() if k not in params})
    return params


def trial_overrides(params: Mapping[str, Any]) -> list[str]:
    """``path=value`` overrides of ``params`` that ``parse_overrides`` reads back exactly.

    Examples
    --------
    >>> trial_overrides({"optim.lr": 1e-05, "data.patch": [32, 32, 32]})
    ['optim.lr=1.0e-05', 'data.patch=[32, 32, 32]']
    """
    return [f"{path}={encode_value(value)}" for path, value in params.items()]


def trial_config(cfg: SweepConfig, params: Mapping[str, Any], run_dir: Path) -> ExperimentConfig:
    """The training configuration of one trial.

    The base config, then ``cfg.overrides``, then the trial's parameters, with ``output``
    set to the trial's run directory ``run_dir``.

    Raises
    ------
    ConfigError
        The result is not a valid training configuration.
    """
    overrides = [*cfg.overrides, *trial_overrides(params), f"output={encode_value(str(run_dir))}"]
    return load_config(ExperimentConfig, cfg.base, overrides)


def _slug_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "x".join(_slug_value(v) for v in value)
    if isinstance(value, Mapping):
        return "+".join(f"{k}={_slug_value(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str):
        return value
    return encode_value(value)


def trial_dir_name(number: int, params: Mapping[str, Any]) -> str:
    """The name of a trial's run directory, e.g. ``0003-lr=0.0001,cycle_weight=10``.

    The zero-padded trial number (unique) and a readable slug: the last component of
    each parameter's path with its value (lists joined with ``x``), characters other
    than ``A-Z a-z 0-9 . _ = , + -`` replaced by ``_``, cut to :data:`SLUG_CHARS`.
    """
    slug = ",".join(f"{path.rsplit('.', 1)[-1]}={_slug_value(v)}" for path, v in params.items())
    slug = _UNSAFE.sub("_", slug)[:SLUG_CHARS]
    return f"{number:04d}-{slug}" if slug else f"{number:04d}"


def _space_line(path: str, space: ParameterSpace) -> str:
    if space.values is not None:
        return f"  {path}: {encode_value(space.values)}"
    assert space.low is not None and space.high is not None
    kind = "int" if space.integer else "float"
    low, high = (int(space.low), int(space.high)) if space.integer else (space.low, space.high)
    extras = ["log"] if space.log else []
    if space.step is not None:
        extras.append(f"step {int(space.step) if space.integer else space.step}")
    tail = f", {', '.join(extras)}" if extras else ""
    return f"  {path}: {kind} in [{low}, {high}]{tail}"


def _shown(value: Any) -> str:
    """A job parameter as YAML flow text where it has one (paths and objects: ``str``)."""
    try:
        return encode_value(value)
    except ConfigError:
        return str(value)


def describe(cfg: SweepConfig, job_parameters: Mapping[str, Any]) -> str:
    """The ``--dry-run`` text: search, budget, objective, space, grid trials, job parameters.

    Parameters
    ----------
    cfg
        The sweep configuration (checked or not; a missing budget is shown as such).
    job_parameters
        The generated job parameters (e.g. submitit's), one ``key: value`` line each.
    """
    search, objective, pruner = cfg.search, cfg.objective, cfg.pruner
    lines = [f"base: {cfg.base if cfg.base is not None else '(built-in defaults)'}"]
    lines += [f"  override: {item}" for item in cfg.overrides]
    lines.append(f"sampler: {search.sampler} (seed {search.seed})")
    if search.sampler == "grid":
        size = grid_size(cfg)
        lines.append(f"budget: {search.trials or size} trials (grid of {size} points)")
    elif search.trials is None:
        lines.append("budget: missing (set search.trials)")
    else:
        lines.append(f"budget: {search.trials} trials")
    lines.append(
        f"objective: {objective.direction} {objective.metric} "
        f"({objective.value} validation value of each trial)"
    )
    if pruner.kind == "none":
        lines.append("pruner: none")
    else:
        lines.append(
            f"pruner: {pruner.kind} (min_resource {pruner.min_resource} validations, "
            f"reduction_factor {pruner.reduction_factor})"
        )
    lines.append(f"storage: {cfg.storage or 'journal file in the sweep directory'}")
    lines.append(f"output: {cfg.output}")
    lines.append("space:")
    lines += [_space_line(path, space) for path, space in cfg.parameters.items()]
    if search.sampler == "grid":
        points = grid_points(cfg)
        lines.append(f"grid trials ({len(points)}; workers take them in this order):")
        width = len(str(len(points) - 1))
        for i, point in enumerate(points):
            shown = ", ".join(f"{path}={encode_value(v)}" for path, v in point.items())
            lines.append(f"  {i:>{width}}: {shown}")
    lines.append("job parameters:")
    lines += [f"  {key}: {_shown(value)}" for key, value in job_parameters.items()]
    return "\n".join(lines)
