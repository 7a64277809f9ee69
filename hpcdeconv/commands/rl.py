"""``hpcdeconv rl``: block-wise (TV-)Richardson-Lucy of whole volumes on a dask cluster."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import get_args

import numpy as np

from hpcdeconv.commands.deconvolve import (
    add_cluster_arguments,
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
    return overrides + cluster_overrides(args)


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


def run(args: argparse.Namespace) -> int:
    """Deconvolve the inputs block by block with (TV-)Richardson-Lucy."""
    from hpcdeconv.classical.rl import richardson_lucy, rl_halo
    from hpcdeconv.config import load_config
    from hpcdeconv.inference.output import check_output
    from hpcdeconv.inference.plan import BlockPlan, check_halo, check_plan
    from hpcdeconv.inference.processors import RLProcessor
    from hpcdeconv.inference.sources import open_sources

    cfg = load_config(RLConfig, args.config, _overrides(args))
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
