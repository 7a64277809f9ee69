"""Argument helpers shared by the ``hpcdeconv`` verbs."""

from __future__ import annotations

import argparse
from pathlib import Path

#: Validation metrics printed after training, in display order.
VAL_KEYS = ("psnr_input", "psnr", "ssim_input", "ssim")


def config_inputs(args: argparse.Namespace) -> list[tuple[str, Path | None]]:
    """The ``--config`` file as an input that no output may overlap."""
    return [("--config", getattr(args, "config", None))]


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def add_config_args(p: argparse.ArgumentParser) -> None:
    """``--config FILE`` and repeatable ``--set key=value`` overrides."""
    p.add_argument("--config", type=Path, help="YAML configuration file")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a configuration value, e.g. --set psf.na=1.2 (repeatable)",
    )
