"""``hpcdeconv ingest``: convert TIFF stacks into the hpcdeconv zarr dataset layout."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from hpcdeconv.commands.common import positive_int
from hpcdeconv.errors import InputError

log = logging.getLogger(__name__)

NAME = "ingest"
HELP = "convert TIFF stacks to the hpcdeconv zarr layout"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``hpcdeconv ingest``."""
    p.add_argument("inputs", type=Path, nargs="+", help="3D TIFF stacks (Z, Y, X)")
    p.add_argument("--output", type=Path, required=True, help="zarr group to create")
    p.add_argument(
        "--voxel-size",
        type=float,
        nargs=3,
        metavar=("DZ", "DY", "DX"),
        help="voxel size in µm (default: read from the TIFF metadata)",
    )
    p.add_argument("--domain", choices=["blurred", "sharp"], default="blurred")
    p.add_argument("--split", choices=["train", "val", "test"], default="train")
    p.add_argument("--chunks", type=positive_int, nargs=3, default=[64, 64, 64])
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def run(args: argparse.Namespace) -> int:
    """Convert TIFF stacks into the hpcdeconv zarr dataset layout."""
    from hpcdeconv.config import CodecConfig, StorageConfig
    from hpcdeconv.data.ingest import ingest_tiff
    from hpcdeconv.data.safety import check_outputs
    from hpcdeconv.data.zarr_io import describe

    inputs = [("input", path) for path in args.inputs]
    check_outputs([("--output", args.output, "zarr")], inputs, args.overwrite)

    storage = StorageConfig(chunks=tuple(args.chunks), codec=CodecConfig())
    voxel = tuple(args.voxel_size) if args.voxel_size is not None else None
    if voxel is not None and min(voxel) <= 0:
        raise InputError(f"--voxel-size must be positive, got {voxel}")
    ids = ingest_tiff(
        args.inputs,
        args.output,
        voxel_size=voxel,
        domain=args.domain,
        split=args.split,
        storage=storage,
        overwrite=args.overwrite,
    )
    log.info("ingested %d volume(s): %s", len(ids), ", ".join(ids))
    print(describe(args.output))
    return 0
