"""The sweep configuration: base training config, search space, search, objective, executor.

Loaded like every configuration, ``load_config(SweepConfig, path, overrides)``. The space
names settings of the base training configuration by dotted path (``optim.lr``); that the
paths exist and every value validates is checked against the base config by
:func:`hpcdeconv.sweep.space.check_parameters`, which needs the base file.

A value travels (to Optuna, into ``--set`` overrides) as its one-line YAML flow text,
:func:`encode_value`, read back by :func:`decode_value`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from hpcdeconv.config.base import PositiveFloat, PositiveInt, StrictModel
from hpcdeconv.errors import ConfigError

#: One dotted configuration path: identifiers joined by dots (``method.loss.cycle_weight``).
_DOTTED_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists (the safe YAML dumper writes lists, not tuples)."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def encode_value(value: Any) -> str:
    """``value`` as one line of YAML flow text that ``yaml.safe_load`` reads back equal.

    Floats keep every digit (``1e-05`` is written ``1.0e-05``, which YAML reads as a float).

    Parameters
    ----------
    value
        Any YAML value: scalar, list (or tuple), mapping.

    Raises
    ------
    ConfigError
        ``value`` is not representable in YAML.
    """
    try:
        text = yaml.safe_dump(
            _plain(value), default_flow_style=True, width=float("inf"), sort_keys=False
        )
    except yaml.YAMLError as exc:
        raise ConfigError(f"sweep value {value!r} cannot be written as YAML ({exc})") from None
    # A scalar document ends with an explicit end marker; a flow collection does not.
    return text.removesuffix("\n...\n").rstrip("\n")


def decode_value(text: str) -> Any:
    """The value :func:`encode_value` wrote as ``text``."""
    return yaml.safe_load(text)


class ParameterSpace(StrictModel):
    """The values one parameter takes: a list of choices, or a numeric range.

    Exactly one of ``values`` (categorical: any YAML values, e.g. ``[32, 32, 32]``, tried
    as given by the grid sampler and drawn from by random and TPE search) or ``low`` and
    ``high`` (a range ``[low, high]``, random and TPE search only). ``log`` draws a range
    log-uniformly, ``step`` discretises it, ``integer`` makes it a range of whole numbers.
    """

    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> ParameterSpace:
        has_range = self.low is not None or self.high is not None
        if self.values is not None:
            if has_range:
                raise ValueError("give either values or a range (low, high), not both")
            if self.log or self.step is not None or self.integer:
                raise ValueError(
                    "log, step and integer apply to a range (low, high), not to values"
                )
            if not self.values:
                raise ValueError("values is empty: give at least one value")
            # Compared as Optuna sees them: 1 and 1.0 are two choices, [1] and [1] one.
            texts = [encode_value(v) for v in self.values]
            for i, text in enumerate(texts):
                if text in texts[:i]:
                    raise ValueError(f"value {text} is listed twice")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give values, or a range with both low and high")
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError("low and high must be finite numbers")
        if self.low >= self.high:
            raise ValueError(f"low {self.low:g} must be smaller than high {self.high:g}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, not {self.low:g}")
        if self.step is not None:
            if not (math.isfinite(self.step) and self.step > 0):
                raise ValueError(f"step must be a positive number, not {self.step:g}")
            # Optuna draws a discretised range uniformly; log spacing has no fixed step.
            if self.log:
                raise ValueError("step and log cannot both be set")
            if self.step > self.high - self.low:
                raise ValueError(
                    f"step {self.step:g} is larger than the range {self.low:g}..{self.high:g}"
                )
        if self.integer:
            for key in ("low", "high", "step"):
                value = getattr(self, key)
                if value is not None and not float(value).is_integer():
                    raise ValueError(f"an integer range needs a whole {key}, not {value:g}")
        return self

    @property
    def is_range(self) -> bool:
        """Whether this is a numeric range (``low``, ``high``) rather than ``values``."""
        return self.values is None


class SearchConfig(StrictModel):
    """How trials are chosen and how many run.

    ``trials`` is the budget: for ``grid`` at most the grid's size (default: all of it);
    ``random`` and ``tpe`` need it.
    """

    sampler: Literal["grid", "random", "tpe"] = "tpe"
    seed: int = 0
    trials: PositiveInt | None = None


class ObjectiveConfig(StrictModel):
    """The score a trial is ranked by.

    ``metric`` is a validation score key of the ``"val"`` records of ``metrics.jsonl``
    (e.g. ``psnr``, ``ssim``); ``value`` takes the trial's best or its final validation.
    """

    metric: Annotated[str, Field(min_length=1)] = "psnr"
    direction: Literal["maximize", "minimize"] = "maximize"
    value: Literal["best", "final"] = "best"


class PrunerConfig(StrictModel):
    """Early stopping of trials on their intermediate validation scores.

    ``min_resource`` is counted in validations (``train.val_every`` steps each);
    ``reduction_factor`` is the fraction (1 / factor) of trials promoted per rung.
    """

    kind: Literal["none", "successive_halving", "hyperband"] = "none"
    min_resource: PositiveInt = 1
    reduction_factor: Annotated[int, Field(ge=2)] = 3


class ExecutorConfig(StrictModel):
    """Where the workers run: a SLURM job array (one Optuna worker per array task) or here.

    ``time_min`` and ``mem_gb`` are per array task, in minutes and GiB; after an
    out-of-memory or time-limit end a retried trial gets ``retry_scale`` times more.
    ``tasks_per_node`` > 1 makes each trial a DDP/DeepSpeed run over the job's tasks.
    ``max_array_size`` ``None`` reads SLURM's ``MaxArraySize`` from ``scontrol show config``.
    ``signal_delay_s`` is how long before the time limit the job is signalled to checkpoint.
    """

    kind: Literal["slurm", "local"] = "slurm"
    workers: PositiveInt = 2
    parallelism: PositiveInt | None = None
    partition: str | None = None
    time_min: PositiveInt = 60
    cpus_per_task: PositiveInt = 1
    gpus_per_task: Annotated[int, Field(ge=0)] = 0
    mem_gb: PositiveFloat = 4.0
    nodes: PositiveInt = 1
    tasks_per_node: PositiveInt = 1
    max_array_size: PositiveInt | None = None
    max_retries: Annotated[int, Field(ge=0)] = 2
    retry_scale: Annotated[float, Field(gt=1, allow_inf_nan=False)] = 2.0
    signal_delay_s: PositiveInt = 90


class SweepConfig(StrictModel):
    """Top level of ``hpcdeconv sweep``.

    ``base`` is a training configuration YAML (relative to the working directory;
    ``None``: the built-in defaults); ``overrides`` (``dotted.key=value``) apply to it
    before each trial's parameters. ``parameters`` maps dotted paths of the training
    configuration to their spaces, in the order they are varied. ``storage`` ``None``
    keeps the Optuna study in a journal file in the sweep directory ``output``; else an
    ``sqlite:///...`` or ``postgresql://...`` URL.
    """

    base: Path | None = None
    overrides: list[str] = Field(default_factory=list)
    parameters: dict[str, ParameterSpace]
    search: SearchConfig = Field(default_factory=SearchConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    pruner: PrunerConfig = Field(default_factory=PrunerConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    storage: str | None = None
    output: Path = Path("sweeps/sweep")

    @field_validator("parameters")
    @classmethod
    def _paths(cls, value: dict[str, ParameterSpace]) -> dict[str, ParameterSpace]:
        if not value:
            raise ValueError("no parameters to sweep: give at least one dotted path")
        for path in value:
            if not _DOTTED_PATH.fullmatch(path):
                raise ValueError(f"parameter {path!r} is not a dotted path such as optim.lr")
        # A path inside another one would override it in declaration order: ambiguous.
        for path in value:
            for other in value:
                if other.startswith(path + "."):
                    raise ValueError(f"parameters {path!r} and {other!r} overlap")
        return value
