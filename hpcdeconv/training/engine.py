"""The training loop: AMP, validation, atomic checkpoints, resume, logging.

Knows the :class:`~hpcdeconv.methods.base.Method` interface and the
:class:`~hpcdeconv.training.strategy.Strategy` interface, nothing of any particular
method or strategy.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from hpcdeconv import __version__
from hpcdeconv.config import ExperimentConfig, dump_config
from hpcdeconv.data.lock import OutputLock
from hpcdeconv.data.safety import empty_output
from hpcdeconv.errors import ConfigError, HpcdeconvError, InputError, OutputExistsError
from hpcdeconv.methods import build_method
from hpcdeconv.methods.base import Method
from hpcdeconv.training.checkpoint import (
    LATEST,
    checkpoint_path,
    count_nonfinite,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from hpcdeconv.training.ema import GeneratorEMA
from hpcdeconv.training.feed import TrainingFeed
from hpcdeconv.training.launch import build_strategy
from hpcdeconv.training.preemption import StopRequest, requeue_slurm_job
from hpcdeconv.training.rank_state import load_rank_state, prune_rank_states, save_rank_state
from hpcdeconv.training.resume import check_resume_config, check_world_size
from hpcdeconv.training.rng import capture_rng_state, restore_rng_state
from hpcdeconv.training.runlog import RunLogger
from hpcdeconv.training.selection import BestTracker
from hpcdeconv.training.strategy import Strategy, agreed
from hpcdeconv.training.validate import ValidationSet, validate

log = logging.getLogger(__name__)

#: 2: per-rank state (history pools, random streams) of every rank, and the world size.
CHECKPOINT_FORMAT = 2


class TrainingDivergedError(HpcdeconvError):
    """A loss or a weight became NaN or infinite."""


class RunWriteError(HpcdeconvError):
    """A checkpoint or log of the run could not be written (full disk, quota, permissions)."""


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


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, numpy and torch; optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # warn_only: CUDA has no deterministic backward for max_pool3d (the U-Net's
        # pooling) and torch would refuse the whole run. With the U-Net's non-overlapping
        # 2x2x2 windows every input voxel receives at most one gradient, so its atomic adds
        # cannot reorder; every op with a deterministic kernel still gets that kernel.
        torch.use_deterministic_algorithms(True, warn_only=True)
        # cuBLAS is deterministic only with a fixed workspace; read when its handle is made.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Create the run directory; refuse to clobber a previous run unless asked to.

    ``overwrite`` empties only a directory that holds nothing but a previous run's files
    (:func:`~hpcdeconv.data.safety.check_replaceable`).
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputExistsError(f"run directory {run_dir} is a file; choose another output")
    has_ckpt = latest_checkpoint(run_dir) is not None
    if resume and not has_ckpt:
        raise InputError(f"--resume: no checkpoint in {run_dir}")
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise OutputExistsError(
                f"run directory {run_dir} is not empty; pass --resume to continue it "
                "or --overwrite to start again"
            )
        empty_output(run_dir, "run")
    run_dir.mkdir(parents=True, exist_ok=True)


def default_strategy(cfg: ExperimentConfig) -> Strategy:
    """The configured strategy in the launcher's environment (joins the process group)."""
    return build_strategy(cfg)


def _check_precision(cfg: ExperimentConfig, device: torch.device) -> None:
    if cfg.train.precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision fp16 needs a GPU; use bf16 on the CPU")


class Trainer:
    """Runs a method under a strategy for ``cfg.train.steps`` steps."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        strategy: Strategy,
        *,
        resume: bool | str = False,
        overwrite: bool = False,
        progress: bool = True,
    ) -> None:
        self.cfg = cfg
        self.strategy = strategy
        self.run_dir = Path(cfg.output)
        self.progress = progress and strategy.is_main
        _check_precision(cfg, strategy.device)
        if resume == "auto":
            # Requeued SLURM jobs: continue when a checkpoint exists, else start.
            resume = latest_checkpoint(self.run_dir) is not None
        # Same seed on every rank: networks start identical before any broadcast.
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        # GAN weights and the learned kernel's tails drift into denormal floats, which make
        # CPU kernels 10x slower as training goes on; flushing them changes no result that
        # matters at float32 precision.
        torch.set_flush_denormal(True)
        self.feed = TrainingFeed(
            cfg.data, seed=cfg.train.seed, rank=strategy.rank, world_size=strategy.world_size
        )
        self.method: Method = build_method(
            cfg.method,
            self.feed.info(),
            seed=cfg.train.seed + 7919 * strategy.rank,
            checkpointing=cfg.train.grad_checkpointing,
        )
        self.feed.require(paired=self.method.data_kind == "paired")
        # One writer per run directory: rank 0 holds the lock for the life of the run.
        self.lock = OutputLock(self.run_dir, "train")
        try:
            self._build(resume, overwrite)
        except BaseException:
            self.lock.release()
            raise

    def _claim_run_dir(self, resume: bool, overwrite: bool) -> None:
        """Rank 0: lock the run directory, then make (or empty) it."""
        self.lock.acquire()
        prepare_run_dir(self.run_dir, resume, overwrite)

    def _build(self, resume: bool | str, overwrite: bool) -> None:
        cfg, strategy = self.cfg, self.strategy
        # The run directory is made (or emptied) only once the data and the method are
        # known to fit, so a bad setting leaves no folder behind. Rank 0 does it; a refusal
        # (another run holds it, it is not empty) ends every rank with the same line.
        strategy.agree(lambda: self._claim_run_dir(bool(resume), overwrite), True)
        rates = self.method.learning_rates()
        self.trainables = {
            name: strategy.wrap(module, cfg.optim, cfg.train.steps, lr=rates.get(name), name=name)
            for name, module in self.method.groups().items()
        }
        self.method.bind(self.trainables)
        tc = cfg.train
        # Averaged weights of G_Θ (identical on every rank, as G_Θ is).
        self.ema = (
            GeneratorEMA(self.method.artefact().network, tc.ema_decay) if tc.ema_decay else None
        )
        self.best = BestTracker(tc.best_metric)
        self.val_set: ValidationSet | None = None
        self.val_metrics: dict[str, float] = {}
        self.step = 0
        #: The newest checkpoint known to hold this run's state (named when a step fails).
        self.last_good: Path | None = None
        self.logger = RunLogger(self.run_dir, enabled=strategy.is_main)
        if resume:
            self._restore(latest_checkpoint(self.run_dir))
        # config.yaml always says what runs: on resume it records the applied changes.
        strategy.agree(lambda: dump_config(cfg, self.run_dir / "config.yaml"), True)

    # ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically (rank 0's per-rank part inline)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": __version__,
            "method": self.cfg.method.name,
            "config": self.cfg.model_dump(mode="json"),
            "step": self.step,
            "world_size": self.strategy.world_size,
            "groups": {name: t.state_dict() for name, t in self.trainables.items()},
            # G_Θ alone, so inference needs neither the method nor the training data.
            "deblur": self.method.artefact().network.state_dict(),
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
        return {"deblur_ema": state.pop("module"), "ema": state}

    def rank_state_dict(self) -> dict[str, Any]:
        """What differs between ranks: the method's state (history pools) and random streams."""
        return {"method_state": self.method.state_dict(), "rng": capture_rng_state()}

    def _restore(self, path: Path | None) -> None:
        """Collective: every rank loads the checkpoint and its own per-rank part."""
        assert path is not None
        # Loaded on the CPU whatever the device: load_state_dict copies weights and
        # optimiser states onto the device, and generator states must stay CPU tensors.
        state = load_checkpoint(path, map_location="cpu")
        if state.get("method") != self.cfg.method.name:
            raise InputError(
                f"checkpoint {path} is from method '{state.get('method')}', "
                f"the configuration asks for '{self.cfg.method.name}'"
            )
        check_world_size(int(state.get("world_size", 1)), self.strategy.world_size, str(path))
        applied = check_resume_config(state["config"], self.cfg.model_dump(mode="json"), str(path))
        weights = {k: state[k] for k in ("deblur", "deblur_ema", "groups") if k in state}
        bad = count_nonfinite(weights)
        if bad:
            earlier = [p.name for p in list_checkpoints(self.run_dir) if p.name < path.name]
            how = (
                f"to resume from an earlier one ({', '.join(earlier)}), write its name into "
                f"{path.parent / LATEST}"
                if earlier
                else "start a new run"
            )
            raise InputError(
                f"checkpoint {path} holds {bad} non-finite weight(s): it was written after "
                f"training diverged; {how}"
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
            lambda: state if rank == 0 else load_rank_state(self.run_dir, step, rank)
        )
        assert mine is not None
        if self.ema is not None:
            self.ema.load_state_dict({**state["ema"], "module": state["deblur_ema"]})
        if "best" in state:
            self.best.load_state_dict(state["best"])
        self.method.load_state_dict(mine["method_state"])
        self.feed.load_state_dict(state["feed"])
        restore_rng_state(mine["rng"])
        self.step = step
        self.last_good = path
        dropped = self.strategy.agree(lambda: self.logger.truncate_after(step), True)
        if self.strategy.is_main:
            log.info("resumed %s at step %d", path, self.step)
            for change in applied:
                log.warning("resume: %s (applied from this launch's configuration)", change)
            if dropped:
                log.info("metrics.jsonl: %d record(s) after step %d dropped", dropped, step)

    def _last_good_text(self) -> str:
        if self.last_good is None:
            return "no checkpoint was written yet"
        return f"last good checkpoint: {self.last_good}"

    def _check_weights_finite(self) -> None:
        """Collective: no rank may checkpoint weights that are NaN or infinite."""
        counts = torch.tensor(
            [float(count_nonfinite(list(t.module.parameters()))) for t in self.trainables.values()]
        )
        counts = self.strategy.all_reduce_max(counts)
        bad = [name for name, n in zip(self.trainables, counts.tolist(), strict=True) if n > 0]
        if bad:
            raise agreed(
                TrainingDivergedError(
                    f"non-finite weights in group(s) {', '.join(bad)} after step {self.step}; "
                    f"not checkpointed, {self._last_good_text()}"
                )
            )

    def _write(self, what: str, write: Any) -> Any:
        """Run a write of the run directory; an OS failure becomes one line naming it."""
        try:
            return write()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            where = exc.filename or self.run_dir
            raise RunWriteError(
                f"could not write the {what} of step {self.step} ({reason}: {where}); "
                f"{self._last_good_text()} is untouched"
            ) from None

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
        self._check_weights_finite()
        step, rank = self.step, self.strategy.rank
        self._write("checkpoint", lambda: self.strategy.save_shards(self.run_dir, step))
        part = self.rank_state_dict() if rank > 0 else None
        self.strategy.agree(
            lambda: (
                part is None
                or self._write(
                    "checkpoint", lambda: save_rank_state(self.run_dir, step, rank, part)
                )
            )
        )

        def write_main() -> Path:
            path = save_checkpoint(
                self.run_dir,
                step,
                self.state_dict(),
                keep=self.cfg.train.keep_checkpoints,
                best=self.val_metrics if best else None,
                metric=self.best.metric,
            )
            prune_rank_states(self.run_dir, step)
            return path

        self.strategy.agree(lambda: self._write("checkpoint", write_main), True)
        self.last_good = checkpoint_path(self.run_dir, step)
        return self.last_good

    # ----------------------------------------------------------------------------------
    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        pin = self.strategy.device.type == "cuda"
        batches = self.feed.loader(
            start_step=self.step, paired=self.method.data_kind == "paired", pin_memory=pin
        )
        for batch in batches:
            yield {k: v.to(self.strategy.device, non_blocking=pin) for k, v in batch.items()}

    def _agree_on_step(self, losses: Mapping[str, torch.Tensor], stop: StopRequest) -> float:
        """Collective, once per step: was the step finite on every rank, and must we stop?

        One all-reduce (max) of ``[stop level, one flag per rank and loss]``. A non-finite
        loss on any rank ends every rank with the same line before anything of the step is
        written; DDP has already averaged that rank's gradients into every rank's weights.

        Returns
        -------
        float
            The strongest stop request of any rank (0: none; 1: stop; 2: stop and requeue).

        Raises
        ------
        TrainingDivergedError
            Some rank's loss is NaN or infinite.
        """
        keys = sorted(losses)
        world, rank = self.strategy.world_size, self.strategy.rank
        flags = torch.zeros(1 + world * len(keys), device=self.strategy.device)
        flags[0] = stop.level
        if keys:
            local = torch.stack([~torch.isfinite(losses[k].float()) for k in keys]).float()
            flags[1 + rank * len(keys) : 1 + (rank + 1) * len(keys)] = local.to(flags.device)
        reduced = self.strategy.all_reduce_max(flags).cpu()
        bad = reduced[1:].view(world, len(keys)) if keys else reduced[1:1]
        if keys and bool(bad.any()):
            where = "; ".join(
                f"rank {r}: {', '.join(k for k, b in zip(keys, row, strict=True) if b)}"
                for r, row in enumerate(bad.bool().tolist())
                if any(row)
            )
            raise agreed(
                TrainingDivergedError(
                    f"non-finite loss at step {self.step + 1} ({where}); every rank stopped "
                    f"before it was checkpointed, {self._last_good_text()}"
                )
            )
        return float(reduced[0])

    def _validate_main(self) -> dict[str, float]:
        """Rank 0: PSNR/SSIM of G_Θ (and of its average) on the fixed validation crops.

        Returns the metrics of the weights inference uses: the EMA's when it is kept.
        """
        if not self.feed.val_ids:
            return {}
        tc = self.cfg.train
        if self.val_set is None:
            # Read and cut once: every evaluation scores the same voxels.
            self.val_set = ValidationSet.from_feed(self.feed, tc.val_crop)
        nets = {"val": self.method.artefact().network}
        if self.ema is not None:
            nets["val_ema"] = self.ema.module
        scores = {}
        for kind, net in nets.items():
            scores[kind] = validate(
                net,
                self.val_set,
                tile=tc.val_tile,
                overlap=tc.val_overlap,
                device=self.strategy.device,
                autocast_dtype=self.strategy.autocast_dtype,
            )
            self._write(
                "validation log", lambda k=kind: self.logger.scalars(self.step, k, scores[k])
            )
        return scores["val_ema" if self.ema is not None else "val"]

    def validate(self) -> tuple[dict[str, float], bool]:
        """Collective: validation on rank 0, and whether it is the run's best so far.

        Returns
        -------
        (dict, bool)
            The metrics (``{}`` on ranks other than 0) and, on every rank, whether this
            step's checkpoint becomes ``best`` (``train.best_metric``).
        """
        metrics = self.strategy.agree(self._validate_main, True) or {}
        improved = self.best.update(self.step, metrics)
        self.val_metrics = metrics
        agreed_flag = self.strategy.all_reduce_max(torch.tensor(float(improved)))
        return metrics, bool(agreed_flag > 0)

    def _log(self, losses: Mapping[str, torch.Tensor], summary: RunSummary, bar: Any) -> None:
        """Collective: mean losses over ranks, written by rank 0."""
        values = {k: float(self.strategy.all_reduce_mean(v)) for k, v in losses.items()}
        values["lr"] = _current_lr(next(iter(self.trainables.values())))
        summary.losses = values

        def write() -> None:
            self._write("log", lambda: self.logger.scalars(self.step, "train", values))
            bar.set_postfix({k: f"{v:.3g}" for k, v in values.items() if k != "lr"})

        self.strategy.agree(write, True)

    def _images(self) -> None:
        images = self.method.images()
        self.strategy.agree(
            lambda: self._write("image summary", lambda: self.logger.images(self.step, images)),
            True,
        )

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
        summary = RunSummary(self.run_dir, tc.steps)
        bar = tqdm(
            total=tc.steps, initial=self.step, disable=not self.progress, desc="train", unit="step"
        )
        batches = self._batches()
        stop = StopRequest().install()
        try:
            while self.step < tc.steps:
                batch = next(batches)
                with self.strategy.autocast():
                    losses = self.method.step(batch)
                level = self._agree_on_step(losses, stop)
                if self.ema is not None:
                    self.ema.update(self.method.artefact().network)
                self.step += 1
                bar.update(1)
                if self.step % tc.log_every == 0 or self.step == tc.steps:
                    self._log(losses, summary, bar)
                if self.step % tc.image_every == 0:
                    self._images()
                improved = False
                if self.step % tc.val_every == 0 or self.step == tc.steps:
                    metrics, improved = self.validate()
                    summary.validation = metrics or summary.validation
                if self.step % tc.ckpt_every == 0 or self.step == tc.steps or level > 0 or improved:
                    self.save(best=improved)
                if level > 0 and self.step < tc.steps:
                    summary.stopped_at = self.step
                    if level >= 2 and self.strategy.is_main:
                        requeue_slurm_job()
                    log.warning("stop signal: checkpoint at step %d written", self.step)
                    return summary
        finally:
            stop.uninstall()
            bar.close()
            self.logger.close()
            self.lock.release()
        truth = None if self.feed.psf is None else torch.from_numpy(self.feed.psf)
        exports = self.strategy.agree(
            lambda: self._write("exports", lambda: self.method.export(self.run_dir, truth)), True
        )
        summary.exports = exports or {}
        return summary


def _current_lr(trainable: Any) -> float:
    optimizer = getattr(trainable, "optimizer", None)
    return float(optimizer.param_groups[0]["lr"]) if optimizer is not None else float("nan")


def train(
    cfg: ExperimentConfig,
    *,
    resume: bool | str = False,
    overwrite: bool = False,
    strategy: Strategy | None = None,
    progress: bool = True,
) -> RunSummary:
    """Build the method and strategy from ``cfg`` and train it."""
    strategy = strategy or default_strategy(cfg)
    trainer = Trainer(cfg, strategy, resume=resume, overwrite=overwrite, progress=progress)
    return trainer.fit()
