"""``hpcdeconv info``: print a dataset's arrays, shapes, chunks, voxel size and codecs."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "info"
HELP = "print a dataset's arrays, chunks, voxel size and codecs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``hpcdeconv info``."""
    p.add_argument("path", type=Path, help="zarr group")


def run(args: argparse.Namespace) -> int:
    """Print a dataset's arrays, shapes, chunks, voxel size and codecs."""
    from hpcdeconv.data.zarr_io import describe

    print(describe(args.path))
    return 0


# --------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------
