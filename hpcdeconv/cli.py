"""``hpcdeconv <verb>``: parse arguments, load the configuration, make one call.

Logging is configured here and nowhere else. Errors a user can cause
(:class:`~hpcdeconv.errors.HpcdeconvError`) are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from hpcdeconv import __version__
from hpcdeconv.errors import HpcdeconvError, InputError, OutputExistsError

log = logging.getLogger("hpcdeconv")

Handler = Callable[[argparse.Namespace], int]
_VAL_KEYS = ("psnr_input", "psnr", "ssim_input", "ssim")


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; pass --overwrite to replace it")


# --------------------------------------------------------------------------------------
# Verbs
# --------------------------------------------------------------------------------------


def _cmd_simulate(args: argparse.Namespace) -> int:
    from hpcdeconv.config import SimulateConfig, load_config
    from hpcdeconv.data.simulate import simulate
    from hpcdeconv.data.zarr_io import describe

    cfg = load_config(SimulateConfig, args.config, args.set)
    if args.png is not None:
        _refuse_existing(args.png, args.overwrite)
    shown = simulate(cfg, args.output, overwrite=args.overwrite, progress=True)
    if args.png is not None:
        from hpcdeconv.viz import save_orthoviews

        panels = [(f"sharp {shown.id}", shown.sharp), (f"blurred {shown.id}", shown.blurred)]
        save_orthoviews(args.png, panels, cfg.psf.voxel_size, mode="mip")
        log.info("figure: %s", args.png)
    print(describe(args.output))
    return 0


def _cmd_psf(args: argparse.Namespace) -> int:
    import numpy as np
    import tifffile

    from hpcdeconv.config import PSFFileConfig, load_config
    from hpcdeconv.physics.psf import make_psf

    overrides = list(args.set)
    if args.model is not None:
        overrides.insert(0, f"psf.model={args.model.replace('-', '_')}")
    cfg = load_config(PSFFileConfig, args.config, overrides)
    out: Path = args.out
    if out.suffix.lower() not in {".tif", ".tiff", ".npy"}:
        raise InputError(f"--out must end in .tif, .tiff or .npy, got {out.name}")
    for path in (out, args.png):
        if path is not None:
            _refuse_existing(path, args.overwrite)
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
            resolution=(1.0 / spacing[-1], 1.0 / spacing[-2]),
            metadata=meta,
        )
    if args.png is not None:
        from hpcdeconv.viz import save_orthoviews

        data = psf.data if psf.data.ndim == 3 else psf.data[None]
        voxel = psf.voxel_size if psf.data.ndim == 3 else (1.0, *psf.voxel_size)
        save_orthoviews(args.png, [(cfg.psf.model, data)], voxel, log=args.log)
    print(f"{cfg.psf.model} PSF {psf.data.shape} voxel {psf.voxel_size} µm -> {out}")
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    from hpcdeconv.config import CodecConfig, StorageConfig
    from hpcdeconv.data.ingest import ingest_tiff
    from hpcdeconv.data.zarr_io import describe

    storage = StorageConfig(chunks=tuple(args.chunks), codec=CodecConfig())
    voxel = tuple(args.voxel_size) if args.voxel_size is not None else None
    if voxel is not None and min(voxel) <= 0:
        raise InputError(f"--voxel-size must be positive, got {voxel}")
    ids = ingest_tiff(
        args.inputs,
        args.output,
        voxel_size=voxel,
        domain=args.domain,
        split=args.split,
        storage=storage,
        overwrite=args.overwrite,
    )
    log.info("ingested %d volume(s): %s", len(ids), ", ".join(ids))
    print(describe(args.output))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from hpcdeconv.config import ExperimentConfig, load_config
    from hpcdeconv.training.engine import train

    overrides = list(args.set)
    if args.output is not None:
        overrides.append(f"output={args.output}")
    cfg = load_config(ExperimentConfig, args.config, overrides)
    summary = train(cfg, resume=args.resume, overwrite=args.overwrite)
    losses = ", ".join(f"{k}={v:.4g}" for k, v in summary.losses.items())
    print(f"trained {cfg.method.name} for {summary.steps} steps -> {summary.run_dir}")
    if losses:
        print(f"final losses: {losses}")
    if summary.validation:
        val = {k: summary.validation.get(k, float("nan")) for k in _VAL_KEYS}
        print(
            f"validation: PSNR {val['psnr_input']:.2f} -> {val['psnr']:.2f} dB, "
            f"SSIM {val['ssim_input']:.3f} -> {val['ssim']:.3f}"
        )
    for name, path in summary.exports.items():
        print(f"exported {name}: {path}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from hpcdeconv.config import PredictConfig, load_config
    from hpcdeconv.inference.model import load_model
    from hpcdeconv.inference.predict import predict_volume
    from hpcdeconv.inference.volume_io import check_finite, open_input, write_output
    from hpcdeconv.training.strategy import resolve_device

    cfg = load_config(PredictConfig, args.config, args.set)
    if args.output.resolve() == args.input.resolve():
        raise InputError("--output must differ from the input")
    if args.png is not None:
        _refuse_existing(args.png, args.overwrite)
    if args.output.exists() and not args.overwrite:
        raise OutputExistsError(f"{args.output} exists; pass --overwrite to replace it")
    device = resolve_device(cfg.device)
    model = load_model(args.checkpoint, device)
    source = open_input(args.input)
    volume = np.asarray(source.data, dtype=np.float32)
    check_finite(volume, str(args.input))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    pred = predict_volume(
        model.net,
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
    attrs = {
        "checkpoint": str(model.checkpoint),
        "step": model.step,
        "method": model.config.method.name,
        "predict": cfg.model_dump(mode="json"),
    }
    where = write_output(args.output, pred, source.voxel_size, source.name, attrs, args.overwrite)
    print(f"deconvolved {args.input} {volume.shape} -> {where}")
    panels = [("input", volume), ("output", pred)]
    if args.truth is not None:
        from hpcdeconv.metrics import psnr, ssim

        truth = np.asarray(open_input(args.truth).data, dtype=np.float32)
        if truth.shape != volume.shape:
            raise InputError(f"--truth has shape {truth.shape}, the input {volume.shape}")
        rng = float(truth.max() - truth.min()) or 1.0
        print(
            f"PSNR input {psnr(volume, truth, rng):.2f} dB -> output {psnr(pred, truth, rng):.2f}"
            f" dB; SSIM input {ssim(volume, truth, rng):.4f} -> output "
            f"{ssim(pred, truth, rng):.4f}"
        )
        panels.append(("truth", truth))
    if args.png is not None:
        from hpcdeconv.viz import save_orthoviews

        save_orthoviews(args.png, panels, source.voxel_size, mode="mip")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from hpcdeconv.data.zarr_io import describe

    print(describe(args.path))
    return 0


# --------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML configuration file")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a configuration value, e.g. --set psf.na=1.2 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every verb."""
    parser = argparse.ArgumentParser(
        prog="hpcdeconv",
        description="Deep-learning deconvolution for fluorescence microscopy at cluster scale.",
    )
    parser.add_argument("--version", action="version", version=f"hpcdeconv {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("simulate", help="write a synthetic microtubule dataset to zarr")
    _add_config_args(p)
    p.add_argument("output", type=Path, help="zarr group to create, e.g. data.zarr")
    p.add_argument("--png", type=Path, help="orthoview figure of one sharp/blurred pair")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(handler=_cmd_simulate)

    p = sub.add_parser("psf", help="compute a PSF model and write it as TIFF or .npy")
    _add_config_args(p)
    p.add_argument(
        "--model",
        choices=["born-wolf", "richards-wolf", "gibson-lanni", "gaussian", "zernike"],
        help="PSF model (overrides psf.model of --config)",
    )
    p.add_argument("--out", type=Path, required=True, help="output .tif/.tiff/.npy")
    p.add_argument("--png", type=Path, help="orthoview figure (XY, XZ, YZ)")
    p.add_argument("--log", action="store_true", help="logarithmic intensity in the figure")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(handler=_cmd_psf)

    p = sub.add_parser("ingest", help="convert TIFF stacks to the hpcdeconv zarr layout")
    p.add_argument("inputs", type=Path, nargs="+", help="3D TIFF stacks (Z, Y, X)")
    p.add_argument("--output", type=Path, required=True, help="zarr group to create")
    p.add_argument(
        "--voxel-size",
        type=float,
        nargs=3,
        metavar=("DZ", "DY", "DX"),
        help="voxel size in µm (default: read from the TIFF metadata)",
    )
    p.add_argument("--domain", choices=["blurred", "sharp"], default="blurred")
    p.add_argument("--split", choices=["train", "val", "test"], default="train")
    p.add_argument("--chunks", type=_positive_int, nargs=3, default=[64, 64, 64])
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(handler=_cmd_ingest)

    p = sub.add_parser("train", help="train a method (blind/non-blind cycleGAN, baselines)")
    _add_config_args(p)
    p.add_argument("--output", type=Path, help="run directory (overrides output:)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start again in a used run dir")
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser("predict", help="deconvolve one volume in memory with a trained G")
    _add_config_args(p)
    p.add_argument("input", type=Path, help="TIFF stack or array inside a zarr store")
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint or run dir")
    p.add_argument("--output", type=Path, required=True, help=".tif, .npy or .zarr")
    p.add_argument("--truth", type=Path, help="ground truth: print PSNR/SSIM of in and out")
    p.add_argument("--png", type=Path, help="orthoview figure of input/output(/truth)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(handler=_cmd_predict)

    p = sub.add_parser("info", help="print a dataset's arrays, chunks, voxel size and codecs")
    p.add_argument("path", type=Path, help="zarr group")
    p.set_defaults(handler=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hpcdeconv`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    handler: Handler = args.handler
    try:
        return handler(args)
    except HpcdeconvError as exc:
        print(f"hpcdeconv {args.verb}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
