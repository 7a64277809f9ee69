"""Arguments shared by the verbs that read images: ``--voxel-size``, ``--time``, ``--channel``."""

from __future__ import annotations

import argparse
from pathlib import Path


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _index(text: str) -> int:
    """argparse type: an integer >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return int(text)


class _VoxelSizeAction(argparse.Action):
    """Stores 2 (DY DX) or 3 (DZ DY DX) sizes; argparse has no "2 or 3" count of its own."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        sizes = list(values)  # type: ignore[call-overload]
        if len(sizes) not in (2, 3):
            parser.error(
                f"argument {option_string}: takes DZ DY DX (a volume) or DY DX (a 2D image) in "
                f"µm, got {len(sizes)} values (put the input files before {option_string})"
            )
        setattr(namespace, self.dest, sizes)


def add_inputs_argument(p: argparse.ArgumentParser) -> None:
    """The positional ``INPUT ...`` of the verbs that read several volumes."""
    p.add_argument(
        "inputs",
        type=Path,
        nargs="+",
        metavar="INPUT",
        help="images (Z, Y, X); deconvolve with a 2D generator also takes (Y, X) and stacks "
        "of planes: TIFF/OME-TIFF, .npy, zarr array or OME-Zarr image (docs/formats.md)",
    )


def add_voxel_size_argument(
    p: argparse.ArgumentParser, what: str = "every input", flag: str = "--voxel-size"
) -> None:
    """``--voxel-size DZ DY DX`` or ``DY DX`` (µm, or ``flag``), overriding the metadata of
    ``what``; the count is checked against each image's spatial axes when it is opened."""
    p.add_argument(
        flag,
        type=_positive_float,
        nargs="+",
        action=_VoxelSizeAction,
        metavar="D",
        help=f"voxel size of {what} in µm: DZ DY DX for a volume, DY DX for a 2D image "
        "(default: read from the file; unknown sizes stay unknown in the output)",
    )


def add_select_arguments(p: argparse.ArgumentParser) -> None:
    """``--time N`` and ``--channel N``: take one time point / channel of a larger file."""
    p.add_argument("--time", type=_index, metavar="N", help="time point to take (axis T)")
    p.add_argument(
        "--channel", type=_index, metavar="N", help="channel to take (axis C, or S of RGB)"
    )


def voxel_size(args: argparse.Namespace) -> tuple[float, ...] | None:
    """The ``--voxel-size`` given (2 or 3 sizes, checked against an image when it is opened:
    :func:`hpcdeconv.data.opener.check_voxel_size`), or None."""
    value = getattr(args, "voxel_size", None)
    return None if value is None else tuple(value)


def selection(args: argparse.Namespace) -> dict[str, int]:
    """``{"T": ..., "C": ...}`` from ``--time``/``--channel`` (only those given)."""
    chosen = {"T": getattr(args, "time", None), "C": getattr(args, "channel", None)}
    return {axis: index for axis, index in chosen.items() if index is not None}
