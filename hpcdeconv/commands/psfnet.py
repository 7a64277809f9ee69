"""``hpcdeconv psfnet``: training sets and evaluation of the PSF-parameter regressor.

Subcommands:

* ``make-dataset --config C.yaml OUT.zarr``: synthesise PSF-regression samples
  (:mod:`hpcdeconv.psfnet.dataset`) in parallel on a dask cluster, resumable
  (:mod:`hpcdeconv.psfnet.dataset_run`);
* ``evaluate``: R² per parameter of a trained regressor (arguments and run in
  :mod:`hpcdeconv.commands.psfnet_evaluate`).
"""

from __future__ import annotations

import argparse
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from hpcdeconv.commands import psfnet_evaluate
from hpcdeconv.commands.common import (
    add_cluster_location_arguments,
    add_config_args,
    cluster_location_overrides,
    config_inputs,
    locked_outputs,
)

if TYPE_CHECKING:
    from hpcdeconv.config import PSFDatasetConfig

NAME = "psfnet"
HELP = "PSF-parameter regression: make a training set (make-dataset), evaluate a regressor"

MAKE_DATASET = "make-dataset"
EVALUATE = "evaluate"


def add_make_dataset_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``hpcdeconv psfnet make-dataset``."""
    add_config_args(p)
    p.add_argument("output", type=Path, help="samples store (zarr) to create, e.g. g1.zarr")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace an existing output")
    mode.add_argument(
        "--resume", action="store_true", help="continue an interrupted run (same configuration)"
    )
    add_cluster_location_arguments(p)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Subcommands of ``hpcdeconv psfnet``."""
    sub = p.add_subparsers(dest="psfnet_command", required=True, metavar="SUBCOMMAND")
    add_make_dataset_arguments(
        sub.add_parser(MAKE_DATASET, help="synthesise PSF-regression training samples into zarr")
    )
    psfnet_evaluate.add_arguments(sub.add_parser(EVALUATE, help=psfnet_evaluate.HELP))


def run(args: argparse.Namespace) -> int:
    """Run the chosen subcommand."""
    if args.psfnet_command == MAKE_DATASET:
        return run_make_dataset(args)
    return int(psfnet_evaluate.run(args))


def _locked(args: argparse.Namespace, cfg: PSFDatasetConfig) -> AbstractContextManager[None]:
    """The writer lock on the output, once it overlaps no input image nor the config."""
    inputs = [*config_inputs(args), *[("image", path) for path in cfg.images]]
    replace = True if args.overwrite else None if args.resume else False
    return locked_outputs(f"{NAME} {MAKE_DATASET}", [("OUT", args.output, "zarr")], inputs, replace)


def run_make_dataset(args: argparse.Namespace) -> int:
    """Generate (or resume) a PSF-samples store on a dask cluster."""
    from hpcdeconv.commands.deconvolve import print_client
    from hpcdeconv.config import PSFDatasetConfig, load_config
    from hpcdeconv.inference.cluster import open_client
    from hpcdeconv.psfnet.dataset_run import generate, prepare

    cfg = load_config(PSFDatasetConfig, args.config, [*args.set, *cluster_location_overrides(args)])
    mode = "overwrite" if args.overwrite else "resume" if args.resume else "new"
    if cfg.cluster.kind == "mpi":
        from hpcdeconv.inference.cluster import is_mpi_client

        if not is_mpi_client():  # scheduler and worker ranks serve until the client ends
            with open_client(cfg.cluster):
                return 0
    with _locked(args, cfg):
        prepare(cfg, args.output, mode, local=cfg.cluster.kind == "local")
        with open_client(cfg.cluster) as client:
            print_client(client, cfg.cluster)
            report = generate(cfg, args.output, client)
    print(
        f"{report.computed} task(s) computed, {report.skipped} already done: "
        f"{report.samples} samples in {report.seconds:.1f} s "
        f"({report.samples_per_second:.3g} samples/s)"
    )
    print(f"  -> {args.output} ({cfg.samples} samples of {cfg.psf.model}, {cfg.patch} px)")
    return 0
