"""``hpcdeconv sweep``: hyperparameter sweeps as SLURM job arrays (or local workers)."""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from hpcdeconv.commands.common import add_config_args

if TYPE_CHECKING:
    import optuna

    from hpcdeconv.sweep.config import SweepConfig
    from hpcdeconv.sweep.layout import SweepLayout

NAME = "sweep"
HELP = "hyperparameter sweep: Optuna trials as a SLURM job array, results table and plots"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``hpcdeconv sweep``."""
    add_config_args(p)
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--collect",
        type=Path,
        metavar="SWEEP_DIR",
        help="write the results table, best config and plots of a sweep (also while it runs)",
    )
    what.add_argument(
        "--resume",
        type=Path,
        metavar="SWEEP_DIR",
        help="retry dead trials, start workers for what is left, and wait for the sweep",
    )
    p.add_argument(
        "--executor",
        choices=["slurm", "local"],
        help="SLURM job array (default: executor.kind) or worker processes on this machine",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the trials (grid) or the space and budget, and the job parameters; "
        "submit nothing",
    )
    p.add_argument(
        "--detach",
        action="store_true",
        help="return once the workers are submitted instead of watching the sweep to its end",
    )
    p.add_argument(
        "--poll",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how often the watching command checks the workers (default 10)",
    )


def run(args: argparse.Namespace) -> int:
    """Start, resume or collect a sweep."""
    from hpcdeconv.errors import ConfigError

    if args.collect is not None or args.resume is not None:
        verb = "--collect" if args.collect is not None else "--resume"
        mixed = [
            flag
            for flag, given in [
                ("--config", args.config is not None),
                ("--set", bool(args.set)),
                ("--dry-run", args.dry_run),
                ("--executor", args.collect is not None and args.executor is not None),
            ]
            if given
        ]
        if mixed:
            raise ConfigError(
                f"{verb} takes a sweep directory and works from its sweep.yaml; "
                f"{', '.join(mixed)} cannot be combined with it"
            )
    if args.collect is not None:
        return _collect(args.collect)
    if args.resume is not None:
        return _resume(args)
    if args.config is None:
        raise ConfigError("give --config SWEEP.yaml, --resume SWEEP_DIR or --collect SWEEP_DIR")
    return _start(args)


def _start(args: argparse.Namespace) -> int:
    from hpcdeconv.config import dump_config, load_config
    from hpcdeconv.data.safety import check_outputs
    from hpcdeconv.errors import OutputExistsError
    from hpcdeconv.sweep.config import SweepConfig
    from hpcdeconv.sweep.layout import SweepLayout
    from hpcdeconv.sweep.space import budget, check_parameters, describe, encoded_grid
    from hpcdeconv.sweep.study import open_study
    from hpcdeconv.sweep.submit import check_slurm_reachable, job_parameters

    cfg = load_config(SweepConfig, args.config, args.set)
    if args.executor is not None:
        executor_cfg = cfg.executor.model_copy(update={"kind": args.executor})
        cfg = cfg.model_copy(update={"executor": executor_cfg})
    base = check_parameters(cfg)
    executor = cfg.executor.kind
    workers = min(cfg.executor.workers, budget(cfg))
    if args.dry_run:
        jobs = job_parameters(cfg.executor) if executor == "slurm" else {"executor": "local"}
        print(describe(cfg, {**jobs, "workers": workers}))
        return 0
    layout = SweepLayout(cfg.output)
    if layout.is_sweep():
        raise OutputExistsError(
            f"{cfg.output} holds a sweep already; continue it with "
            f"hpcdeconv sweep --resume {cfg.output}"
        )
    inputs = [("sweep config", args.config), ("base", cfg.base), ("data.path", base.data.path)]
    check_outputs([("output", cfg.output, "run")], inputs, overwrite=False)
    if executor == "slurm":
        # Before anything is made: an unreachable cluster leaves no directory behind.
        check_slurm_reachable()
    layout.root.mkdir(parents=True)
    dump_config(cfg, layout.config)
    grid = encoded_grid(cfg) if cfg.search.sampler == "grid" else None
    study = open_study(cfg, layout, create=True)
    if grid is not None:
        # Every grid point waits in the study: workers take them one by one, none twice.
        for point in itertools.islice(itertools.product(*grid.values()), budget(cfg)):
            study.enqueue_trial(dict(zip(grid, point, strict=True)))
    return _submit_and_watch(args, cfg, layout, study, workers, executor)


def _resume(args: argparse.Namespace) -> int:
    from hpcdeconv.sweep.layout import SweepLayout
    from hpcdeconv.sweep.monitor import live_workers, retry_dead, unfinished

    layout = SweepLayout(args.resume).require()
    cfg, study = _open(layout)
    retry_dead(study, cfg, layout)
    left = unfinished(study, cfg)
    executor = args.executor or cfg.executor.kind
    if left and not live_workers(layout):
        return _submit_and_watch(
            args, cfg, layout, study, min(cfg.executor.workers, left), executor
        )
    print(f"sweep {layout.root}: {left} trial(s) left")
    return _watch_and_collect(args, cfg, layout, study)


def _submit_and_watch(
    args: argparse.Namespace,
    cfg: SweepConfig,
    layout: SweepLayout,
    study: optuna.Study,
    workers: int,
    executor: str,
) -> int:
    from hpcdeconv.sweep.space import budget
    from hpcdeconv.sweep.submit import submit_workers

    subs = submit_workers(layout, cfg.executor, list(range(workers)), executor=executor)
    jobs = ", ".join(s.job_id for s in subs)
    print(f"sweep {layout.root}: {budget(cfg)} trial(s), {workers} worker(s) ({executor}: {jobs})")
    return _watch_and_collect(args, cfg, layout, study)


def _watch_and_collect(
    args: argparse.Namespace, cfg: SweepConfig, layout: SweepLayout, study: optuna.Study
) -> int:
    from hpcdeconv.sweep.monitor import watch

    if args.detach:
        print(f"detached; collect with: hpcdeconv sweep --collect {layout.root}")
        return 0
    left = watch(study, cfg, layout, poll_s=args.poll)
    _collect(layout.root)
    if left:
        # The table shows what ran; the exit status tells a script the sweep is not done.
        # Exit 1, not the 2 of a user error: nothing was wrong with the command.
        sys.stderr.write(
            f"hpcdeconv sweep: error: {left} trial(s) left and no worker running; "
            f"continue with: hpcdeconv sweep --resume {layout.root}\n"
        )
        return 1
    return 0


def _open(layout: SweepLayout) -> tuple[SweepConfig, optuna.Study]:
    from hpcdeconv.config import load_config
    from hpcdeconv.sweep.config import SweepConfig
    from hpcdeconv.sweep.study import open_study

    cfg = load_config(SweepConfig, layout.config)
    return cfg, open_study(cfg, layout)


def _collect(root: Path) -> int:
    from hpcdeconv.sweep.layout import SweepLayout
    from hpcdeconv.sweep.plots import write_plots
    from hpcdeconv.sweep.results import collect

    layout = SweepLayout(root).require()
    cfg, study = _open(layout)
    objective = cfg.objective
    names = list(cfg.parameters)
    results = collect(
        layout,
        study,
        metric=objective.metric,
        direction=objective.direction,
        value=objective.value,
        param_names=names,
    )
    plots = write_plots(
        layout,
        study,
        results.rows,
        metric=objective.metric,
        direction=objective.direction,
        param_names=names,
    )
    print(results.table_md.read_text().rstrip())
    print(f"table: {results.table_csv}, {results.table_md}")
    if results.best_yaml is not None:
        print(f"best config: {results.best_yaml} (hpcdeconv train --config it)")
    print(f"plots: {len(plots)} in {layout.results / 'plots'}")
    return 0
