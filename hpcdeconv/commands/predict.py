"""``hpcdeconv predict``: deconvolve one image in memory with a trained image-to-image generator.

The image may be a volume ``(Z, Y, X)``, a 2D image ``(Y, X)``, or either with channels
(``(C, ...)``, or RGB ``(Y, X, 3)`` as the file declares it). A 2D generator runs on a
volume plane by plane; a 1-channel generator on a multichannel image channel by channel.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from hpcdeconv.commands.common import (
    add_checkpoint_arguments,
    add_config_args,
    config_inputs,
    locked_outputs,
)
from hpcdeconv.commands.image_args import add_voxel_size_argument, voxel_size
from hpcdeconv.errors import InputError

NAME = "predict"
HELP = "deconvolve one image in memory with a trained G"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``hpcdeconv predict``."""
    add_config_args(p)
    p.add_argument(
        "input",
        type=Path,
        help="2D or 3D image, with channels or not: TIFF/OME-TIFF, zarr array or OME-Zarr "
        "image (docs/formats.md)",
    )
    add_checkpoint_arguments(p)
    p.add_argument("--output", type=Path, required=True, help=".tif, .npy or .zarr")
    p.add_argument("--truth", type=Path, help="ground truth: print PSNR/SSIM of in and out")
    p.add_argument("--png", type=Path, help="orthoview figure of input/output(/truth)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    add_voxel_size_argument(p, "the input (and --truth)")


def _is_zarr(path: Path) -> bool:
    return path.suffix.lower() == ".zarr"


def run(args: argparse.Namespace) -> int:
    """Deconvolve one image in memory with a trained image-to-image generator."""
    import logging

    from hpcdeconv.config import PredictConfig, load_config
    from hpcdeconv.inference.frozen import inference_network
    from hpcdeconv.inference.model import load_model
    from hpcdeconv.inference.output import write_output
    from hpcdeconv.inference.predict import PredictSettings, predict_volume
    from hpcdeconv.inference.sources import check_finite, check_layout, open_source
    from hpcdeconv.precision import autocast_dtype
    from hpcdeconv.training.strategy import resolve_device

    cfg = load_config(PredictConfig, args.config, args.set)
    inputs = [("input", args.input), ("--checkpoint", args.checkpoint), ("--truth", args.truth)]
    outputs = [("--output", args.output, "zarr" if _is_zarr(args.output) else "file")]
    outputs.append(("--png", args.png, "file"))
    with locked_outputs(NAME, outputs, [*inputs, *config_inputs(args)], args.overwrite):
        # Inputs are opened (axes, units) before the model is loaded: bad files fail fast.
        source = open_source(args.input, voxel_size(args), any_rank=True)
        truth_source = None
        if args.truth is not None:
            truth_source = open_source(args.truth, voxel_size(args), any_rank=True)
            if truth_source.shape != source.shape:
                raise InputError(
                    f"--truth has shape {truth_source.shape}, the input {source.shape}"
                )
        device = resolve_device(cfg.device)
        model = load_model(args.checkpoint, device, weights=args.weights)
        how = check_layout(
            source.dims,
            source.shape,
            model.spatial_dims,
            model.channels,
            str(args.input),
            source.rgb,
        )
        if how:
            logging.getLogger(__name__).info("%s: runs %s", args.input, how)
        # The tile must suit the checkpoint's network: checked before any output is written.
        trained = model.config.train
        tile, overlap = cfg.tiling_for(trained.val_tile, trained.val_overlap, model.spatial_dims)
        settings = PredictSettings(tile, overlap, cfg.blend, size_multiple=model.size_multiple)
        # The output records the tiles that ran (rounded up to the network's multiple).
        tile = settings.rounded_tile
        cfg = cfg.model_copy(update={"tile": tile, "overlap": overlap})
        logging.getLogger(__name__).info("tiles %s, overlap %d", list(tile), overlap)
        image = source.load()
        check_finite(image, str(args.input))
        dtype = autocast_dtype(cfg.precision)
        pred = predict_volume(
            inference_network(model.net, device, dtype, cfg.freeze),
            image,
            tile=tile,
            overlap=overlap,
            blend=cfg.blend,
            batch_size=cfg.batch_size,
            device=device,
            autocast_dtype=dtype,
            size_multiple=model.size_multiple,
            progress=True,
            channels=model.channels,
            lead=len(source.dims) - model.spatial_dims,
        )
        # A non-finite prediction of finite input is never written: half precision overflowed,
        # or the checkpoint's weights are not finite.
        advice = "run with --set precision=fp32" if dtype is not None else "check the checkpoint"
        check_finite(pred, f"the prediction of {args.input} ({advice}; nothing was written)")
        attrs = {
            "checkpoint": str(model.checkpoint),
            "step": model.step,
            "weights": model.weights,
            "method": model.config.method.name,
            "predict": cfg.model_dump(mode="json"),
        }
        spacing = source.spatial_voxel_size
        where = write_output(
            args.output, pred, spacing, source.name, attrs, args.overwrite, source.dims
        )
        print(f"deconvolved {args.input} {image.shape} -> {where}")
        panels = [("input", image), ("output", pred)]
        if truth_source is not None:
            truth = truth_source.load()
            _print_scores(image, pred, truth, source.dims, model.spatial_dims)
            panels.append(("truth", truth))
        if args.png is not None:
            _save_png(args.png, panels, spacing)
        return 0


def _print_scores(
    image: np.ndarray, pred: np.ndarray, truth: np.ndarray, dims: str, spatial_dims: int
) -> None:
    """PSNR over the whole image and SSIM as the generator sees it, of input and output.

    A 2D generator on a stack is scored plane by plane, channels one by one (averaged); an
    image thinner than the SSIM window gets the largest window that fits, said in the line.
    """
    from hpcdeconv.metrics import SSIM_WINDOW, psnr, ssim_as_seen

    rng = float(truth.max() - truth.min()) or 1.0
    ssim_in, window = ssim_as_seen(image, truth, rng, spatial_dims)
    ssim_out, _ = ssim_as_seen(pred, truth, rng, spatial_dims)
    notes = []
    if spatial_dims == 2 and "Z" in dims:
        notes.append("2D, per plane")
    if window < SSIM_WINDOW:
        notes.append(f"{spatial_dims}D, window {window}")
    label = "SSIM" + (f" ({'; '.join(notes)})" if notes else "")
    print(
        f"PSNR input {psnr(image, truth, rng):.2f} dB -> output "
        f"{psnr(pred, truth, rng):.2f} dB; {label} input {ssim_in:.4f} -> output {ssim_out:.4f}"
    )


def _save_png(
    path: Path, panels: list[tuple[str, np.ndarray]], spacing: tuple[float | None, ...]
) -> None:
    """Orthoviews (MIPs) of each ``(*S)`` or ``(C, *S)`` panel; a 2D image is drawn as
    itself, 3 channels as RGB, other channel counts by their first channel."""
    from hpcdeconv.viz import save_orthoviews

    # The figure needs an aspect ratio; an unknown size is drawn as one voxel.
    sizes = tuple(1.0 if v is None else v for v in spacing)
    save_orthoviews(path, panels, sizes, mode="mip")
