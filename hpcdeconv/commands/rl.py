"""``hpcdeconv rl``: block-wise (TV-)Richardson-Lucy of whole volumes on a dask cluster."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import get_args

import numpy as np

from hpcdeconv.commands.deconvolve import (
    add_cluster_arguments,
    block_override,
    cluster_overrides,
    locked_cluster_output,
    output_mode,
    run_on_cluster,
)
from hpcdeconv.commands.image_args import add_inputs_argument, add_voxel_size_argument, voxel_size
from hpcdeconv.config import RLConfig
from hpcdeconv.errors import InputError

logger = logging.getLogger(__name__)

NAME = "rl"
HELP = "Richardson-Lucy (optionally TV) deconvolution, block by block on a dask cluster"

PSF_MODELS = ("born-wolf", "richards-wolf", "gibson-lanni", "gaussian")
#: rl.boundary's choices, from the config model (importing the solver would load torch here).
BOUNDARIES = get_args(RLConfig.model_fields["boundary"].annotation)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``hpcdeconv rl``."""
    add_inputs_argument(p)
    psf = p.add_mutually_exclusive_group(required=True)
    psf.add_argument(
        "--psf", type=Path, help="measured PSF: 3D TIFF/OME-TIFF, .npy or zarr, centre at k // 2"
    )
    psf.add_argument(
        "--psf-model",
        choices=PSF_MODELS,
        help="compute the PSF (settings: psf.* of --config/--set)",
    )
    psf.add_argument(
        "--psf-map",
        type=Path,
        metavar="MAP.zarr",
        help="spatially-variant RL of 2D images with the PSF map of `hpcdeconv estimate-psf` "
        "(overlap-add, Shajkofci & Liebling 2020 eq. 13; crop: psf_crop of --config/--set)",
    )
    p.add_argument("--iterations", type=int, help="RL iterations (default: config, 20)")
    p.add_argument("--tv", type=float, help="TV weight lambda (default: config, 0 = plain RL)")
    p.add_argument(
        "--boundary",
        choices=BOUNDARIES,
        help="the volume's border: reflect (scene continues, default) or truncated "
        "(dark outside; bright rim)",
    )
    add_voxel_size_argument(p)
    add_voxel_size_argument(p, "the --psf file", flag="--psf-voxel-size")
    add_cluster_arguments(p)


def _check_sampling(
    psf_voxel: tuple[float | None, ...],
    inputs: list[tuple[float | None, ...]],
    fix: str,
) -> None:
    """Warn when a known PSF sampling differs from a known input sampling (every axis that
    differs is named, with ``fix``), or when the PSF's sampling is unknown."""
    if any(p is None for p in psf_voxel):
        logger.warning(
            "the PSF's voxel size %s is not fully known; RL assumes it matches the inputs' "
            "(%s to state it)",
            psf_voxel,
            fix,
        )
        return
    for voxel in inputs:
        axes = [
            axis
            for axis, p, v in zip("ZYX", psf_voxel, voxel, strict=True)
            if v is not None and not np.isclose(p, v, rtol=0.01)
        ]
        if axes:
            logger.warning(
                "PSF voxel size %s differs from input voxel size %s along %s; RL then "
                "deconvolves with a PSF of the wrong width (%s)",
                psf_voxel,
                voxel,
                ", ".join(axes),
                fix,
            )
            return


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.set)
    if args.psf_model is not None:
        overrides.append(f"psf.model={args.psf_model.replace('-', '_')}")
    if args.iterations is not None:
        overrides.append(f"iterations={args.iterations}")
    if args.tv is not None:
        overrides.append(f"tv={args.tv}")
    if args.boundary is not None:
        overrides.append(f"boundary={args.boundary}")
    if args.block is not None:
        # --psf-map deconvolves 2D images, in blocks of their own (RLConfig.map_block).
        name, axes = ("map_block", 2) if args.psf_map is not None else ("block", 3)
        overrides.append(block_override(args.block, axes, name))
    return overrides + cluster_overrides(args, block_axes=None)


def _psf(
    cfg: RLConfig, args: argparse.Namespace, voxel_sizes: list[tuple[float | None, ...]]
) -> tuple[np.ndarray, dict[str, object]]:
    """The PSF and how it was obtained (for the output's provenance).

    A computed PSF is sampled on ``psf.voxel_size``; inputs sampled differently get a
    warning, since RL would then deconvolve with a PSF of the wrong width.
    """
    if args.psf is not None:
        from hpcdeconv.physics.psf_io import read_psf

        given = args.psf_voxel_size
        data, psf_voxel = read_psf(args.psf, given, source="--psf")
        _check_sampling(psf_voxel, voxel_sizes, "--psf-voxel-size DZ DY DX")
        return data, {"file": str(args.psf.absolute()), "voxel_size": list(psf_voxel)}
    from hpcdeconv.physics.psf import make_psf

    psf = make_psf(cfg.psf)
    if psf.data.ndim != 3:
        raise InputError(f"PSF model {cfg.psf.model} gives a {psf.data.ndim}D PSF; RL needs 3D")
    _check_sampling(tuple(psf.voxel_size), voxel_sizes, "--set psf.voxel_size=[DZ, DY, DX]")
    return psf.data, {"model": cfg.psf.model_dump(mode="json")}


def _run_psf_map(args: argparse.Namespace, cfg: RLConfig) -> int:
    """Spatially-variant (TV-)RL of 2D images with a PSF map, block by block.

    The map is read and checked against every image before the output is locked or
    created; blocks are ``map_block``, chunks the ``(Y, X)`` sizes of ``chunks``.
    """
    from hpcdeconv.classical.rl import rl_halo
    from hpcdeconv.classical.sv_rl import sv_richardson_lucy
    from hpcdeconv.inference.output import check_output
    from hpcdeconv.inference.plan import check_halo, check_plan, image_plan
    from hpcdeconv.inference.sources import open_sources
    from hpcdeconv.inference.sv_processor import SVRLProcessor
    from hpcdeconv.psfnet.psf_map import read_psf_map

    mode = output_mode(args)
    sources = open_sources(args.inputs, voxel_size(args), any_rank=True)
    for source in sources:
        if source.dims != "YX":
            raise InputError(
                f"{source.path}: --psf-map deconvolves 2D (Y, X) images, this one has "
                f"axes {source.dims} {list(source.shape)}"
            )
    check_output(args.output, sources, mode)
    psf_map = read_psf_map(args.psf_map)
    for source in sources:
        psf_map.check_image(source.shape, str(source.path))
        _check_map_sampling(psf_map.voxel_size, source.spatial_voxel_size)
    # Zero iterations on a tiny image validates tv for 2D data here rather than on workers.
    sv_richardson_lucy(
        np.ones((2, 2), np.float32), np.ones((1, 1, 1, 1)), ([1.0], [1.0]), 0, cfg.tv
    )
    with locked_cluster_output(NAME, args, [("--psf-map", args.psf_map)], mode, cfg.cluster):
        processor = SVRLProcessor.from_map(
            psf_map,
            cfg.iterations,
            cfg.tv,
            cfg.psf_crop,
            cfg.cluster.threads_per_worker,
            boundary=cfg.boundary,
        )
        size = (processor.psf_size,) * 2
        halo = rl_halo(size) if cfg.halo == "auto" else (cfg.halo,) * 2
        check_halo(halo, tuple(k // 2 for k in size), "PSF radius")
        plan = image_plan(sources, cfg.map_block, halo, cfg.chunks[-2:], cfg.retries)
        check_plan(plan, sources)
        provenance = {
            "command": "rl",
            "psf_map": {
                "path": str(args.psf_map.absolute()),
                "sha256": processor.sha256,
                "psf_model": psf_map.model.record(),
                "window": psf_map.window,
                "stride": psf_map.stride,
                "psf_size": processor.psf_size,
            },
            "config": cfg.model_dump(mode="json"),
        }
        run_on_cluster(cfg.cluster, sources, args.output, processor, plan, mode, provenance)
        return 0


def _check_map_sampling(map_voxel: tuple[float, float], image: tuple[float | None, ...]) -> None:
    """Warn when a known image pixel size differs from the one the map was estimated at."""
    known = [(m, v) for m, v in zip(map_voxel, image, strict=True) if v is not None]
    if any(not np.isclose(m, v, rtol=0.01) for m, v in known):
        logger.warning(
            "the PSF map was estimated at pixel size %s µm, the image has %s; its PSFs then "
            "have the wrong width",
            list(map_voxel),
            list(image),
        )


def run(args: argparse.Namespace) -> int:
    """Deconvolve the inputs block by block with (TV-)Richardson-Lucy."""
    from hpcdeconv.classical.rl import richardson_lucy, rl_halo
    from hpcdeconv.config import load_config
    from hpcdeconv.inference.output import check_output
    from hpcdeconv.inference.plan import BlockPlan, check_halo, check_plan
    from hpcdeconv.inference.processors import RLProcessor
    from hpcdeconv.inference.sources import open_sources

    cfg = load_config(RLConfig, args.config, _overrides(args))
    if args.psf_map is not None:
        return _run_psf_map(args, cfg)
    mode = output_mode(args)
    sources = open_sources(args.inputs, voxel_size(args))
    check_output(args.output, sources, mode)
    with locked_cluster_output(NAME, args, [("--psf", args.psf)], mode, cfg.cluster):
        psf, origin = _psf(cfg, args, [s.voxel_size for s in sources])
        radius = tuple(k // 2 for k in psf.shape)
        halo = rl_halo(psf.shape) if cfg.halo == "auto" else (cfg.halo,) * 3
        check_halo(halo, radius, "PSF radius")
        plan = BlockPlan(cfg.block, halo, cfg.chunks, cfg.retries)
        check_plan(plan, sources)
        processor = RLProcessor(
            psf, cfg.iterations, cfg.tv, cfg.cluster.threads_per_worker, boundary=cfg.boundary
        )
        # Zero iterations on a tiny image validates the PSF and tv here rather than on every worker.
        richardson_lucy(np.ones((2, 2, 2), np.float32), psf, 0, tv=cfg.tv)
        provenance = {"command": "rl", "psf": origin, "config": cfg.model_dump(mode="json")}
        run_on_cluster(cfg.cluster, sources, args.output, processor, plan, mode, provenance)
        return 0
