"""Parameters and training-step time: blind cycleGAN (linear PSF layer) vs conventional.

The seed paper's efficiency claim (Lim et al., IEEE TCI 2020): replacing the second deep
generator F : X → Y of a conventional cycleGAN by one linear 31³ convolution ``h *``
removes almost half the generator parameters and a large part of the step time. This
script counts parameters per group for every method at the demo and paper sizes, and
times training steps of all methods on the same random patches, interleaved step by step
so that load from other processes hits every method alike.

Run from the repository root: ``.venv/bin/python benchmarks/bench_cost.py``
(``--scale paper --device cuda`` on a GPU node for the paper's sizes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import markdown_table, write_section
from hpcdeconv.config import BornWolfPSF, ExperimentConfig, load_config
from hpcdeconv.methods import build_method
from hpcdeconv.methods.base import DataInfo, Method
from hpcdeconv.physics.psf import make_psf
from hpcdeconv.training.strategy import SingleStrategy, Strategy, resolve_device

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
METHODS = {
    "blind": "Blind cycleGAN (PSF layer)",
    "nonblind": "Non-blind cycleGAN (fixed PSF)",
    "cyclegan": "Conventional cycleGAN (2 U-Nets)",
    "supervised": "Supervised U-Net (MSE)",
}


@dataclass
class BoundMethod:
    """A method whose groups are wrapped for training, as the engine would do it."""

    method: Method
    strategy: Strategy

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One optimisation step under the strategy's autocast."""
        with self.strategy.autocast():
            return self.method.step(batch)


def config_path(name: str, scale: str) -> Path:
    """``configs/<name>.yaml`` (demo) or ``configs/<name>_paper.yaml``."""
    return CONFIGS / (f"{name}.yaml" if scale == "demo" else f"{name}_paper.yaml")


def dataset_psf(cfg: ExperimentConfig) -> np.ndarray:
    """A Born & Wolf PSF of the configured kernel size (what the non-blind method loads)."""
    size = getattr(cfg.method, "kernel", None)
    shape = size.size if size is not None else (31, 31, 31)
    return make_psf(BornWolfPSF(shape=shape)).data


def make_method(cfg: ExperimentConfig, checkpointing: bool | None = None) -> Method:
    """Build ``cfg.method`` as the engine does; ``checkpointing`` overrides the config's."""
    ckpt = cfg.train.grad_checkpointing if checkpointing is None else checkpointing
    return build_method(
        cfg.method,
        DataInfo(spatial_dims=3, channels=1, voxel_size=(0.1, 0.1, 0.1), psf=dataset_psf(cfg)),
        seed=cfg.train.seed,
        checkpointing=ckpt,
    )


def bind_method(
    cfg: ExperimentConfig, device: torch.device, checkpointing: bool | None = None
) -> BoundMethod:
    """Build ``cfg.method`` and wrap its groups exactly as the training engine does.

    Parameters
    ----------
    cfg
        Experiment configuration; precision and checkpointing come from ``cfg.train``.
    device
        Where the networks live.
    checkpointing
        Overrides ``cfg.train.grad_checkpointing`` when given.
    """
    method = make_method(cfg, checkpointing)
    strategy = SingleStrategy(device, cfg.train.precision)
    rates = method.learning_rates()
    method.bind(
        {
            name: strategy.wrap(group, cfg.optim, cfg.train.steps, lr=rates.get(name), name=name)
            for name, group in method.groups().items()
        }
    )
    return BoundMethod(method, strategy)


def random_batch(
    patch: tuple[int, int, int], batch_size: int, device: torch.device, seed: int
) -> dict[str, torch.Tensor]:
    """Sharp ``x`` and blurred ``y`` patches, each (B, 1, Z, Y, X), uniform in [0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch_size, 1, *patch)
    return {k: torch.rand(shape, generator=gen).to(device) for k in ("x", "y")}


def n_params(module: nn.Module | None, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of ``module``; 0 for ``None``."""
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def parameter_counts(method: Method) -> dict[str, int]:
    """Trainable parameters of the blur path, G_Θ, the discriminators and in total.

    ``blur_fixed`` counts the non-trainable kernel of the non-blind method.
    """
    groups = method.groups()
    generators = groups["G"]
    blur = getattr(generators, "blur", None)
    return {
        "blur": n_params(blur),
        "blur_fixed": n_params(blur, trainable_only=False) - n_params(blur),
        "deblur": n_params(method.artefact().network),
        "disc": n_params(groups.get("D")),
        "total": sum(n_params(g) for g in groups.values()),
    }


def millions(n: int) -> str:
    """``29791`` → ``'0.030 M (29,791)'`` for small counts, ``'7.09 M'`` for large ones."""
    if n == 0:
        return "0"
    if n < 100_000:
        return f"{n / 1e6:.3f} M ({n:,})"
    return f"{n / 1e6:.2f} M"


def parameter_rows(scale: str) -> list[list[object]]:
    """One table row per method at ``scale`` (no device needed: nothing runs)."""
    rows: list[list[object]] = []
    for name, label in METHODS.items():
        cfg = load_config(ExperimentConfig, config_path(name, scale))
        counts = parameter_counts(make_method(cfg))
        blur = millions(counts["blur"])
        if counts["blur_fixed"]:
            blur = f"0 (fixed {counts['blur_fixed']:,})"
        elif name == "supervised":
            blur = "—"
        rows.append(
            [
                label,
                blur,
                millions(counts["deblur"]),
                millions(counts["disc"]),
                millions(counts["total"]),
                millions(counts["deblur"] + counts["blur"]),
            ]
        )
    return rows


def synchronise(device: torch.device) -> Callable[[], None]:
    """A barrier for timing: waits for queued GPU work, no-op on the CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_steps(
    bound: dict[str, BoundMethod],
    batch: dict[str, torch.Tensor],
    steps: int,
    warmup: int,
    sync: Callable[[], None],
) -> dict[str, list[float]]:
    """Seconds per step of every method, interleaved: step k of all methods, then k + 1."""
    times: dict[str, list[float]] = {name: [] for name in bound}
    for k in range(warmup + steps):
        for name, b in bound.items():
            sync()
            start = time.perf_counter()
            b.step(batch)
            sync()
            if k >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=["demo", "paper"], default="demo")
    parser.add_argument("--patch", type=int, help="cubic patch side (default: the config's)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--precision", choices=["fp32", "bf16", "fp16"], help="default: the config's"
    )
    parser.add_argument("--no-write", action="store_true", help="print, do not update the doc")
    return parser.parse_args(argv)


def timed_config(name: str, args: argparse.Namespace) -> ExperimentConfig:
    """The method's configuration with the benchmark's patch and precision."""
    overrides = []
    if args.patch is not None:
        overrides.append(f"data.patch=[{args.patch}, {args.patch}, {args.patch}]")
    if args.precision is not None:
        overrides.append(f"train.precision={args.precision}")
    return load_config(ExperimentConfig, config_path(name, args.scale), overrides)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    cfgs = {name: timed_config(name, args) for name in METHODS}
    first = cfgs["blind"]
    torch.manual_seed(0)
    bound = {name: bind_method(cfg, device) for name, cfg in cfgs.items()}
    batch = random_batch(first.data.patch, first.data.batch_size, device, seed=0)
    times = time_steps(bound, batch, args.steps, args.warmup, synchronise(device))
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratio = medians["cyclegan"] / medians["blind"]

    params = {scale: parameter_rows(scale) for scale in ("demo", "paper")}
    header = ["Method", "Blur path", "G_Θ", "Discriminators", "Trainable total", "Generators"]
    patch = "×".join(map(str, first.data.patch))
    unet = first.method.generator
    time_rows = [
        [
            METHODS[name],
            f"{medians[name]:.3f}",
            f"{min(t):.3f}",
            f"{medians[name] / medians['blind']:.2f}",
        ]
        for name, t in times.items()
    ]
    body = (
        "Trainable parameters per group. *Demo*: `configs/<method>.yaml` (U-Net channels 16, "
        "depth 3, PatchGAN 8 channels, 2 layers, 3 scales); *paper*: "
        "`configs/<method>_paper.yaml` (U-Net channels 36, depth 3 ≈ 7.1 M; PatchGAN 32 "
        "channels, 3 layers, 3 scales). The blind method's blur path is the single 31³ kernel "
        "(29,791 ≈ 0.03 M parameters); the conventional cycleGAN's is a second U-Net. "
        "*Generators* = G_Θ + blur path.\n\n"
        "**Demo scale**\n\n"
        + markdown_table(header, params["demo"])
        + "\n\n**Paper scale**\n\n"
        + markdown_table(header, params["paper"])
        + "\n\n"
        f"**Training-step time** ({args.scale} configs, patch {patch}, batch "
        f"{first.data.batch_size}, U-Net channels {unet.channels} depth {unet.depth}, "
        f"{first.train.precision}, device {device.type}): median and minimum over "
        f"{args.steps} steps after {args.warmup} warm-up steps; the four methods run "
        "interleaved, one step each in turn, on the same random patches. A step is the "
        "generator update plus the discriminator update (supervised: the MSE update only).\n\n"
        + markdown_table(["Method", "Median (s)", "Min (s)", "× blind"], time_rows)
        + f"\n\nConventional / blind step time: **{ratio:.2f}×**."
    )
    print(body)
    if not args.no_write:
        write_section("cost", "cycleGAN cost: parameters and step time", body)


if __name__ == "__main__":
    main()
