"""The training loop: AMP, validation, atomic checkpoints, resume, logging.

Knows the :class:`~hpcdeconv.methods.base.Method` contract, the
:class:`~hpcdeconv.training.feed.Feed` interface and the
:class:`~hpcdeconv.training.strategy.Strategy` interface, nothing of any particular
method, kind of data or strategy. The run directory (:mod:`~hpcdeconv.training.rundir`),
the per-step agreement of the ranks (:mod:`~hpcdeconv.training.agreement`) and
validation (:mod:`~hpcdeconv.training.evaluation`) each live in their own module.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from hpcdeconv import __version__
from hpcdeconv.config import ExperimentConfig, dump_config
from hpcdeconv.errors import ConfigError, InputError
from hpcdeconv.methods import build_method
from hpcdeconv.methods.base import Artefact, Method
from hpcdeconv.training.agreement import (
    ValidationHook,
    agree_on_hook,
    agree_on_step,
    check_weights_finite,
)
from hpcdeconv.training.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from hpcdeconv.training.ema import GeneratorEMA
from hpcdeconv.training.evaluation import Evaluator
from hpcdeconv.training.feed import make_feed
from hpcdeconv.training.launch import build_strategy
from hpcdeconv.training.loss_networks import place_loss_networks
from hpcdeconv.training.preemption import StopRequest, requeue_slurm_job
from hpcdeconv.training.rank_state import load_rank_state, prune_rank_states, save_rank_state
from hpcdeconv.training.reporting import RunReporter
from hpcdeconv.training.resume import check_checkpoint
from hpcdeconv.training.rng import capture_rng_state, restore_rng_state
from hpcdeconv.training.rundir import RunDirectory, check_precision, seed_everything
from hpcdeconv.training.selection import best_tracker
from hpcdeconv.training.strategy import Strategy

log = logging.getLogger(__name__)

#: 2: per-rank state (history pools, random streams) of every rank, and the world size.
#: The ``artefact`` record (kind, key, how to rebuild its network) came later without a
#: new number: a checkpoint without it is read as an image-to-image ``"deblur"`` one.
CHECKPOINT_FORMAT = 2
#: Top-level checkpoint keys the engine writes; an artefact's key must be another.
_ENGINE_KEYS = frozenset(
    {"format", "version", "method", "config", "step", "world_size", "groups", "artefact"}
    | {"ema", "best", "feed", "method_state", "rng"}
)


@dataclass
class RunSummary:
    """What a finished (or resumed-and-finished) run reports."""

    run_dir: Path
    steps: int
    losses: dict[str, float] = field(default_factory=dict)
    validation: dict[str, float] = field(default_factory=dict)
    exports: dict[str, Path] = field(default_factory=dict)
    #: Set when a stop signal ended the run early (after a checkpoint).
    stopped_at: int | None = None
    #: Set when ``on_validation`` stopped the run (a sweep's pruner), after a checkpoint.
    pruned_at: int | None = None


def default_strategy(cfg: ExperimentConfig) -> Strategy:
    """The configured strategy in the launcher's environment (joins the process group)."""
    return build_strategy(cfg)


class Trainer:
    """Runs a method under a strategy for ``cfg.train.steps`` steps.

    Parameters
    ----------
    cfg
        The experiment.
    strategy
        Where and how the method's groups run.
    resume
        Continue the run directory's latest checkpoint; ``"auto"``: if it has one.
    overwrite
        Empty a used run directory and start again.
    progress
        Show a progress bar (rank 0).
    method
        The method to train; by default the one ``cfg.method`` configures
        (:func:`~hpcdeconv.methods.build_method`). It must train on ``cfg.data.kind``.
    on_validation
        Told every validation's scores on rank 0 (a sweep reports them to its pruner);
        returning True ends the run there, after a checkpoint (``RunSummary.pruned_at``).

    Raises
    ------
    ConfigError
        The method does not train on the configured data, does not report
        ``train.best_metric``, or the precision does not fit the device.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        strategy: Strategy,
        *,
        resume: bool | str = False,
        overwrite: bool = False,
        progress: bool = True,
        method: Method | None = None,
        on_validation: ValidationHook | None = None,
    ) -> None:
        self.cfg = cfg
        self.on_validation = on_validation
        self.strategy = strategy
        self.progress = progress and strategy.is_main
        check_precision(cfg.train.precision, strategy.device)
        self.run = RunDirectory(Path(cfg.output))
        if resume == "auto":
            # Requeued SLURM jobs: continue when a checkpoint exists, else start.
            resume = latest_checkpoint(self.run.path) is not None
        # Same seed on every rank: networks start identical before any broadcast.
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        # GAN weights and the learned kernel's tails drift into denormal floats, which make
        # CPU kernels 10x slower as training goes on; flushing them changes no result that
        # matters at float32 precision.
        torch.set_flush_denormal(True)
        self.feed = make_feed(
            cfg.data, seed=cfg.train.seed, rank=strategy.rank, world_size=strategy.world_size
        )
        self.data = self.feed.info()
        self.method: Method = method or build_method(
            cfg.method,
            self.data,
            seed=cfg.train.seed + 7919 * strategy.rank,
            checkpointing=cfg.train.grad_checkpointing,
        )
        kinds = (self.method.data_kind, *self.method.also_data_kinds)
        if cfg.data.kind not in kinds:
            raise ConfigError(
                f"method {cfg.method.name} trains on data.kind "
                f"{' or '.join(repr(k) for k in kinds)}, not {cfg.data.kind!r}"
            )
        self.best = best_tracker(cfg.train.best_metric, self.method.metrics, cfg.method.name)
        try:
            self._build(resume, overwrite)
        except BaseException:
            self.run.release()
            raise

    def _build(self, resume: bool | str, overwrite: bool) -> None:
        cfg, strategy = self.cfg, self.strategy
        # The run directory is made (or emptied) only once the data and the method are
        # known to fit (loss networks outside the groups included), so a bad setting
        # leaves no folder behind. Rank 0 does it; a refusal (another run holds it, it is
        # not empty) ends every rank with the same line.
        place_loss_networks(self.method, strategy.device)
        strategy.agree(lambda: self.run.claim(bool(resume), overwrite), True)
        rates = self.method.learning_rates()
        self.trainables = {
            name: strategy.wrap(module, cfg.optim, cfg.train.steps, lr=rates.get(name), name=name)
            for name, module in self.method.groups().items()
        }
        self.method.bind(self.trainables)
        self.artefact: Artefact = self.method.artefact()
        if self.artefact.key in _ENGINE_KEYS:
            raise ValueError(f"artefact key {self.artefact.key!r} is a key the engine writes")
        tc = cfg.train
        # Averaged weights of the artefact's network (identical on every rank, as it is).
        self.ema = GeneratorEMA(self.artefact.network, tc.ema_decay) if tc.ema_decay else None
        self.evaluator = Evaluator(
            self.method, self.artefact.network, self.feed, tc, strategy, self.ema, self.best
        )
        self.val_metrics: dict[str, float] = {}
        self.step = 0
        self.report = RunReporter(self.run, strategy)
        if resume:
            self._restore(latest_checkpoint(self.run.path))
        # config.yaml always says what runs: on resume it records the applied changes.
        strategy.agree(lambda: dump_config(cfg, self.run.path / "config.yaml"), True)

    # ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically (rank 0's per-rank part inline)."""
        art = self.artefact
        return {
            "format": CHECKPOINT_FORMAT,
            "version": __version__,
            "method": self.cfg.method.name,
            "config": self.cfg.model_dump(mode="json"),
            "step": self.step,
            "world_size": self.strategy.world_size,
            "groups": {name: t.state_dict() for name, t in self.trainables.items()},
            # The artefact alone, so inference needs neither the method nor the data.
            "artefact": {"kind": art.kind, "key": art.key, **art.record},
            art.key: art.network.state_dict(),
            **self._ema_state(),
            "best": self.best.state_dict(),
            "feed": self.feed.state_dict(),
            **self.rank_state_dict(),
        }

    def _ema_state(self) -> dict[str, Any]:
        if self.ema is None:
            return {}
        # The averaged weights are stored once, as inference reads them.
        state = self.ema.state_dict()
        return {f"{self.artefact.key}_ema": state.pop("module"), "ema": state}

    def rank_state_dict(self) -> dict[str, Any]:
        """What differs between ranks: the method's state (history pools) and random streams."""
        return {"method_state": self.method.state_dict(), "rng": capture_rng_state()}

    def _restore(self, path: Path | None) -> None:
        """Collective: every rank loads the checkpoint and its own per-rank part."""
        assert path is not None
        # Loaded on the CPU whatever the device: load_state_dict copies weights and
        # optimiser states onto the device, and generator states must stay CPU tensors.
        state = load_checkpoint(path, map_location="cpu")
        art = self.artefact
        applied = check_checkpoint(
            state, path, self.cfg, self.strategy.world_size, (art.kind, art.key)
        )
        try:
            for name, trainable in self.trainables.items():
                trainable.load_state_dict(state["groups"][name])
        except (KeyError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise InputError(
                f"checkpoint {path} does not fit the configured networks ({first})"
            ) from None
        step = int(state["step"])
        rank = self.strategy.rank
        mine = self.strategy.agree(
            lambda: state if rank == 0 else load_rank_state(self.run.path, step, rank)
        )
        assert mine is not None
        if self.ema is not None:
            self.ema.load_state_dict({**state["ema"], "module": state[f"{art.key}_ema"]})
        if "best" in state:
            self.best.load_state_dict(state["best"])
        self.method.load_state_dict(mine["method_state"])
        self.feed.load_state_dict(state["feed"])
        restore_rng_state(mine["rng"])
        self.step = step
        self.run.last_good = path
        dropped = self.report.truncate_after(step)
        if self.strategy.is_main:
            log.info("resumed %s at step %d", path, self.step)
            for change in applied:
                log.warning("resume: %s (applied from this launch's configuration)", change)
            if dropped:
                log.info("metrics.jsonl: %d record(s) after step %d dropped", dropped, step)

    def _write(self, what: str, write: Any) -> Any:
        return self.run.write(what, self.step, write)

    def save(self, best: bool = False) -> Path:
        """Collective checkpoint: finite weights checked, per-rank parts, then rank 0's file.

        Every rank writes its part (DeepSpeed partitions, history pools, random streams)
        before rank 0 writes the checkpoint that refers to them and moves ``latest`` (and
        ``best`` when ``best``: this step's validation beat every earlier one).

        Raises
        ------
        TrainingDivergedError
            Some weight is not finite: nothing is written.
        RunWriteError
            A file could not be written; the previous checkpoint stays ``latest``.
        """
        check_weights_finite(self.strategy, self.trainables, self.step, self.run.last_good_text())
        step, rank, run_dir = self.step, self.strategy.rank, self.run.path
        self._write("checkpoint", lambda: self.strategy.save_shards(run_dir, step))
        part = self.rank_state_dict() if rank > 0 else None
        self.strategy.agree(
            lambda: (
                part is None
                or self._write("checkpoint", lambda: save_rank_state(run_dir, step, rank, part))
            )
        )

        def write_main() -> Path:
            path = save_checkpoint(
                run_dir,
                step,
                self.state_dict(),
                keep=self.cfg.train.keep_checkpoints,
                best=self.val_metrics if best else None,
                metric=self.best.metric,
            )
            prune_rank_states(run_dir, step)
            return path

        self.strategy.agree(lambda: self._write("checkpoint", write_main), True)
        self.run.last_good = checkpoint_path(run_dir, step)
        return self.run.last_good

    # ----------------------------------------------------------------------------------
    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        pin = self.strategy.device.type == "cuda"
        for batch in self.feed.loader(start_step=self.step, pin_memory=pin):
            yield {k: v.to(self.strategy.device, non_blocking=pin) for k, v in batch.items()}

    def validate(self) -> tuple[dict[str, float], bool]:
        """Collective: the method's validation on rank 0, and whether it is the best so far.

        Returns
        -------
        (dict, bool)
            The metrics (``{}`` on ranks other than 0) and, on every rank, whether this
            step's checkpoint becomes ``best`` (``train.best_metric``).
        """
        step = self.step
        metrics, improved = self.evaluator.evaluate(
            step, lambda kind, scores: self.report.scores(step, kind, scores)
        )
        self.val_metrics = metrics
        return metrics, improved

    def fit(self) -> RunSummary:
        """Train until ``cfg.train.steps``; returns the final losses and validation.

        Raises
        ------
        TrainingDivergedError
            A loss (any rank) or a weight (at a checkpoint) is not finite; the line names
            the last good checkpoint, which stays ``latest``.
        RunWriteError
            A checkpoint or log could not be written.
        """
        tc = self.cfg.train
        summary = RunSummary(self.run.path, tc.steps)
        bar = tqdm(
            total=tc.steps, initial=self.step, disable=not self.progress, desc="train", unit="step"
        )
        batches = self._batches()
        hand_over = False
        stop = StopRequest().install()
        try:
            while self.step < tc.steps:
                batch = next(batches)
                with self.strategy.autocast():
                    losses = self.method.step(batch)
                level = agree_on_step(
                    self.strategy, losses, stop.level, self.step + 1, self.run.last_good_text()
                )
                if self.ema is not None:
                    self.ema.update(self.artefact.network)
                self.step += 1
                bar.update(1)
                if self.step % tc.log_every == 0 or self.step == tc.steps:
                    first = next(iter(self.trainables.values()))
                    summary.losses = self.report.losses(self.step, losses, first)
                    bar.set_postfix({k: f"{v:.3g}" for k, v in summary.losses.items() if k != "lr"})
                if self.step % tc.image_every == 0:
                    self.report.images(self.step, self.method.images())
                improved = pruned = False
                if self.step % tc.val_every == 0 or self.step == tc.steps:
                    metrics, improved = self.validate()
                    summary.validation = metrics or summary.validation
                    # Told every validation, the last one included; it can stop only
                    # a run that has steps left.
                    verdict = agree_on_hook(self.strategy, self.on_validation, self.step, metrics)
                    pruned = verdict and self.step < tc.steps
                stopping = level > 0 or pruned
                if self.step % tc.ckpt_every == 0 or self.step == tc.steps or stopping or improved:
                    self.save(best=improved)
                if pruned:
                    summary.pruned_at = self.step
                    log.info("stopped by the validation hook at step %d", self.step)
                    return summary
                if level > 0 and self.step < tc.steps:
                    summary.stopped_at = self.step
                    requeue = level >= 2 and tc.requeue
                    if requeue == "trainer" and self.strategy.is_main:
                        requeue_slurm_job()
                    hand_over = requeue == "submitit"
                    log.warning("stop signal: checkpoint at step %d written", self.step)
                    return summary
        finally:
            stop.uninstall()
            bar.close()
            self.report.close()
            self.run.release()
            if hand_over:
                # After the run directory's lock is released: submitit's handler requeues
                # the job and exits the process.
                stop.pass_on()
        psf = self.data.psf
        truth = None if psf is None else torch.from_numpy(psf)
        exports = self.strategy.agree(
            lambda: self._write("exports", lambda: self.method.export(self.run.path, truth)), True
        )
        summary.exports = exports or {}
        return summary


def train(
    cfg: ExperimentConfig,
    *,
    resume: bool | str = False,
    overwrite: bool = False,
    strategy: Strategy | None = None,
    progress: bool = True,
    on_validation: ValidationHook | None = None,
) -> RunSummary:
    """Build the method and strategy from ``cfg`` and train it.

    A strategy built here is closed here (its process group left), whatever happens, so
    one process can train several runs in turn (a sweep worker's trials); a ``strategy``
    passed in stays the caller's to close.
    """
    owned = strategy is None
    strategy = strategy or default_strategy(cfg)
    try:
        trainer = Trainer(
            cfg,
            strategy,
            resume=resume,
            overwrite=overwrite,
            progress=progress,
            on_validation=on_validation,
        )
        return trainer.fit()
    finally:
        if owned:
            strategy.close()
