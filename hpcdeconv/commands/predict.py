"""``hpcdeconv predict``: deconvolve one volume in memory with a trained deblurring generator."""

from __future__ import annotations

import argparse
from pathlib import Path

from hpcdeconv.commands.common import (
    add_checkpoint_arguments,
    add_config_args,
    config_inputs,
    locked_outputs,
)
from hpcdeconv.commands.image_args import add_voxel_size_argument, voxel_size
from hpcdeconv.errors import InputError

NAME = "predict"
HELP = "deconvolve one volume in memory with a trained G"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``hpcdeconv predict``."""
    add_config_args(p)
    p.add_argument(
        "input", type=Path, help="TIFF/OME-TIFF, zarr array or OME-Zarr image (docs/formats.md)"
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
    """Deconvolve one volume in memory with a trained deblurring generator."""
    import torch

    from hpcdeconv.config import PredictConfig, load_config
    from hpcdeconv.data.opener import load
    from hpcdeconv.inference.frozen import inference_network
    from hpcdeconv.inference.model import load_model
    from hpcdeconv.inference.predict import PredictSettings, predict_volume
    from hpcdeconv.inference.volume_io import check_finite, open_input, write_output
    from hpcdeconv.training.strategy import resolve_device

    cfg = load_config(PredictConfig, args.config, args.set)
    inputs = [("input", args.input), ("--checkpoint", args.checkpoint), ("--truth", args.truth)]
    outputs = [("--output", args.output, "zarr" if _is_zarr(args.output) else "file")]
    outputs.append(("--png", args.png, "file"))
    with locked_outputs(NAME, outputs, [*inputs, *config_inputs(args)], args.overwrite):
        # Inputs are opened (axes, units) before the model is loaded: bad files fail fast.
        source = open_input(args.input, voxel_size(args))
        truth_source = None if args.truth is None else open_input(args.truth, voxel_size(args))
        if truth_source is not None and truth_source.data.shape != source.data.shape:
            raise InputError(
                f"--truth has shape {truth_source.data.shape}, the input {source.data.shape}"
            )
        device = resolve_device(cfg.device)
        model = load_model(args.checkpoint, device, weights=args.weights)
        # The tile must suit the checkpoint's network: checked before any output is written.
        PredictSettings(cfg.tile, cfg.overlap, cfg.blend, size_multiple=model.size_multiple)
        volume = load(source)
        check_finite(volume, str(args.input))
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        pred = predict_volume(
            inference_network(model.net, device, dtype, cfg.freeze),
            volume,
            tile=cfg.tile,
            overlap=cfg.overlap,
            blend=cfg.blend,
            batch_size=cfg.batch_size,
            device=device,
            autocast_dtype=dtype,
            size_multiple=model.size_multiple,
            progress=True,
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
        where = write_output(
            args.output, pred, source.voxel_size, source.name, attrs, args.overwrite
        )
        print(f"deconvolved {args.input} {volume.shape} -> {where}")
        panels = [("input", volume), ("output", pred)]
        if truth_source is not None:
            from hpcdeconv.metrics import psnr, ssim

            truth = load(truth_source)
            rng = float(truth.max() - truth.min()) or 1.0
            print(
                f"PSNR input {psnr(volume, truth, rng):.2f} dB -> output "
                f"{psnr(pred, truth, rng):.2f} dB; SSIM input {ssim(volume, truth, rng):.4f} "
                f"-> output {ssim(pred, truth, rng):.4f}"
            )
            panels.append(("truth", truth))
        if args.png is not None:
            from hpcdeconv.viz import save_orthoviews

            # The figure needs an aspect ratio; an unknown size is drawn as one voxel.
            spacing = tuple(1.0 if v is None else v for v in source.voxel_size)
            save_orthoviews(args.png, panels, spacing, mode="mip")
        return 0
