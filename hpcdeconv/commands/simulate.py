"""``hpcdeconv simulate``: write a synthetic dataset (3D volumes or 2D images) to zarr."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from hpcdeconv.commands.common import add_config_args, config_inputs, locked_outputs

log = logging.getLogger(__name__)

NAME = "simulate"
HELP = "write a synthetic dataset (3D volumes or 2D images) to zarr"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``hpcdeconv simulate``."""
    add_config_args(p)
    p.add_argument("output", type=Path, help="zarr group to create, e.g. data.zarr")
    p.add_argument("--png", type=Path, help="figure of one sharp/blurred pair (orthoviews in 3D)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def run(args: argparse.Namespace) -> int:
    """Write a synthetic dataset (sharp, blurred, PSF, split) to zarr."""
    from hpcdeconv.config import SimulateConfig, load_config
    from hpcdeconv.data.simulate import simulate
    from hpcdeconv.data.summary import describe

    cfg = load_config(SimulateConfig, args.config, args.set)
    outputs = [("output", args.output, "zarr"), ("--png", args.png, "file")]
    with locked_outputs(NAME, outputs, config_inputs(args), args.overwrite):
        shown = simulate(cfg, args.output, overwrite=args.overwrite, progress=True)
        if args.png is not None:
            from hpcdeconv.viz import save_orthoviews

            # A 2-entry voxel size draws a 2D image as itself, a 3-entry one orthoviews.
            panels = [(f"sharp {shown.id}", shown.sharp), (f"blurred {shown.id}", shown.blurred)]
            save_orthoviews(args.png, panels, shown.voxel_size, mode="mip")
            log.info("figure: %s", args.png)
        print(describe(args.output))
        return 0
