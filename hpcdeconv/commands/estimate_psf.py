"""``hpcdeconv estimate-psf``: the spatially-variant PSF map of a 2D image from a trained CNN.

Windows of the checkpoint's patch side slide over the image every ``--stride`` pixels;
the PSF-regression network estimates each window's PSF parameters and invalidity; windows
without texture are filled from their valid neighbours (inverse-distance weighting, the
paper's KNN regression). The map store (:mod:`hpcdeconv.psfnet.psf_map`) feeds
``hpcdeconv rl --psf-map`` and ``hpcdeconv depth``. With ``--cluster``/``--scheduler`` (or
``distributed: true``) the window rows go to a dask cluster in bands.
"""

from __future__ import annotations

import argparse
import logging
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, get_args

from hpcdeconv.commands.common import (
    add_cluster_location_arguments,
    add_config_args,
    cluster_location_overrides,
    config_inputs,
    locked_outputs,
    positive_int,
)
from hpcdeconv.commands.image_args import add_voxel_size_argument, voxel_size
from hpcdeconv.config.psfnet import PSFModelName
from hpcdeconv.errors import InputError

if TYPE_CHECKING:
    import numpy as np

    from hpcdeconv.config import PSFMapConfig
    from hpcdeconv.inference.sources import VolumeSource
    from hpcdeconv.psfnet.estimate import FillSettings
    from hpcdeconv.psfnet.psf_map import PSFMap
    from hpcdeconv.psfnet.psf_models import PSFModel

logger = logging.getLogger(__name__)

NAME = "estimate-psf"
HELP = "spatially-variant PSF map of a 2D image with a trained PSF-regression CNN"

#: Longest side of the image drawn under the maps in --png.
FIGURE_SIDE = 1024


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``hpcdeconv estimate-psf``."""
    add_config_args(p)
    p.add_argument(
        "image", type=Path, help="2D image (Y, X): TIFF/OME-TIFF, .npy, zarr array or OME-Zarr"
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="psf_regression checkpoint file, or its run directory",
    )
    p.add_argument(
        "--weights",
        choices=("auto", "raw", "ema"),
        default="auto",
        help="trained weights or their moving average (auto: the average when present)",
    )
    p.add_argument(
        "--out", "--output", dest="out", type=Path, required=True, help="PSF map store, .zarr"
    )
    p.add_argument("--png", type=Path, help="figure of every parameter map over the image")
    p.add_argument(
        "--model",
        choices=get_args(PSFModelName),
        help="the PSF model expected; a checkpoint trained for another one is refused",
    )
    p.add_argument("--stride", type=positive_int, help="pixels between windows (default 64)")
    p.add_argument("--batch-size", type=positive_int, help="windows per network call (64)")
    p.add_argument(
        "--k", type=positive_int, help="valid neighbours averaged per invalid window (4)"
    )
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), help="where the network runs (auto)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    add_voxel_size_argument(p, "the image", flag="--voxel-size")
    add_cluster_location_arguments(p, "compute on a dask cluster, one task per band of window rows")
    p.add_argument("--band-rows", type=positive_int, help="window rows per dask task")


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.set)
    for flag, key in (
        ("stride", "stride"),
        ("batch_size", "batch_size"),
        ("k", "neighbours"),
        ("device", "device"),
        ("band_rows", "band_rows"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.cluster is not None or args.scheduler is not None:
        overrides.append("distributed=true")
    return overrides + cluster_location_overrides(args)


def _lock(args: argparse.Namespace, cfg: PSFMapConfig) -> AbstractContextManager[None]:
    """Lock the outputs; under ``--cluster mpi`` only the client rank writes and locks."""
    if cfg.distributed and cfg.cluster.kind == "mpi":
        from hpcdeconv.inference.cluster import is_mpi_client

        if not is_mpi_client():
            return nullcontext()
    outputs = [("--out", args.out, "zarr"), ("--png", args.png, "file")]
    inputs = [("input", args.image), ("--checkpoint", args.checkpoint), *config_inputs(args)]
    return locked_outputs(NAME, outputs, inputs, args.overwrite)


def _pixel_size(source: VolumeSource, model: PSFModel) -> tuple[float, float]:
    """The image's (dy, dx) in µm, or the model's pixel size where unknown; a warning when
    the image is sampled unlike the training data."""
    pixel = model.optics.pixel_size
    dy, dx = source.spatial_voxel_size
    sizes = (pixel if dy is None else float(dy), pixel if dx is None else float(dx))
    if any(abs(s - pixel) > 0.01 * pixel for s in sizes):
        logger.warning(
            "%s: pixel size %s µm differs from the %g µm the network was trained for; the "
            "PSF parameters are in the network's sampling",
            source.path,
            sizes,
            pixel,
        )
    return sizes


def _thumbnail(source: VolumeSource) -> np.ndarray:
    """The image subsampled to at most :data:`FIGURE_SIDE` pixels a side."""
    step = max(1, -(-max(source.shape) // FIGURE_SIDE))
    return source.read((slice(None, None, step), slice(None, None, step)))


def run(args: argparse.Namespace) -> int:
    """Estimate the PSF map of one 2D image and write it (and its figure)."""
    from hpcdeconv.config import PSFMapConfig, load_config
    from hpcdeconv.data.zarr_io import update_root_attrs
    from hpcdeconv.inference.sources import open_source
    from hpcdeconv.psfnet.estimate import FillSettings, grid
    from hpcdeconv.psfnet.psf_map import write_psf_map
    from hpcdeconv.psfnet.regressor import load_regressor
    from hpcdeconv.training.strategy import resolve_device

    cfg = load_config(PSFMapConfig, args.config, _overrides(args))
    fill = FillSettings(cfg.threshold, cfg.neighbours, cfg.power)
    with _lock(args, cfg):
        source = open_source(args.image, voxel_size(args), any_rank=True)
        if source.dims != "YX":
            raise InputError(
                f"{args.image}: a PSF map needs a 2D (Y, X) image, got axes {source.dims} "
                f"of shape {list(source.shape)}"
            )
        device = resolve_device("cpu" if cfg.distributed else cfg.device)
        loaded = load_regressor(args.checkpoint, device, weights=args.weights)
        if args.model is not None and loaded.model.name != args.model:
            raise InputError(
                f"{args.checkpoint}: the checkpoint was trained for the {loaded.model.name} "
                f"PSF model, not {args.model}"
            )
        shape = (source.shape[0], source.shape[1])
        starts_y, starts_x = grid(shape, loaded.window, cfg.stride)
        pixel = _pixel_size(source, loaded.model)
        start = time.perf_counter()
        if cfg.distributed:
            m = _on_cluster(args, cfg, source, loaded.model, loaded.window, pixel, fill)
        else:
            from hpcdeconv.inference.sources import check_finite
            from hpcdeconv.psfnet.estimate import estimate_psf_map

            image = source.load()
            check_finite(image, str(args.image))
            m = estimate_psf_map(
                image, loaded.predict, loaded.model, loaded.window, cfg.stride,
                voxel_size=pixel, batch_size=cfg.batch_size, fill=fill, device=device,
            )  # fmt: skip
        seconds = time.perf_counter() - start
        group = write_psf_map(args.out, m, overwrite=args.overwrite)
        update_root_attrs(
            group,
            command=NAME,
            image=str(source.path),
            checkpoint=str(Path(args.checkpoint).absolute()),
            config=cfg.model_dump(mode="json"),
        )
        windows = len(starts_y) * len(starts_x)
        print(
            f"{args.image} {list(shape)}: {len(starts_y)}x{len(starts_x)} windows of "
            f"{loaded.window} (stride {cfg.stride}), {int(m.estimated.sum())} estimated, "
            f"{windows - int(m.estimated.sum())} filled, in {seconds:.2f} s -> {args.out}"
        )
        if args.png is not None:
            _save_png(args.png, m, source)
        return 0


def _on_cluster(
    args: argparse.Namespace,
    cfg: PSFMapConfig,
    source: VolumeSource,
    model: PSFModel,
    window: int,
    pixel: tuple[float, float],
    fill: FillSettings,
) -> PSFMap:
    """The map computed on the dask cluster of ``cfg.cluster``, bands of window rows."""
    from hpcdeconv.commands.deconvolve import print_client
    from hpcdeconv.inference.cluster import GPU_RESOURCE, open_client, workers_declare_gpus
    from hpcdeconv.psfnet.estimate_cluster import CheckpointPredictor, estimate_on_client

    factory = CheckpointPredictor(Path(args.checkpoint).absolute(), cfg.device, args.weights)
    with open_client(cfg.cluster) as client:
        print_client(client, cfg.cluster)
        resources = {GPU_RESOURCE: 1} if workers_declare_gpus(client) else None
        return estimate_on_client(
            client, source, (source.shape[0], source.shape[1]), factory, model, window,
            cfg.stride, voxel_size=pixel, batch_size=cfg.batch_size,
            band_rows=cfg.band_rows, fill=fill, device=cfg.device, resources=resources,
            retries=cfg.retries,
        )  # fmt: skip


def _save_png(path: Path, m: PSFMap, source: VolumeSource) -> None:
    from hpcdeconv.psfnet.map_figure import save_map_figure

    save_map_figure(path, m, _thumbnail(source))
    print(f"figure -> {path}")
