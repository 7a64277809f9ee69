"""``hpcdeconv psf``: compute a PSF model and write it as TIFF or .npy, with an orthoview figure."""

from __future__ import annotations

import argparse
from pathlib import Path

from hpcdeconv.commands.common import add_config_args, config_inputs, locked_outputs
from hpcdeconv.errors import InputError

NAME = "psf"
HELP = "compute a PSF model and write it as TIFF or .npy"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``hpcdeconv psf``."""
    add_config_args(p)
    p.add_argument(
        "--model",
        choices=["born-wolf", "richards-wolf", "gibson-lanni", "gaussian", "zernike"],
        help="PSF model (overrides psf.model of --config)",
    )
    p.add_argument("--out", type=Path, required=True, help="output .tif/.tiff/.npy")
    p.add_argument("--png", type=Path, help="orthoview figure (XY, XZ, YZ)")
    p.add_argument("--log", action="store_true", help="logarithmic intensity in the figure")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def run(args: argparse.Namespace) -> int:
    """Compute a PSF model and write it as TIFF or .npy, with an orthoview figure."""
    import numpy as np
    import tifffile

    from hpcdeconv.config import PSFFileConfig, load_config
    from hpcdeconv.data.safety import SOFTWARE
    from hpcdeconv.physics.psf import make_psf

    overrides = list(args.set)
    if args.model is not None:
        overrides.insert(0, f"psf.model={args.model.replace('-', '_')}")
    cfg = load_config(PSFFileConfig, args.config, overrides)
    out: Path = args.out
    if out.suffix.lower() not in {".tif", ".tiff", ".npy"}:
        raise InputError(f"--out must end in .tif, .tiff or .npy, got {out.name}")
    outputs = [("--out", out, "file"), ("--png", args.png, "file")]
    with locked_outputs(NAME, outputs, config_inputs(args), args.overwrite):
        psf = make_psf(cfg.psf)
        if out.suffix.lower() == ".npy":
            np.save(out, psf.data)
        else:
            spacing = psf.voxel_size
            meta = {"unit": "um", "axes": "ZYX" if psf.data.ndim == 3 else "YX"}
            if psf.data.ndim == 3:
                meta["spacing"] = spacing[0]
            tifffile.imwrite(
                out,
                psf.data,
                imagej=True,
                software=SOFTWARE,
                photometric="minisblack",  # never guess RGB from a last axis of 3 or 4
                resolution=(1.0 / spacing[-1], 1.0 / spacing[-2]),
                metadata=meta,
            )
        if args.png is not None:
            from hpcdeconv.viz import save_orthoviews

            save_orthoviews(args.png, [(cfg.psf.model, psf.data)], psf.voxel_size, log=args.log)
        print(f"{cfg.psf.model} PSF {psf.data.shape} voxel {psf.voxel_size} µm -> {out}")
        return 0
