"""``hpcdeconv deconvolve``: block-wise deconvolution of whole volumes on a dask cluster."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcdeconv.commands.common import (
    add_checkpoint_arguments,
    add_cluster_location_arguments,
    add_config_args,
    cluster_location_overrides,
    config_inputs,
    locked_outputs,
    positive_int,
)
from hpcdeconv.commands.image_args import add_inputs_argument, add_voxel_size_argument, voxel_size

if TYPE_CHECKING:
    from distributed import Client

    from hpcdeconv.config import ClusterConfig
    from hpcdeconv.inference.driver import RunReport
    from hpcdeconv.inference.output import OutputMode
    from hpcdeconv.inference.plan import BlockPlan
    from hpcdeconv.inference.processors import BlockProcessor
    from hpcdeconv.inference.sources import VolumeSource

NAME = "deconvolve"
HELP = "deconvolve whole volumes block by block on a dask cluster into zarr"


def _halo(text: str) -> str:
    """argparse type: ``auto`` or a non-negative integer."""
    if text != "auto" and not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be 'auto' or an integer >= 0, got {text!r}")
    return text


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    """Cluster, decomposition and output-mode arguments shared with ``hpcdeconv rl``."""
    add_config_args(p)
    p.add_argument("--output", type=Path, required=True, help="output .zarr directory")
    add_cluster_location_arguments(p)
    p.add_argument(
        "--block", type=positive_int, help="block side in voxels (every axis the method sees)"
    )
    p.add_argument("--halo", type=_halo, help="'auto' or voxels read beyond each block side")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace an existing output")
    mode.add_argument("--resume", action="store_true", help="continue an interrupted run")


def cluster_overrides(args: argparse.Namespace, block_axes: int | None = 3) -> list[str]:
    """``--set`` style overrides for the shortcut flags; they win over --config and --set.

    ``--block`` is given ``block_axes`` axes; ``None`` leaves it out (set once the
    number of axes is known, see :func:`block_override`).
    """
    overrides = cluster_location_overrides(args)
    if args.block is not None and block_axes is not None:
        overrides.append(block_override(args.block, block_axes))
    if args.halo is not None:
        overrides.append(f"halo={args.halo}")
    return overrides


def block_override(side: int, axes: int, name: str = "block") -> str:
    """``--block N`` as the override ``block=[N, N(, N)]`` for ``axes`` axes (of the
    config field ``name``)."""
    return f"{name}=[{', '.join([str(side)] * axes)}]"


def output_mode(args: argparse.Namespace) -> OutputMode:
    """``new``, ``overwrite`` or ``resume``."""
    return "overwrite" if args.overwrite else "resume" if args.resume else "new"


def locked_cluster_output(
    verb: str,
    args: argparse.Namespace,
    inputs: list[tuple[str, Path | None]],
    mode: OutputMode,
    cluster: ClusterConfig,
) -> AbstractContextManager[None]:
    """Hold the writer lock on ``--output`` for a ``with`` body, once it overlaps no input
    (``--config`` included); with ``--overwrite`` an existing output must also be a store
    hpcdeconv wrote (checked under the lock, see
    :func:`~hpcdeconv.commands.common.locked_outputs`).

    Under ``--cluster mpi`` every rank runs the command but only the client rank writes:
    the scheduler and worker ranks take no lock (they would refuse each other).
    """
    if cluster.kind == "mpi":
        from hpcdeconv.inference.cluster import is_mpi_client

        if not is_mpi_client():
            return nullcontext()
    inputs = [*inputs, *[("input", p) for p in args.inputs], *config_inputs(args)]
    replace = True if mode == "overwrite" else None
    return locked_outputs(verb, [("--output", args.output, "zarr")], inputs, replace)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``hpcdeconv deconvolve``."""
    add_inputs_argument(p)
    add_checkpoint_arguments(p)
    add_voxel_size_argument(p)
    add_cluster_arguments(p)


def run_on_cluster(
    cluster: ClusterConfig,
    sources: Sequence[VolumeSource],
    output: Path,
    processor: BlockProcessor,
    plan: BlockPlan,
    mode: OutputMode,
    provenance: dict[str, Any],
) -> None:
    """Check the workers' memory against one block, start the cluster, run every block."""
    from hpcdeconv.inference.cluster import open_client
    from hpcdeconv.inference.driver import deconvolve_volumes
    from hpcdeconv.inference.memory import check_memory_setting

    check_memory_setting(cluster, processor, plan, sources)
    with open_client(cluster) as client:
        print_client(client, cluster)
        report = deconvolve_volumes(client, sources, output, processor, plan, mode, provenance)
    print_report(report)


def print_client(client: Client, cfg: ClusterConfig) -> None:
    """Where the scheduler (and its dashboard) can be reached."""
    from hpcdeconv.inference.cluster import dashboard_url

    where = f"dask scheduler {client.scheduler.address}"
    url = dashboard_url(client, cfg)
    print(where if url is None else f"{where}, dashboard {url}")


def print_report(report: RunReport) -> None:
    """One summary line and the output arrays."""
    print(
        f"{report.processed} block(s) computed, {report.skipped} already done, "
        f"{report.voxels} voxels in {report.seconds:.1f} s "
        f"({report.voxels_per_second:.3g} voxels/s)"
    )
    for path in report.outputs:
        print(f"  -> {path}")
    if not report.complete:
        print("stopped before every block was done; run again with --resume")


def run(args: argparse.Namespace) -> int:
    """Deconvolve the inputs block by block with a trained image-to-image generator.

    A 2D generator runs on 2D images and on stacks of planes ``(Z, Y, X)``, one plane per
    task, with the halo in Y and X only; ``block``, ``tile`` and ``chunks`` then have two
    sizes ``(Y, X)``.
    """
    import logging

    from hpcdeconv.config import DeconvolveConfig, load_config
    from hpcdeconv.inference.model import load_model
    from hpcdeconv.inference.output import check_output
    from hpcdeconv.inference.plan import check_halo, check_plan, image_plan
    from hpcdeconv.inference.processors import NetworkProcessor
    from hpcdeconv.inference.sources import check_layout, open_sources

    overrides = [*args.set, *cluster_overrides(args, block_axes=None)]
    cfg = load_config(DeconvolveConfig, args.config, overrides)
    mode = output_mode(args)
    sources = open_sources(args.inputs, voxel_size(args), any_rank=True)
    check_output(args.output, sources, mode)
    with locked_cluster_output(NAME, args, [("--checkpoint", args.checkpoint)], mode, cfg.cluster):
        model = load_model(args.checkpoint, "cpu", weights=args.weights)
        dims = model.spatial_dims
        if args.block is not None:
            cfg = load_config(
                DeconvolveConfig, args.config, [*overrides, block_override(args.block, dims)]
            )
        for source in sources:
            how = check_layout(
                source.dims, source.shape, dims, model.channels, str(source.path), source.rgb
            )
            if how:
                logging.getLogger(__name__).info("%s: runs %s", source.path, how)
        radius = model.receptive_field // 2
        halo = radius if cfg.halo == "auto" else cfg.halo
        check_halo((halo,) * dims, (radius,) * dims, "receptive-field radius of the network")
        plan = image_plan(
            sources,
            cfg.shape_for("block", dims),
            (halo,) * dims,
            cfg.shape_for("chunks", dims),
            cfg.retries,
            model.channels,
        )
        check_plan(plan, sources)
        trained = model.config.train
        tile, overlap = cfg.tiling_for(trained.val_tile, trained.val_overlap, dims)
        processor = NetworkProcessor.from_model(
            model,
            tile,
            overlap,
            cfg.blend,
            cfg.batch_size,
            cfg.precision,
            cfg.cluster.threads_per_worker,
            freeze=cfg.freeze,
        )
        # The provenance records the tiles that run (rounded up to the network's multiple).
        tile = processor.settings.rounded_tile
        cfg = cfg.model_copy(update={"tile": tile, "overlap": overlap})
        logging.getLogger(__name__).info("tiles %s, overlap %d", list(tile), overlap)
        provenance = {
            "command": "deconvolve",
            "checkpoint": str(processor.checkpoint),
            "checkpoint_sha256": processor.sha256,
            "step": model.step,
            "weights": model.weights,
            "method": model.config.method.name,
            "config": cfg.model_dump(mode="json"),
        }
        run_on_cluster(cfg.cluster, sources, args.output, processor, plan, mode, provenance)
        return 0
