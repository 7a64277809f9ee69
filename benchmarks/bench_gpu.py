"""What one GPU does with hpcdeconv: training steps, inference, G_Θ's share of the card, RL,
and the dask driver from zarr to zarr.

Run from the repository root on a machine with one CUDA device:
``.venv/bin/python benchmarks/bench_gpu.py`` (about 4 minutes on an H200). It writes the
section "gpu" of ``docs/benchmarks.md``. Without a GPU it prints one line and exits 2;
``--device cpu --smoke`` runs every section at toy sizes (a check of the script itself,
no table written).

Sections:

1. The card's bf16 matmul rate (8192² · 8192, the reference for "share of the card").
2. Training step time and peak memory of the paper-size blind cycleGAN
   (``configs/blind_paper.yaml``: U-Net 36 channels, depth 3; 31³ kernel; 3-scale PatchGANs)
   at 64³ and 128³ patches in fp32, bf16, bf16 + gradient checkpointing, fp16.
3. G_Θ inference: FLOPs of one tile counted by ``torch.utils.flop_counter``, achieved TFLOP/s
   and share of the matmul rate, for the levers named in issue 12: layout
   (channels_last_3d), cuDNN benchmark mode, channel counts 32 / 36 / 40, tile batch size,
   ``torch.compile`` and CUDA graphs (through ``mode="reduce-overhead"``).
4. Prediction of the paper's 256×512×128 (X×Y×Z) volume per tile size and precision.
5. Richardson-Lucy (64×256×256, 31³ PSF, 20 iterations) in voxels/s.
6. The dask driver (``hpcdeconv deconvolve``) from a uint16 zarr to a zarr, one GPU worker,
   in voxels/s and TB of uint16 voxels per GPU-hour.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import markdown_table, write_section
from benchmarks.bench_cost import bind_method, random_batch
from hpcdeconv.config import ExperimentConfig, load_config
from hpcdeconv.models.factory import build_generator
from hpcdeconv.models.unet import UNet

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "configs" / "blind_paper.yaml"
GIB = 1024**3
#: The paper's test volume, (Z, Y, X) for 256×512×128 (X×Y×Z).
PAPER_VOLUME = (128, 512, 256)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls, after one untimed warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """cuDNN's autotuner on or off inside the block."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def matmul_rate(device: torch.device, n: int) -> float:
    """Achieved TFLOP/s of an ``n``×``n`` by ``n``×``n`` matmul in bf16 (fp32 on the CPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = best_of(lambda: a @ b, device, 10)
    return 2 * n**3 / seconds / 1e12


def train_rows(device: torch.device, sizes: list[int], steps: int) -> list[list[object]]:
    """Step time and peak memory of the paper-size blind cycleGAN per precision and patch."""
    settings = [
        ("fp32", "fp32", False),
        ("bf16", "bf16", False),
        ("bf16 + checkpointing", "bf16", True),
        ("fp16", "fp16", False),
    ]
    if device.type != "cuda":
        settings = [s for s in settings if s[1] == "fp32"]
    rows: list[list[object]] = []
    for size in sizes:
        for label, precision, ckpt in settings:
            cfg = load_config(
                ExperimentConfig,
                PAPER,
                [f"train.precision={precision}", f"train.grad_checkpointing={str(ckpt).lower()}"],
            )
            try:
                bound = bind_method(cfg, device)
                batch = random_batch((size,) * 3, 1, device, seed=0)
                bound.step(batch)  # cuDNN plans, allocator warm-up
                sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                times = []
                for _ in range(steps):
                    start = time.perf_counter()
                    bound.step(batch)
                    sync(device)
                    times.append(time.perf_counter() - start)
                peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else 0
                rows.append(
                    [
                        f"{size}³",
                        label,
                        f"{np.median(times) * 1e3:.0f}",
                        f"{1 / np.median(times):.1f}",
                        f"{peak:.2f}",
                    ]
                )
            except torch.cuda.OutOfMemoryError:
                rows.append([f"{size}³", label, "OOM", "", ""])
            finally:
                bound = None  # type: ignore[assignment]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def unet(channels: int, device: torch.device) -> UNet:
    """The paper's G_Θ (depth 3, linear head for timing) with ``channels`` base channels."""
    overrides = [f"method.generator.channels={channels}", "method.generator.final_activation=none"]
    cfg = load_config(ExperimentConfig, PAPER, overrides)
    return (
        build_generator(cfg.method.generator, spatial_dims=3, in_channels=1, out_channels=1)
        .to(device)
        .eval()
    )


def tile_flops(net: torch.nn.Module, tile: int, batch: int, device: torch.device) -> float:
    """FLOPs of one forward of ``batch`` tiles of ``tile``³ (torch's flop counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(batch, 1, tile, tile, tile, device=device)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        net(x)
    return float(counter.get_total_flops())


def inference_rows(
    device: torch.device, tile: int, batches: list[int], peak: float, compile_: bool
) -> list[list[object]]:
    """Achieved TFLOP/s of G_Θ per lever, as a share of the matmul rate ``peak``."""
    dtype = torch.bfloat16 if device.type == "cuda" else None
    variants: list[tuple[str, int, int, bool, str]] = [
        # label, channels, batch, cudnn.benchmark, layout/compile
        ("fp32, 36 ch (baseline)", 36, batches[0], False, "fp32"),
        ("bf16, 36 ch", 36, batches[0], False, "ncdhw"),
        ("bf16, 36 ch, cudnn.benchmark", 36, batches[0], True, "ncdhw"),
        ("bf16, 36 ch, channels_last_3d, benchmark", 36, batches[0], True, "cl3d"),
        ("bf16, 32 ch, benchmark", 32, batches[0], True, "ncdhw"),
        ("bf16, 32 ch, channels_last_3d, benchmark", 32, batches[0], True, "cl3d"),
        ("bf16, 40 ch, channels_last_3d, benchmark", 40, batches[0], True, "cl3d"),
    ]
    for b in batches[1:]:
        variants.append(
            (f"bf16, 32 ch, channels_last_3d, benchmark, batch {b}", 32, b, True, "cl3d")
        )
    if compile_:
        variants.append(
            (
                "bf16, 32 ch, channels_last_3d, torch.compile",
                32,
                batches[0],
                True,
                "compile",
            )
        )
        variants.append(
            (
                "bf16, 32 ch, channels_last_3d, torch.compile + CUDA graphs",
                32,
                batches[0],
                True,
                "graphs",
            )
        )
    rows: list[list[object]] = []
    for label, channels, batch, bench, mode in variants:
        net = unet(channels, device)
        flops = tile_flops(net, tile, batch, device)
        x = torch.rand(batch, 1, tile, tile, tile, device=device)
        run_dtype = None if mode == "fp32" else dtype
        if mode in ("cl3d", "compile", "graphs"):
            net = net.to(memory_format=torch.channels_last_3d)
            x = x.contiguous(memory_format=torch.channels_last_3d)
        model: Callable[[torch.Tensor], torch.Tensor] = net
        if mode == "compile":
            model = torch.compile(net)
        elif mode == "graphs":
            model = torch.compile(net, mode="reduce-overhead")
        cast = (
            torch.autocast(device.type, dtype=run_dtype)
            if run_dtype is not None
            else contextlib.nullcontext()
        )

        def forward(model=model, x=x, cast=cast) -> torch.Tensor:
            with torch.inference_mode(), cast:
                return model(x)

        try:
            with cudnn_benchmark(bench):
                forward()  # compile / autotune outside the timing
                seconds = best_of(forward, device, 5)
            tflops = flops / seconds / 1e12
            rows.append(
                [
                    label,
                    f"{flops / batch / 1e9:.0f}",
                    f"{seconds * 1e3 / batch:.1f}",
                    f"{tflops:.1f}",
                    f"{100 * tflops / peak:.1f} %",
                ]
            )
        except Exception as exc:  # a lever that fails on this stack is a result, not a crash
            rows.append([label, f"{flops / batch / 1e9:.0f}", "failed", type(exc).__name__, ""])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def predict_rows(device: torch.device, shape: tuple[int, int, int]) -> list[list[object]]:
    """Seconds to predict the paper volume with the 36-channel G_Θ per tile and precision."""
    from hpcdeconv.inference.predict import predict_volume

    volume = np.random.default_rng(0).random(shape, dtype=np.float32)
    rows: list[list[object]] = []
    settings = [
        (64, 16, "fp32", 4),
        (64, 16, "bf16", 4),
        (128, 32, "fp32", 2),
        (128, 32, "bf16", 4),
    ]
    if device.type != "cuda":
        settings = [s for s in settings if s[2] == "fp32"]
    for tile, overlap, precision, batch in settings:
        net = unet(36, device)
        dtype = torch.bfloat16 if precision == "bf16" else None
        with cudnn_benchmark(True):
            seconds = best_of(
                lambda net=net, tile=tile, overlap=overlap, batch=batch, dtype=dtype: (
                    predict_volume(
                        net,
                        volume,
                        tile=(tile,) * 3,
                        overlap=overlap,
                        batch_size=batch,
                        device=device,
                        autocast_dtype=dtype,
                    )
                ),
                device,
                2,
            )
        voxels = float(np.prod(shape))
        rows.append(
            [
                f"{tile}³ / {overlap}",
                precision,
                batch,
                f"{seconds:.2f}",
                f"{voxels / seconds / 1e6:.0f}",
            ]
        )
    return rows


def rl_row(device: torch.device, shape: tuple[int, int, int]) -> list[object]:
    """Voxels/s of 20 RL iterations with a 31³ PSF."""
    from hpcdeconv.classical.rl import richardson_lucy
    from hpcdeconv.physics.psf import gaussian

    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    psf = gaussian((31, 31, 31), (3.0, 2.0, 2.0)).astype(np.float32)
    seconds = best_of(lambda: richardson_lucy(image, psf, 20, device=device), device, 3)
    return [
        " × ".join(map(str, shape)),
        "31³",
        20,
        f"{seconds * 1e3:.0f}",
        f"{np.prod(shape) / seconds / 1e6:.0f}",
    ]


def driver_row(device: torch.device, shape: tuple[int, int, int], work: Path) -> list[object]:
    """End-to-end ``hpcdeconv deconvolve`` zarr → zarr of a uint16 volume, one worker."""
    from hpcdeconv.config import SimulateConfig
    from hpcdeconv.data.simulate import simulate
    from hpcdeconv.data.zarr_io import create_dataset, write_volume
    from hpcdeconv.training.engine import train

    data = work / "tiny.zarr"
    simulate(
        load_config(
            SimulateConfig,
            None,
            ["shape=[64, 64, 64]", "psf.shape=[7, 7, 7]", "split={train: 2, val: 1, test: 1}"],
        ),
        data,
    )
    run = work / "run"
    overrides = [
        f"data.path={data}",
        "data.patch=[64, 64, 64]",
        "data.num_workers=0",
        "method.generator.channels=32",
        "method.generator.final_activation=none",
        "method.kernel.size=[7, 7, 7]",
        "train.steps=1",
        "train.val_every=100",
        "train.val_tile=[64, 64, 64]",
        "train.val_overlap=16",
        f"train.device={device.type}",
        f"output={run}",
    ]
    train(load_config(ExperimentConfig, PAPER, overrides), progress=False)
    volume = (np.random.default_rng(1).random(shape) * 4000).astype(np.uint16)
    group = create_dataset(work / "in.zarr")
    write_volume(group, "raw/v0", volume, (0.2, 0.1, 0.1), chunks=(128, 128, 128))
    precision = "bf16" if device.type == "cuda" else "fp32"
    command = [
        sys.executable,
        "-m",
        "hpcdeconv",
        "deconvolve",
        "--checkpoint",
        str(run),
        str(work / "in.zarr" / "raw" / "v0"),
        "--output",
        str(work / "out.zarr"),
        "--block",
        "256",
        "--halo",
        "32",
        "--workers",
        "1",
        "--set",
        "tile=[128, 128, 128]",
        "--set",
        "overlap=32",
        "--set",
        "chunks=[128, 128, 128]",
        "--set",
        f"precision={precision}",
        "--set",
        "batch_size=4",
    ]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return [
            " × ".join(map(str, shape)),
            precision,
            "failed",
            proc.stderr.strip().splitlines()[-1],
            "",
        ]
    voxels = float(np.prod(shape))
    tb_per_hour = voxels * 2 * 3600 / seconds / 1e12
    return [
        " × ".join(map(str, shape)),
        precision,
        f"{seconds:.1f}",
        f"{voxels / seconds / 1e6:.0f}",
        f"{tb_per_hour:.2f}",
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu with --smoke")
    p.add_argument("--smoke", action="store_true", help="toy sizes, no table written")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--json", type=Path, help="also write the raw rows to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu.py: needs a CUDA GPU; none is available here", file=sys.stderr)
        return 2
    smoke = args.smoke
    write = not smoke and device.type == "cuda"
    peak = matmul_rate(device, 512 if smoke else 8192)
    parts = [
        f"Measured bf16 matmul (8192³): **{peak:.0f} TFLOP/s** — the reference for the "
        "share of the card below."
    ]
    raw: dict[str, object] = {"matmul_tflops": peak}

    def report(key: str, title: str, header: list[str], rows: list[list[object]]) -> None:
        # Each stage is written as soon as it is measured: a later stage that runs out of
        # time (torch.compile can take minutes) loses nothing before it.
        raw[key] = rows
        table = markdown_table(header, rows)
        print(f"{title}\n{table}", flush=True)
        parts.append(f"### {title}\n\n{table}")
        if write:
            write_section(
                "gpu", "GPU: training, inference, RL and the driver on one card", "\n\n".join(parts)
            )
        if args.json:
            args.json.write_text(json.dumps(raw))

    report(
        "train",
        "Training step, paper-size blind cycleGAN (batch 1)",
        ["patch", "precision", "ms/step", "steps/s", "peak GiB"],
        train_rows(device, [64] if smoke else [64, 128], 1 if smoke else 5),
    )
    report(
        "predict",
        "Prediction of the paper volume 256×512×128 (36-channel G_Θ, cudnn.benchmark)",
        ["tile / overlap", "precision", "batch", "s", "Mvoxel/s"],
        predict_rows(device, (16, 32, 32) if smoke else PAPER_VOLUME),
    )
    report(
        "rl",
        "Richardson-Lucy on the GPU",
        ["volume", "PSF", "iterations", "ms", "Mvoxel/s"],
        [rl_row(device, (16, 32, 32) if smoke else (64, 256, 256))],
    )
    with tempfile.TemporaryDirectory() as tmp:
        driver = driver_row(device, (32, 64, 64) if smoke else (256, 1024, 1024), Path(tmp))
    report(
        "driver",
        "Dask driver, zarr → zarr, one GPU worker (32-channel G_Θ, tile 128, halo 32, "
        "block 256, batch 4), including start-up",
        ["volume (uint16)", "precision", "s", "Mvoxel/s", "TB/GPU-hour"],
        [driver],
    )
    report(
        "infer",
        "G_Θ inference on 128³ tiles (FLOPs from torch.utils.flop_counter)",
        ["G_Θ", "GFLOP/tile", "ms/tile", "TFLOP/s", "of matmul"],
        inference_rows(
            device,
            16 if smoke else 128,
            [1, 2] if smoke else [2, 4, 8],
            peak,
            compile_=not args.no_compile and not smoke,
        ),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
