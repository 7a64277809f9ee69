"""``hpcdeconv comi``: training sets for COMI, the 2D cycleGAN that corrects out-of-focus images.

Subcommands:

* ``make-dataset --config C.yaml OUT.zarr``: in-focus / out-of-focus plane pairs from
  z-stacks, a BBBC006-style folder or synthetic defocus, split by field of view, mapped by
  one intensity mapping (:mod:`hpcdeconv.comi.dataset`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from hpcdeconv.commands.common import add_config_args, config_inputs, locked_outputs

if TYPE_CHECKING:
    from hpcdeconv.config.comi_data import COMIDatasetConfig

NAME = "comi"
HELP = "COMI out-of-focus correction: make a training set of plane pairs (make-dataset)"

MAKE_DATASET = "make-dataset"


def add_make_dataset_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``hpcdeconv comi make-dataset``."""
    add_config_args(p)
    p.add_argument("output", type=Path, help="dataset store (zarr) to create, e.g. comi.zarr")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Subcommands of ``hpcdeconv comi``."""
    sub = p.add_subparsers(dest="comi_command", required=True, metavar="SUBCOMMAND")
    add_make_dataset_arguments(
        sub.add_parser(
            MAKE_DATASET, help="in-focus / out-of-focus plane pairs, split by field of view"
        )
    )


def run(args: argparse.Namespace) -> int:
    """Run the chosen subcommand."""
    if args.comi_command == MAKE_DATASET:
        return run_make_dataset(args)
    raise AssertionError(f"unknown comi subcommand {args.comi_command}")  # argparse refuses it


def source_inputs(cfg: COMIDatasetConfig) -> list[tuple[str, Path | None]]:
    """Every input path of the configuration's source: stacks, the folder, images."""
    source = cfg.source
    if source.kind == "stacks":
        return [("stack", entry.path) for entry in source.stacks]
    if source.kind == "bbbc006":
        return [("source.root", source.root)]
    return [("image", path) for path in source.images]


def run_make_dataset(args: argparse.Namespace) -> int:
    """Write a COMI dataset store."""
    from hpcdeconv.comi.dataset import make_dataset
    from hpcdeconv.config import load_config
    from hpcdeconv.config.comi_data import COMIDatasetConfig

    cfg = load_config(COMIDatasetConfig, args.config, args.set)
    inputs = [*config_inputs(args), *source_inputs(cfg)]
    with locked_outputs(
        f"{NAME} {MAKE_DATASET}", [("OUT", args.output, "zarr")], inputs, args.overwrite
    ):
        report = make_dataset(cfg, args.output, overwrite=args.overwrite)
    pairs = ", ".join(f"{k} {v}" for k, v in report.pairs.items())
    fields = ", ".join(f"{k} {v}" for k, v in report.fields.items())
    print(
        f"{sum(report.pairs.values())} pairs ({pairs}) from {report.series} series of "
        f"{sum(report.fields.values())} fields ({fields}) in {report.seconds:.1f} s"
    )
    m = report.mapping
    print(
        f"  -> {args.output} ({cfg.source.kind}); intensity raw [{m.low:.6g}, {m.high:.6g}] "
        f"-> {list(m.target)}"
    )
    return 0
