"""``hpcdeconv ingest``: convert images (TIFF, OME-TIFF, zarr, OME-Zarr) into a dataset."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from hpcdeconv.commands.common import locked_outputs, positive_int
from hpcdeconv.commands.image_args import (
    add_inputs_argument,
    add_select_arguments,
    add_voxel_size_argument,
    selection,
)
from hpcdeconv.errors import InputError

log = logging.getLogger(__name__)

NAME = "ingest"
HELP = "convert TIFF / OME-TIFF / zarr / OME-Zarr images to the hpcdeconv zarr layout"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``hpcdeconv ingest``."""
    add_inputs_argument(p)
    p.add_argument(
        "--output",
        type=Path,
        required=True,
        help="zarr dataset to create (or add to, with --append)",
    )
    add_voxel_size_argument(p)
    add_select_arguments(p)
    p.add_argument("--domain", choices=["blurred", "sharp"], default="blurred")
    p.add_argument("--split", choices=["train", "val", "test"], default="train")
    p.add_argument(
        "--chunks",
        type=positive_int,
        nargs="+",
        default=[64, 64, 64],
        metavar="N",
        help="storage chunks (Z Y X or Y X); 2D images take the last two",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true", help="replace an existing output")
    group.add_argument(
        "--append",
        action="store_true",
        help="add the images to an existing dataset (e.g. the sharp half of a pair)",
    )


def run(args: argparse.Namespace) -> int:
    """Convert images into the hpcdeconv zarr dataset layout."""
    from hpcdeconv.config import CodecConfig, StorageConfig
    from hpcdeconv.data.ingest import ingest_images
    from hpcdeconv.data.summary import describe

    if len(args.chunks) not in (2, 3):
        raise InputError(f"--chunks takes 3 (Z Y X) or 2 (Y X) sizes, got {len(args.chunks)}")
    inputs = [("input", path) for path in args.inputs]
    # --append writes into the existing output, so only a new one is checked for replacement.
    overwrite = None if args.append else args.overwrite
    with locked_outputs(NAME, [("--output", args.output, "zarr")], inputs, overwrite):
        storage = StorageConfig(chunks=tuple(args.chunks), codec=CodecConfig())
        ids = ingest_images(
            args.inputs,
            args.output,
            voxel_size=args.voxel_size,
            select=selection(args),
            domain=args.domain,
            split=args.split,
            storage=storage,
            overwrite=args.overwrite,
            append=args.append,
        )
        log.info("ingested %d volume(s): %s", len(ids), ", ".join(ids))
        print(describe(args.output))
        return 0
