"""``hpcdeconv info``: describe a zarr store (v2/v3, OME-Zarr, dataset) or an image file."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "info"
HELP = "print the volumes of a zarr store or image file: shape, axes, voxel size, codecs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``hpcdeconv info``."""
    p.add_argument(
        "path", type=Path, help="zarr group/array (v2 or v3), OME-Zarr image, TIFF or .npy"
    )


def run(args: argparse.Namespace) -> int:
    """Print what hpcdeconv reads from ``args.path``."""
    from hpcdeconv.data.opener import describe_image, open_image
    from hpcdeconv.data.summary import describe

    if args.path.is_dir():
        print(describe(args.path))
    else:
        # Every layout some command reads: 2D images and channels too, not only stacks.
        print(describe_image(open_image(args.path, warn=False, any_rank=True)))
    return 0


# --------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------
