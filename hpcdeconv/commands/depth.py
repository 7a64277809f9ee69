"""``hpcdeconv depth``: depth from astigmatism (eq. 14) of a Zernike-3 PSF map, and its
calibration on images of a known tilted plane.

    hpcdeconv depth MAP.zarr --out DEPTH.zarr|.tif|.npy [--png D.png] [--calibration CAL.json]
    hpcdeconv depth --calibrate CAL.json --tilt MAP.zarr Z0 GY GX [--tilt MAP2.zarr ...]

The depth map has one value per map node ``(Gy, Gx)``: the eq. 14 index (waves), or µm
with ``--calibration``. See :mod:`hpcdeconv.psfnet.depth` for the sign convention and
the tilt ``z = Z0 + GY·y + GX·x`` (µm, ``y``/``x`` in µm from the top-left corner).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from hpcdeconv.commands.common import locked_outputs
from hpcdeconv.errors import InputError

if TYPE_CHECKING:
    import numpy as np

    from hpcdeconv.psfnet.depth import DepthCalibration
    from hpcdeconv.psfnet.psf_map import PSFMap

NAME = "depth"
HELP = "depth from astigmatism of a zernike3 PSF map (eq. 14), and its tilt calibration"

#: ``kind`` of a depth store.
DEPTH_KIND = "depth_map"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``hpcdeconv depth``."""
    p.add_argument("map", type=Path, nargs="?", help="zernike3 PSF map (hpcdeconv estimate-psf)")
    p.add_argument(
        "--out", "--output", dest="out", type=Path, help="depth map: .zarr, .tif/.tiff or .npy"
    )
    p.add_argument("--png", type=Path, help="figure of the depth map over the map's grid")
    p.add_argument("--calibration", type=Path, help="calibration JSON (--calibrate): depth in µm")
    p.add_argument(
        "--calibrate",
        type=Path,
        metavar="CAL.json",
        help="fit z_true = alpha z + beta on --tilt maps and write it here",
    )
    p.add_argument(
        "--tilt",
        nargs=4,
        action="append",
        default=[],
        metavar=("MAP", "Z0", "GY", "GX"),
        help="a map of an image of the plane z = Z0 + GY y + GX x (µm; y, x in µm); repeatable",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def _tilts(args: argparse.Namespace) -> list[tuple[Path, tuple[float, float, float]]]:
    out = []
    for path, *numbers in args.tilt:
        try:
            z0, gy, gx = (float(v) for v in numbers)
        except ValueError:
            raise InputError(f"--tilt {path}: Z0 GY GX must be numbers, got {numbers}") from None
        out.append((Path(path), (z0, gy, gx)))
    return out


def run(args: argparse.Namespace) -> int:
    """Write a depth map, or fit and write a calibration."""
    if args.calibrate is not None:
        if args.map is not None or args.out is not None or args.calibration is not None:
            raise InputError("--calibrate takes --tilt maps only (no MAP, --out or --calibration)")
        if not args.tilt:
            raise InputError("--calibrate needs at least one --tilt MAP Z0 GY GX")
        return _calibrate(args)
    if args.tilt:
        raise InputError("--tilt goes with --calibrate CAL.json")
    if args.map is None or args.out is None:
        raise InputError("give a PSF map and --out (or --calibrate with --tilt maps)")
    return _depth(args)


def _calibrate(args: argparse.Namespace) -> int:
    from hpcdeconv.psfnet.depth import fit_calibration
    from hpcdeconv.psfnet.psf_map import read_psf_map

    tilts = _tilts(args)
    inputs = [("--tilt", path) for path, _ in tilts]
    with locked_outputs(NAME, [("--calibrate", args.calibrate, "file")], inputs, args.overwrite):
        maps = [read_psf_map(path) for path, _ in tilts]
        cal = fit_calibration(maps, [t for _, t in tilts])
        cal.write(args.calibrate)
    print(
        f"z_true = {cal.alpha:.6g} z + {cal.beta:.6g} um from {cal.nodes} estimated nodes "
        f"(rms residual {cal.rms_um:.3g} um) -> {args.calibrate}"
    )
    return 0


def _depth(args: argparse.Namespace) -> int:
    from hpcdeconv.psfnet.depth import depth_index, read_calibration
    from hpcdeconv.psfnet.psf_map import read_psf_map

    suffix = args.out.suffix.lower()
    if suffix not in (".zarr", ".tif", ".tiff", ".npy"):
        raise InputError(f"--out must end in .zarr, .tif, .tiff or .npy, got {args.out.name}")
    kind = "zarr" if suffix == ".zarr" else "file"
    outputs = [("--out", args.out, kind), ("--png", args.png, "file")]
    inputs = [("input", args.map), ("--calibration", args.calibration)]
    with locked_outputs(NAME, outputs, inputs, args.overwrite):
        m = read_psf_map(args.map)
        cal = None if args.calibration is None else read_calibration(args.calibration)
        z = depth_index(m, str(args.map))
        depth = z if cal is None else cal.apply(z)
        unit = "waves (eq. 14 index)" if cal is None else "um"
        _write(args.out, depth, m, unit, cal, args.map, args.overwrite)
        print(
            f"depth of {m.params.shape[1]}x{m.params.shape[2]} nodes in {unit}: "
            f"{float(depth.min()):.4g} .. {float(depth.max()):.4g} -> {args.out}"
        )
        if args.png is not None:
            from hpcdeconv.psfnet.map_figure import save_map_figure

            title = "depth (µm)" if cal is not None else "depth index (eq. 14)"
            save_map_figure(args.png, m, None, [(title, depth, "coolwarm")], parameters=False)
            print(f"figure -> {args.png}")
    return 0


def _write(
    path: Path,
    depth: np.ndarray,
    m: PSFMap,
    unit: str,
    cal: DepthCalibration | None,
    source: Path,
    overwrite: bool,
) -> None:
    """Write the ``(Gy, Gx)`` depth as a zarr store (with node centres and the estimated
    mask), or as TIFF / ``.npy`` (TIFF pixel size: the stride; the last spacing may be
    smaller, see :mod:`hpcdeconv.psfnet.psf_map`)."""
    import dataclasses

    import numpy as np

    suffix = path.suffix.lower()
    if suffix == ".npy":
        np.save(path, depth.astype(np.float32))
        return
    if suffix in (".tif", ".tiff"):
        from hpcdeconv.inference.output import write_tiff

        spacing = (m.stride * m.voxel_size[0], m.stride * m.voxel_size[1])
        write_tiff(path, depth, spacing, axes="YX")
        return
    from hpcdeconv.data.zarr_io import create_dataset, update_root_attrs

    group = create_dataset(path, overwrite=overwrite)
    group.create_array("depth", data=depth.astype(np.float32))
    group.create_array("estimated", data=m.estimated)
    centres_y, centres_x = m.centres
    group.create_array("centres_y", data=centres_y)
    group.create_array("centres_x", data=centres_x)
    update_root_attrs(
        group,
        kind=DEPTH_KIND,
        unit=unit,
        psf_map=str(Path(source).absolute()),
        calibration=None if cal is None else dataclasses.asdict(cal),
        image_shape=list(m.image_shape),
        voxel_size=list(m.voxel_size),
        window=m.window,
        stride=m.stride,
    )
