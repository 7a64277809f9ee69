"""The results of a sweep: a ranked table of its trials and the best trial's configuration.

:func:`collect` reads the Optuna study and each trial's training run directory and writes
``results/table.csv``, ``results/table.md`` and ``results/best.yaml``. It may run at any
time, also while workers train: trials still running are scored from their
``metrics.jsonl`` so far, a trial without a run directory or metrics gets empty cells, and a
half-written last line of ``metrics.jsonl`` is skipped. Every file is written to a temporary
name and renamed into place, so a reader never sees a partial table.

The objective (metric, direction, best or final value) is passed in as plain arguments:
this module reads no sweep configuration.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcdeconv.errors import ConfigError
from hpcdeconv.sweep import layout as keys
from hpcdeconv.sweep.config import decode_value
from hpcdeconv.sweep.layout import SweepLayout

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

#: The ``kind`` of the ``metrics.jsonl`` records the objective is read from.
VAL_KIND = "val"
#: The directory ``results/best.yaml`` trains into, under the sweep directory.
BEST_RUN = "best-run"
#: Longest error message shown in the Markdown table (the CSV keeps it whole).
MD_ERROR_CHARS = 60


@dataclass(frozen=True)
class TrialRow:
    """One trial of the table.

    ``objective`` is Optuna's value for a complete trial and, for the others, the same
    quantity (best or final of the objective metric) computed from ``metrics.jsonl`` so
    far. ``best`` and ``final`` are the best and the last value of the objective metric
    over the trial's validation records. Unknown quantities are ``None``.
    """

    number: int
    state: str
    params: dict[str, Any]
    objective: float | None
    best: float | None
    final: float | None
    steps: int | None
    wall_s: float | None
    gpu_hours: float | None
    retries: int
    pruned_at: int | None
    error: str | None
    run_dir: str | None
    log: str | None = None

    @staticmethod
    def columns(metric: str, param_names: Sequence[str]) -> list[str]:
        """The table's column names, in the order of :meth:`cells`."""
        head = ["number", "state", *param_names, "objective", f"best_{metric}"]
        tail = ["steps", "wall_s", "gpu_hours", "retries", "pruned_at", "error", "run_dir"]
        tail.append("log")
        return [*head, f"final_{metric}", *tail]

    def cells(self, param_names: Sequence[str]) -> list[Any]:
        """The row's values under :meth:`columns`."""
        params = [self.params.get(name) for name in param_names]
        return [
            *(self.number, self.state, *params, self.objective, self.best, self.final),
            *(self.steps, self.wall_s, self.gpu_hours, self.retries, self.pruned_at),
            *(self.error, self.run_dir, self.log),
        ]


@dataclass(frozen=True)
class CollectedResults:
    """What :func:`collect` found and wrote.

    ``rows`` are sorted best first; ``best_number`` is the best complete trial (``None``
    when no trial has completed), ``best_yaml`` its configuration (``None`` when not
    written).
    """

    rows: list[TrialRow]
    table_csv: Path
    table_md: Path
    best_yaml: Path | None
    best_number: int | None
    written: list[Path]


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl``; ``[]`` when it is missing or unreadable.

    Lines that are not JSON objects are skipped: the last one may be half-written by a
    training still running.
    """
    path = run_dir / "metrics.jsonl"
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("%s cannot be read (%s); its trial has no metrics", path, exc)
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _number(value: Any) -> float | None:
    """``value`` as a float, ``None`` for what is not a number (bools, strings, null)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def best_and_final(values: Sequence[float], direction: str) -> tuple[float | None, float | None]:
    """The best finite value of ``values`` in ``direction`` and the last value."""
    finite = [v for v in values if math.isfinite(v)]
    best = (max if direction == "maximize" else min)(finite) if finite else None
    return best, (values[-1] if values else None)


def _run_dir(layout: SweepLayout, attr: Any) -> Path | None:
    """The trial's run directory: the ``RUN_DIR`` attribute, taken relative to the sweep
    directory when it is relative and exists there, else as given."""
    if not isinstance(attr, str) or not attr:
        return None
    path = Path(attr)
    if not path.is_absolute() and (layout.root / path).is_dir():
        return layout.root / path
    return path


def _trial_row(
    layout: SweepLayout,
    trial: optuna.trial.FrozenTrial,
    *,
    metric: str,
    direction: str,
    value: str,
    param_names: Sequence[str],
    superseded: bool = False,
) -> TrialRow:
    attrs = trial.user_attrs
    decoded = attrs.get(keys.PARAMS)
    if isinstance(decoded, dict):
        source = decoded
    elif trial.params:
        source = trial.params
    else:
        # A queued trial (grid point, retry): its parameters are fixed but not yet set;
        # categorical values are stored in their encoded (YAML) form.
        fixed = trial.system_attrs.get("fixed_params") or {}
        source = {k: decode_value(v) if isinstance(v, str) else v for k, v in fixed.items()}
    params = {name: source.get(name) for name in param_names}

    run_dir = _run_dir(layout, attrs.get(keys.RUN_DIR))
    records = read_records(run_dir) if run_dir is not None and not superseded else []
    scores = [
        v
        for r in records
        if r.get("kind") == VAL_KIND and (v := _number(r.get(metric))) is not None
    ]
    best, final = best_and_final(scores, direction)
    if not scores and trial.intermediate_values:
        # No metrics file (yet) but the worker reported validations to Optuna.
        reported = [v for _, v in sorted(trial.intermediate_values.items())]
        best, final = best_and_final(reported, direction)

    if trial.state.name == "COMPLETE" and trial.value is not None:
        objective: float | None = float(trial.value)
    else:
        objective = best if value == "best" else final

    # Train records come every log_every steps and validations every val_every: the
    # furthest step of any record is the best lower bound while the trial runs; the
    # worker's STEPS is exact once it wrote it.
    steps_seen = [int(s) for r in records if (s := _number(r.get("step"))) is not None]
    steps_attr = _number(attrs.get(keys.STEPS))
    candidates = steps_seen + ([int(steps_attr)] if steps_attr is not None else [])
    pruned_at = _number(attrs.get(keys.PRUNED_AT))
    retries = _number(attrs.get(keys.RETRIES))
    error = attrs.get(keys.ERROR)
    return TrialRow(
        number=trial.number,
        state=trial.state.name,
        params=params,
        objective=objective,
        best=best,
        final=final,
        steps=max(candidates) if candidates else None,
        wall_s=_number(attrs.get(keys.WALL_S)),
        log=attrs.get(keys.LOG) or None,
        gpu_hours=_number(attrs.get(keys.GPU_HOURS)),
        retries=int(retries) if retries is not None else 0,
        pruned_at=int(pruned_at) if pruned_at is not None else None,
        error=str(error) if error is not None else None,
        run_dir=str(run_dir) if run_dir is not None else None,
    )


def sort_rows(rows: Sequence[TrialRow], direction: str) -> list[TrialRow]:
    """``rows`` best objective first; rows without a finite objective last; ties (and the
    rows without a value) by trial number."""
    sign = -1.0 if direction == "maximize" else 1.0

    def key(row: TrialRow) -> tuple[int, float, int]:
        if _finite(row.objective):
            return (0, sign * row.objective, row.number)  # type: ignore[operator]
        return (1, 0.0, row.number)

    return sorted(rows, key=key)


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary name next to ``path``, then rename it to ``path``.

    The temporary name carries the process id: two collectors running at once never
    write the same file, and readers only ever see a whole file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_text(path: Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def format_param(value: Any) -> str:
    """A value as text a ``--set key=value`` override accepts (YAML flow); floats at full
    precision (``str`` of a float round-trips), ``""`` for ``None``."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return json.dumps(value)


def table_csv(rows: Sequence[TrialRow], metric: str, param_names: Sequence[str]) -> str:
    """The table as CSV: floats at full precision, lists as JSON, empty cells for unknowns."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(TrialRow.columns(metric, param_names))
    for row in rows:
        writer.writerow([format_param(v) for v in row.cells(param_names)])
    return out.getvalue()


def _md_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, bool | int):
        return format_param(value)
    # One table line per trial: newlines in an error message are folded.
    text = " ".join(value.split()) if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|")


def table_markdown(
    rows: Sequence[TrialRow], metric: str, param_names: Sequence[str], heading: str
) -> str:
    """The table as Markdown: ``heading``, a count of the trials by state, one table line
    per trial; numbers to 4 significant digits, errors cut to :data:`MD_ERROR_CHARS`."""
    counts = Counter(r.state.lower() for r in rows)
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none yet"
    lines = [heading, "", f"{len(rows)} trial(s): {summary}.", ""]
    names = TrialRow.columns(metric, param_names)
    lines.append("| " + " | ".join(_md_cell(n) for n in names) + " |")
    lines.append("|" + "|".join("---" for _ in names) + "|")
    for row in rows:
        error = row.error
        if error is not None and len(error) > MD_ERROR_CHARS:
            row = replace(row, error=error[: MD_ERROR_CHARS - 1] + "…")
        lines.append("| " + " | ".join(_md_cell(c) for c in row.cells(param_names)) + " |")
    return "\n".join(lines) + "\n"


def write_best_config(layout: SweepLayout, row: TrialRow) -> Path | None:
    """``results/best.yaml``: the trial's resolved training configuration with ``output``
    set to ``SWEEP/best-run`` (absolute), ready for ``hpcdeconv train --config``.

    Returns ``None`` (and logs why) when the trial's ``config.yaml`` is missing or no
    longer a valid training configuration.
    """
    from hpcdeconv.config import ExperimentConfig, dump_config, load_config
    from hpcdeconv.errors import HpcdeconvError

    if row.run_dir is None:
        log.warning("best trial %d has no run directory: best.yaml not written", row.number)
        return None
    source = Path(row.run_dir) / "config.yaml"
    try:
        config = load_config(ExperimentConfig, source)
    except HpcdeconvError as exc:
        log.warning("best trial %d: %s; best.yaml not written", row.number, exc)
        return None
    # The trial ran with the sweep's requeue owner (submitit, or none locally); trained on
    # its own the best config requeues itself as any training does.
    train = config.train.model_copy(update={"requeue": "trainer"})
    best = config.model_copy(update={"output": (layout.root / BEST_RUN).resolve(), "train": train})
    return write_atomic(layout.results / "best.yaml", lambda tmp: dump_config(best, tmp))


def collect(
    layout: SweepLayout,
    study: optuna.Study,
    *,
    metric: str,
    direction: str,
    value: str,
    param_names: list[str],
) -> CollectedResults:
    """Rank the sweep's trials and write ``results/table.csv``, ``results/table.md`` and
    (once a trial has completed) ``results/best.yaml``.

    Parameters
    ----------
    layout
        The sweep directory.
    study
        Its Optuna study (read only).
    metric
        The objective: a score key of the ``"val"`` records of ``metrics.jsonl``.
    direction
        ``"maximize"`` or ``"minimize"``.
    value
        ``"best"`` or ``"final"``: which value of the metric a trial that has not
        completed is ranked by (completed trials by Optuna's value).
    param_names
        The searched parameters (dotted paths), one column each.

    Returns
    -------
    CollectedResults
        The rows best first, the files written and the best complete trial.

    Raises
    ------
    ConfigError
        ``direction`` or ``value`` is not one of the values above.
    OSError
        ``results/`` cannot be written.
    """
    if direction not in ("maximize", "minimize"):
        raise ConfigError(f"objective direction {direction!r} is not one of maximize, minimize")
    if value not in ("best", "final"):
        raise ConfigError(f"objective value {value!r} is not one of best, final")
    trials = study.get_trials(deepcopy=False)
    # A retry continues its dead attempt's run directory: its metrics are the retry's.
    latest: dict[str, int] = {}
    for t in trials:
        if keys.RUN_DIR in t.user_attrs:
            latest[str(t.user_attrs[keys.RUN_DIR])] = t.number
    rows = [
        _trial_row(
            layout,
            t,
            metric=metric,
            direction=direction,
            value=value,
            param_names=param_names,
            superseded=latest.get(str(t.user_attrs.get(keys.RUN_DIR)), t.number) != t.number,
        )
        for t in trials
    ]
    rows = sort_rows(rows, direction)
    csv_path = _write_text(layout.results / "table.csv", table_csv(rows, metric, param_names))
    heading = (
        f"# Sweep {layout.root.name}\n\n"
        f"Objective: {value} validation {metric} ({direction}); best first."
    )
    md = table_markdown(rows, metric, param_names, heading)
    md_path = _write_text(layout.results / "table.md", md)
    written = [csv_path, md_path]

    best_row = next((r for r in rows if r.state == "COMPLETE" and _finite(r.objective)), None)
    best_yaml = write_best_config(layout, best_row) if best_row is not None else None
    if best_yaml is not None:
        written.append(best_yaml)
    return CollectedResults(
        rows=rows,
        table_csv=csv_path,
        table_md=md_path,
        best_yaml=best_yaml,
        best_number=best_row.number if best_row is not None else None,
        written=written,
    )
