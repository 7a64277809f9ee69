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
    voxel_size,
)

log = logging.getLogger(__name__)

NAME = "ingest"
HELP = "convert TIFF / OME-TIFF / zarr / OME-Zarr images to the hpcdeconv zarr layout"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``hpcdeconv ingest``."""
    add_inputs_argument(p)
    p.add_argument("--output", type=Path, required=True, help="zarr group to create")
    add_voxel_size_argument(p)
    add_select_arguments(p)
    p.add_argument("--domain", choices=["blurred", "sharp"], default="blurred")
    p.add_argument("--split", choices=["train", "val", "test"], default="train")
    p.add_argument("--chunks", type=positive_int, nargs=3, default=[64, 64, 64])
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def run(args: argparse.Namespace) -> int:
    """Convert images into the hpcdeconv zarr dataset layout."""
    from hpcdeconv.config import CodecConfig, StorageConfig
    from hpcdeconv.data.ingest import ingest_images
    from hpcdeconv.data.summary import describe

    inputs = [("input", path) for path in args.inputs]
    with locked_outputs(NAME, [("--output", args.output, "zarr")], inputs, args.overwrite):
        storage = StorageConfig(chunks=tuple(args.chunks), codec=CodecConfig())
        ids = ingest_images(
            args.inputs,
            args.output,
            voxel_size=voxel_size(args),
            select=selection(args),
            domain=args.domain,
            split=args.split,
            storage=storage,
            overwrite=args.overwrite,
        )
        log.info("ingested %d volume(s): %s", len(ids), ", ".join(ids))
        print(describe(args.output))
        return 0
