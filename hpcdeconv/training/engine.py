"""The training loop: AMP, validation, atomic checkpoints, resume, logging.

Knows the :class:`~hpcdeconv.methods.base.Method` interface and the
:class:`~hpcdeconv.training.strategy.Strategy` interface, nothing of any particular
method or strategy.
"""

from __future__ import annotations

import logging
import math
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
from hpcdeconv.data.safety import empty_output
from hpcdeconv.errors import ConfigError, HpcdeconvError, InputError, OutputExistsError
from hpcdeconv.methods import build_method
from hpcdeconv.methods.base import Method
from hpcdeconv.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from hpcdeconv.training.feed import TrainingFeed
from hpcdeconv.training.launch import build_strategy
from hpcdeconv.training.preemption import StopRequest, requeue_slurm_job
from hpcdeconv.training.rng import capture_rng_state, restore_rng_state
from hpcdeconv.training.runlog import RunLogger
from hpcdeconv.training.strategy import Strategy
from hpcdeconv.training.validate import validate

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


class TrainingDivergedError(HpcdeconvError):
    """A loss became NaN or infinite."""


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
            dataset_psf=self.feed.psf,
            seed=cfg.train.seed + 7919 * strategy.rank,
            checkpointing=cfg.train.grad_checkpointing,
            voxel_size=self.feed.voxel_size,
            data_means=self.feed.data_means(),
        )
        self.feed.require(paired=self.method.paired)
        # The run directory is made (or emptied) only once the data and the method are
        # known to fit, so a bad setting leaves no folder behind.
        if strategy.is_main:
            prepare_run_dir(self.run_dir, resume, overwrite)
        strategy.barrier()
        rates = self.method.learning_rates()
        self.trainables = {
            name: strategy.wrap(module, cfg.optim, cfg.train.steps, lr=rates.get(name), name=name)
            for name, module in self.method.groups().items()
        }
        self.method.bind(self.trainables)
        self.step = 0
        if resume:
            self._restore(latest_checkpoint(self.run_dir))
        if strategy.is_main:
            dump_config(cfg, self.run_dir / "config.yaml")
        self.logger = RunLogger(self.run_dir, enabled=strategy.is_main)

    # ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": __version__,
            "method": self.cfg.method.name,
            "config": self.cfg.model_dump(mode="json"),
            "step": self.step,
            "groups": {name: t.state_dict() for name, t in self.trainables.items()},
            "method_state": self.method.state_dict(),
            # G_Θ alone, so inference needs neither the method nor the training data.
            "deblur": self.method.deblur_net().state_dict(),
            "feed": self.feed.state_dict(),
            "rng": capture_rng_state(),
        }

    def _restore(self, path: Path | None) -> None:
        assert path is not None
        # Loaded on the CPU whatever the device: load_state_dict copies weights and
        # optimiser states onto the device, and generator states must stay CPU tensors.
        state = load_checkpoint(path, map_location="cpu")
        if state.get("method") != self.cfg.method.name:
            raise InputError(
                f"checkpoint {path} is from method '{state.get('method')}', "
                f"the configuration asks for '{self.cfg.method.name}'"
            )
        try:
            for name, trainable in self.trainables.items():
                trainable.load_state_dict(state["groups"][name])
        except (KeyError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise InputError(
                f"checkpoint {path} does not fit the configured networks ({first})"
            ) from None
        self.method.load_state_dict(state["method_state"])
        self.feed.load_state_dict(state["feed"])
        restore_rng_state(state["rng"])
        self.step = int(state["step"])
        log.info("resumed %s at step %d", path, self.step)

    def save(self) -> Path | None:
        """Checkpoint on rank 0 (atomic), then wait for every rank."""
        # Per-rank state (DeepSpeed partitions) is on disk before rank 0 refers to it.
        self.strategy.save_shards(self.run_dir, self.step)
        path = None
        if self.strategy.is_main:
            path = save_checkpoint(
                self.run_dir, self.step, self.state_dict(), keep=self.cfg.train.keep_checkpoints
            )
        self.strategy.barrier()
        return path

    # ----------------------------------------------------------------------------------
    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        pin = self.strategy.device.type == "cuda"
        batches = self.feed.loader(start_step=self.step, paired=self.method.paired, pin_memory=pin)
        for batch in batches:
            yield {k: v.to(self.strategy.device, non_blocking=pin) for k, v in batch.items()}

    def _check_finite(self, losses: Mapping[str, torch.Tensor]) -> None:
        bad = {k: float(v) for k, v in losses.items() if not math.isfinite(float(v))}
        if bad:
            last = latest_checkpoint(self.run_dir)
            keep = f"last good checkpoint: {last}" if last else "no checkpoint was written yet"
            raise TrainingDivergedError(
                f"non-finite loss at step {self.step + 1} ({bad}); stopped, {keep}"
            )

    def validate(self) -> dict[str, float]:
        """PSNR/SSIM of the tiled whole-volume prediction of the validation volumes."""
        if not self.strategy.is_main or not self.feed.val_ids:
            return {}
        metrics = validate(
            self.method.deblur_net(),
            self.feed,
            tile=self.cfg.train.val_tile,
            overlap=self.cfg.train.val_overlap,
            device=self.strategy.device,
            autocast_dtype=self.strategy.autocast_dtype,
        )
        self.logger.scalars(self.step, "val", metrics)
        return metrics

    def _stop_level(self, stop: StopRequest) -> float:
        """The strongest stop request of any rank, so all ranks stop at the same step."""
        return float(self.strategy.all_reduce_max(torch.tensor(stop.level)))

    def fit(self) -> RunSummary:
        """Train until ``cfg.train.steps``; returns the final losses and validation."""
        tc = self.cfg.train
        summary = RunSummary(self.run_dir, tc.steps)
        bar = tqdm(
            total=tc.steps, initial=self.step, disable=not self.progress, desc="train", unit="step"
        )
        batches = self._batches()
        stop = StopRequest().install()
        try:
            while self.step < tc.steps:
                level = self._stop_level(stop)
                if level > 0:
                    self.save()
                    summary.stopped_at = self.step
                    if level >= 2 and self.strategy.is_main:
                        requeue_slurm_job()
                    log.warning("stop signal: checkpoint at step %d written", self.step)
                    return summary
                batch = next(batches)
                with self.strategy.autocast():
                    losses = self.method.step(batch)
                self._check_finite(losses)
                self.step += 1
                bar.update(1)
                if self.step % tc.log_every == 0 or self.step == tc.steps:
                    values = {k: float(self.strategy.all_reduce_mean(v)) for k, v in losses.items()}
                    lr = next(iter(self.trainables.values()))
                    values["lr"] = _current_lr(lr)
                    self.logger.scalars(self.step, "train", values)
                    bar.set_postfix({k: f"{v:.3g}" for k, v in values.items() if k != "lr"})
                    summary.losses = values
                if self.step % tc.image_every == 0:
                    self.logger.images(self.step, self.method.images())
                if self.step % tc.val_every == 0 or self.step == tc.steps:
                    summary.validation = self.validate() or summary.validation
                if self.step % tc.ckpt_every == 0 or self.step == tc.steps:
                    self.save()
        finally:
            stop.uninstall()
            bar.close()
            self.logger.close()
        if self.strategy.is_main:
            truth = None if self.feed.psf is None else torch.from_numpy(self.feed.psf)
            summary.exports = self.method.export(self.run_dir, truth)
        self.strategy.barrier()
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
