"""The Optuna study of a sweep: storage, sampler and pruner from the sweep configuration.

Optuna does the search (samplers, pruners, storage); this module only maps the sweep
configuration onto it. The default storage is a ``JournalStorage`` with a file backend in
the sweep directory: array tasks on many nodes coordinate through the shared filesystem,
with no database server. ``storage:`` may name an SQLite or PostgreSQL URL instead.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from hpcdeconv.errors import ConfigError, InputError

if TYPE_CHECKING:
    import optuna

    from hpcdeconv.sweep.config import PrunerConfig, SweepConfig
    from hpcdeconv.sweep.layout import SweepLayout

#: The one study a sweep directory holds.
STUDY_NAME = "sweep"


def open_storage(cfg: SweepConfig, layout: SweepLayout) -> optuna.storages.BaseStorage:
    """The study's storage: the sweep's journal file, or ``cfg.storage`` (a database URL).

    Raises
    ------
    ConfigError
        ``cfg.storage`` is not a URL Optuna's RDB storage accepts.
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if cfg.storage is None:
        return JournalStorage(JournalFileBackend(str(layout.journal)))
    try:
        return optuna.storages.RDBStorage(cfg.storage)
    except Exception as exc:  # sqlalchemy raises many kinds for a bad URL
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"storage {cfg.storage!r} cannot be opened ({first})") from None


def build_sampler(cfg: SweepConfig, trial_seed: int = 0) -> optuna.samplers.BaseSampler:
    """Optuna's sampler for ``cfg.search``, seeded by ``search.seed`` and ``trial_seed``.

    Workers ask for trials concurrently, each with its own sampler: seeded alike they would
    draw the same parameters. The worker therefore builds a sampler for every trial it
    asks for, with ``trial_seed`` the number of trials in the study at that moment (under
    the ask lock, so no two trials share it, and a requeued worker does not repeat its draws).

    A grid's points are enqueued in the study when the sweep starts (every parameter
    fixed), so workers take them one by one and none twice; the sampler behind them is
    never asked. Optuna's ``GridSampler`` is not used: it picks points itself, may give
    two concurrent workers the same one, and calls ``study.stop()`` after the last, which
    raises outside ``study.optimize``.
    """
    import optuna

    seed = cfg.search.seed + 7919 * trial_seed
    if cfg.search.sampler in ("grid", "random"):
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def build_pruner(cfg: PrunerConfig) -> optuna.pruners.BasePruner:
    """Optuna's pruner; its resource unit is one validation (``train.val_every`` steps).

    Successive halving (Jamieson & Talwalkar 2016, asynchronous form of Li et al. 2020) and
    Hyperband (Li et al. 2018) as Optuna implements them.
    """
    import optuna

    if cfg.kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=cfg.min_resource, reduction_factor=cfg.reduction_factor
        )
    if cfg.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=cfg.min_resource, reduction_factor=cfg.reduction_factor
        )
    return optuna.pruners.NopPruner()


def open_study(
    cfg: SweepConfig,
    layout: SweepLayout,
    *,
    create: bool = False,
) -> optuna.Study:
    """The sweep's study, created when ``create``.

    Raises
    ------
    InputError
        The study does not exist in the storage (and ``create`` is false).
    """
    import optuna

    # Optuna logs every trial at INFO; the sweep reports its own progress.
    optuna.logging.set_verbosity(logging.WARNING)
    storage = open_storage(cfg, layout)
    direction = cfg.objective.direction
    sampler = build_sampler(cfg)
    pruner = build_pruner(cfg.pruner)
    if create:
        return optuna.create_study(
            storage=storage,
            study_name=STUDY_NAME,
            direction=direction,
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )
    try:
        return optuna.load_study(
            storage=storage, study_name=STUDY_NAME, sampler=sampler, pruner=pruner
        )
    except KeyError:
        raise InputError(f"{layout.root} holds no Optuna study named {STUDY_NAME!r}") from None
