"""``hpcdeconv train``: train a deconvolution method."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from hpcdeconv.commands.common import VAL_KEYS, add_config_args

if TYPE_CHECKING:
    from hpcdeconv.config import ExperimentConfig
    from hpcdeconv.training.engine import RunSummary

NAME = "train"
HELP = "train a method (blind/non-blind cycleGAN, baselines)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``hpcdeconv train``."""
    add_config_args(p)
    p.add_argument("--output", type=Path, help="run directory (overrides output:)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint (the configuration is the run's config.yaml "
        "unless --config is given; changed keys are applied and announced, or refused)",
    )
    mode.add_argument(
        "--auto-resume",
        action="store_true",
        help="resume if the run has a checkpoint, else start (for requeued jobs)",
    )
    p.add_argument("--overwrite", action="store_true", help="start again in a used run dir")


def run(args: argparse.Namespace) -> int:
    """Train a method: blind / non-blind cycleGAN, conventional cycleGAN, supervised."""
    from hpcdeconv.cli import print_error
    from hpcdeconv.config import ExperimentConfig, load_config
    from hpcdeconv.data.safety import check_outputs
    from hpcdeconv.errors import HpcdeconvError
    from hpcdeconv.training.engine import train
    from hpcdeconv.training.launch import build_strategy
    from hpcdeconv.training.strategy import is_agreed

    overrides = list(args.set)
    if args.output is not None:
        overrides.append(f"output={args.output}")
    config = args.config
    if config is None and (args.resume or args.auto_resume) and args.output is not None:
        # Resuming a run continues its own configuration unless another is given.
        own = args.output / "config.yaml"
        config = own if own.is_file() else None
    cfg = load_config(ExperimentConfig, config, overrides)
    resume = "auto" if args.auto_resume else args.resume
    # Without --overwrite the trainer itself refuses a used run directory or resumes it.
    replace = True if args.overwrite and not args.resume else None
    check_outputs([("--output", cfg.output, "run")], _inputs(cfg, config), replace)
    strategy = build_strategy(cfg)
    try:
        summary = train(cfg, resume=resume, overwrite=args.overwrite, strategy=strategy)
    except HpcdeconvError as exc:
        # A launcher such as torchrun stops the other ranks as soon as one exits: when every
        # rank holds the error, each says its line and they meet once more before exiting.
        print_error(NAME, exc)
        if is_agreed(exc):
            strategy.barrier()
        return 2
    finally:
        strategy.close()
    if strategy.is_main:
        _report(cfg.method.name, summary, cfg.train.ema_decay is not None)
    return 0


def _inputs(cfg: ExperimentConfig, config: Path | None) -> list[tuple[str, Path | None]]:
    """Files training reads; the run's own ``config.yaml`` (resuming with it) is exempt."""
    inputs: list[tuple[str, Path | None]] = [("data.path", cfg.data.path)]
    kernel = getattr(cfg.method, "kernel", None)
    if kernel is not None and kernel.init == "file":
        inputs.append(("method.kernel.file", kernel.file))
    own = Path(cfg.output) / "config.yaml"
    if config is not None and not (own.exists() and own.resolve() == config.resolve()):
        inputs.append(("--config", config))
    return inputs


def _report(method: str, summary: RunSummary, ema: bool) -> None:
    """Print what the run did (rank 0 only: every rank returns the same summary)."""
    if summary.stopped_at is not None:
        print(f"stopped by signal after step {summary.stopped_at}; checkpoint written")
        return
    losses = ", ".join(f"{k}={v:.4g}" for k, v in summary.losses.items())
    print(f"trained {method} for {summary.steps} steps -> {summary.run_dir}")
    if losses:
        print(f"final losses: {losses}")
    which = " (EMA weights)" if ema else ""
    if set(VAL_KEYS) <= set(summary.validation):
        val = summary.validation
        print(
            f"validation{which}: PSNR {val['psnr_input']:.2f} -> {val['psnr']:.2f} dB, "
            f"SSIM {val['ssim_input']:.3f} -> {val['ssim']:.3f}"
        )
    elif summary.validation:
        scores = ", ".join(f"{k}={v:.4g}" for k, v in summary.validation.items())
        print(f"validation{which}: {scores}")
    for name, path in summary.exports.items():
        print(f"exported {name}: {path}")
