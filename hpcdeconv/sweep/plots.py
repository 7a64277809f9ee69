"""Figures of a sweep (PNG, offline): objective against each parameter, parallel
coordinates, intermediate validation curves with pruned trials marked, parameter importance.

Drawn with matplotlib's object API on the Agg canvas (as :mod:`hpcdeconv.viz`), imported
inside the functions: no pyplot state, no display, nothing loaded until a figure is drawn.
A figure without data (no trial scored yet, no validation reported) is skipped, not an
error, so plots can be made at any time of a sweep.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcdeconv.sweep.layout import SweepLayout
from hpcdeconv.sweep.results import TrialRow, format_param, write_atomic

if TYPE_CHECKING:
    import optuna
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

#: Values spanning more than this ratio are drawn on a log axis.
LOG_SPAN = 100.0
#: Marker and line style of each trial state.
_MARKERS = {"COMPLETE": "o", "PRUNED": "x", "FAIL": "v", "RUNNING": "^", "WAITING": "s"}
_LINES = {"COMPLETE": "-", "PRUNED": "--", "FAIL": "-.", "RUNNING": ":", "WAITING": ":"}


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    from hpcdeconv.data.safety import SOFTWARE

    return write_atomic(
        path,
        lambda tmp: fig.savefig(tmp, format="png", dpi=120, metadata={"Software": SOFTWARE}),
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _scored(rows: Sequence[TrialRow]) -> list[TrialRow]:
    return [r for r in rows if r.objective is not None and math.isfinite(r.objective)]


def _axis(values: Sequence[Any]) -> tuple[str, list[str]]:
    """How a parameter's values are drawn: ``("log" | "linear", [])`` for numbers,
    ``("category", labels)`` otherwise (labels in order of first appearance)."""
    if values and all(_is_number(v) for v in values):
        low, high = min(values), max(values)
        if low > 0 and high / low > LOG_SPAN:
            return "log", []
        return "linear", []
    labels: list[str] = []
    for value in values:
        label = format_param(value)
        if label not in labels:
            labels.append(label)
    return "category", labels


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def objective_vs_param(
    rows: Sequence[TrialRow], name: str, *, metric: str, direction: str
) -> Figure | None:
    """Scatter of the objective against parameter ``name``, one marker per trial state;
    ``None`` when no scored trial has the parameter."""
    points = [r for r in _scored(rows) if r.params.get(name) is not None]
    if not points:
        return None
    kind, labels = _axis([r.params[name] for r in points])
    fig = _figure(5.0, 3.6)
    ax = fig.add_subplot()
    for state in sorted({r.state for r in points}):
        mine = [r for r in points if r.state == state]
        xs = [
            labels.index(format_param(r.params[name])) if kind == "category" else r.params[name]
            for r in mine
        ]
        ax.scatter(
            xs, [r.objective for r in mine], marker=_MARKERS.get(state, "o"), label=state.lower()
        )
    complete = [r for r in points if r.state == "COMPLETE"]
    if complete:
        best = (max if direction == "maximize" else min)(complete, key=lambda r: r.objective)
        x = labels.index(format_param(best.params[name])) if kind == "category" else None
        ax.scatter(
            [best.params[name] if x is None else x],
            [best.objective],
            marker="*",
            s=220,
            facecolors="none",
            edgecolors="red",
            label=f"best (trial {best.number})",
        )
    if kind == "log":
        ax.set_xscale("log")
    if kind == "category":
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_xlim(-0.5, len(labels) - 0.5)
    ax.set_xlabel(name)
    ax.set_ylabel(f"{metric} ({direction})")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return fig


def _normalised(values: Sequence[Any]) -> tuple[list[float], list[tuple[float, str]]]:
    """Values mapped to [0, 1] (nan where missing) and the axis labels as (position,
    text): every category, or the two ends of a numeric range."""
    present = [v for v in values if v is not None]
    kind, labels = _axis(present)
    if kind == "category":
        span = max(len(labels) - 1, 1)
        out = [math.nan if v is None else labels.index(format_param(v)) / span for v in values]
        return out, [(i / span, label) for i, label in enumerate(labels)]
    log = kind == "log"
    scaled = [math.nan if v is None else (math.log10(v) if log else float(v)) for v in values]
    finite = [v for v in scaled if math.isfinite(v)]
    if not finite:
        return [math.nan for _ in values], []
    low, high = min(finite), max(finite)
    span = high - low
    out = [(v - low) / span if span > 0 else 0.5 for v in scaled]
    lo, hi = (10**low, 10**high) if log else (low, high)
    return out, [(0.0, f"{lo:.4g}"), (1.0, f"{hi:.4g}")] if span > 0 else [(0.5, f"{lo:.4g}")]


def parallel_coordinates(
    rows: Sequence[TrialRow], param_names: Sequence[str], *, metric: str, direction: str
) -> Figure | None:
    """One line per scored trial across the parameters and the objective, each axis
    normalised to its range (log for values spanning decades, categories evenly), coloured
    by the objective (brighter is better); ``None`` when no trial is scored."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    scored = _scored(rows)
    if not scored or not param_names:
        return None
    names = [*param_names, metric]
    columns = [_normalised([r.params.get(n) for r in scored]) for n in param_names]
    columns.append(_normalised([r.objective for r in scored]))
    objectives = [r.objective for r in scored]
    norm = Normalize(min(objectives), max(objectives))  # type: ignore[type-var]
    cmap = "viridis" if direction == "maximize" else "viridis_r"
    mappable = ScalarMappable(norm=norm, cmap=cmap)
    fig = _figure(max(5.0, 1.6 * len(names)), 4.0)
    ax = fig.add_subplot()
    xs = list(range(len(names)))
    # Worst first, so the best lines are drawn on top.
    order = sorted(range(len(scored)), key=lambda i: objectives[i], reverse=direction != "maximize")
    for i in order:
        ys = [col[0][i] for col in columns]
        ax.plot(xs, ys, color=mappable.to_rgba(objectives[i]), alpha=0.8, lw=1.5)
    for x, (_, ticks) in zip(xs, columns, strict=True):
        ax.axvline(x, color="0.6", lw=0.8)
        for y, text in ticks:
            ax.text(x + 0.03, y, text, ha="left", va="center", fontsize="x-small")
    ax.set_xticks(xs, names, rotation=20, ha="right")
    ax.set_yticks([])
    ax.set_ylim(-0.06, 1.06)
    ax.set_xlim(-0.2, len(names) - 0.5)
    fig.colorbar(mappable, ax=ax, label=f"{metric} ({direction})")
    return fig


def intermediate_curves(
    trials: Sequence[optuna.trial.FrozenTrial], *, metric: str
) -> Figure | None:
    """Reported validation values against the training step, one line per trial (labelled
    with its number at its last point); pruned trials dashed with a cross at the step they
    were stopped; ``None`` when no trial reported."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    reported = [t for t in trials if t.intermediate_values]
    if not reported:
        return None
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot()
    for trial in reported:
        steps = sorted(trial.intermediate_values)
        values = [trial.intermediate_values[s] for s in steps]
        state = trial.state.name
        (line,) = ax.plot(steps, values, ls=_LINES.get(state, "-"), marker=".", lw=1.2)
        if state == "PRUNED":
            ax.plot(steps[-1], values[-1], "x", ms=10, mew=2, color=line.get_color())
        ax.annotate(
            str(trial.number),
            (steps[-1], values[-1]),
            xytext=(6, 3),
            textcoords="offset points",
            fontsize="x-small",
            color=line.get_color(),
        )
    states = sorted({t.state.name for t in reported})
    handles = [
        Line2D([], [], color="0.3", ls=_LINES.get(s, "-"), marker="x" if s == "PRUNED" else None)
        for s in states
    ]
    ax.legend(handles, [s.lower() for s in states], fontsize="small")
    ax.set_xlabel("training step")
    # Steps are whole numbers: no 3.5 ticks on a short run.
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"validation {metric}")
    ax.grid(alpha=0.3)
    return fig


def importance(study: optuna.Study) -> Figure | None:
    """Bar chart of Optuna's parameter importances over the complete trials; ``None``
    (with the reason logged) below two complete trials or when Optuna cannot rank them."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        log.info("parameter importance skipped: %d complete trial(s), needs 2", len(complete))
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's experimental / few-trials warnings
            found = optuna.importance.get_param_importances(study)
    except Exception as exc:  # Optuna raises several kinds for spaces it cannot rank
        log.info("parameter importance skipped: %s", str(exc).splitlines()[0] if str(exc) else exc)
        return None
    if not found:
        log.info("parameter importance skipped: no parameter varies over the complete trials")
        return None
    names = list(found)[::-1]  # most important on top
    fig = _figure(5.0, 1.0 + 0.4 * len(names))
    ax = fig.add_subplot()
    ax.barh(names, [found[n] for n in names])
    ax.set_xlabel(f"importance ({len(complete)} complete trials)")
    return fig


def write_plots(
    layout: SweepLayout,
    study: optuna.Study,
    rows: Sequence[TrialRow],
    *,
    metric: str,
    direction: str,
    param_names: Sequence[str],
) -> list[Path]:
    """Draw the sweep's figures into ``results/plots/``.

    Parameters
    ----------
    layout
        The sweep directory.
    study
        Its Optuna study (intermediate values, importances).
    rows
        The table of :func:`hpcdeconv.sweep.results.collect`.
    metric, direction
        The objective metric (axis labels) and ``"maximize"`` or ``"minimize"``.
    param_names
        The searched parameters (dotted paths).

    Returns
    -------
    list of Path
        The PNG files written: ``objective_vs_<param>.png`` per parameter,
        ``parallel_coordinates.png``, ``intermediate_values.png``,
        ``param_importance.png``; figures without data are left out.

    Raises
    ------
    OSError
        ``results/plots/`` cannot be written.
    """
    out = layout.results / "plots"
    figures: list[tuple[str, Figure | None]] = [
        (
            f"objective_vs_{_safe_name(name)}.png",
            objective_vs_param(rows, name, metric=metric, direction=direction),
        )
        for name in param_names
    ]
    figures.append(
        (
            "parallel_coordinates.png",
            parallel_coordinates(rows, param_names, metric=metric, direction=direction),
        )
    )
    trials = study.get_trials(deepcopy=False)
    figures.append(("intermediate_values.png", intermediate_curves(trials, metric=metric)))
    figures.append(("param_importance.png", importance(study)))
    written = []
    for filename, fig in figures:
        if fig is None:
            log.debug("plot %s skipped: no data", filename)
            continue
        written.append(_save(fig, out / filename))
    return written
