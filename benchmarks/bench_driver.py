"""Race the dask inference driver against MONAI; measure 1 → 2 worker scaling and overhead.

Run from the repository root: ``.venv/bin/python benchmarks/bench_driver.py``.

Three measurements, written to the "driver" and "scaling" sections of docs/benchmarks.md:

1. One seeded random float32 volume through the same U-Net G_Θ (16 channels, depth 3,
   instance norm, random weights saved as a checkpoint): MONAI's
   ``sliding_window_inference`` (roi 64³, overlap 0.25, batch 1) against our in-memory
   :func:`~hpcdeconv.inference.predict.predict_volume` (tile 64, overlap 16) and the dask
   driver with one local worker and the whole volume as one block, all on the CPU in fp32
   with the same torch thread count. Ours runs G_Θ through its frozen TorchScript trace
   (``freeze: true``, the default); two extra rows separate that gain from the tiling:
   ours with the eager network, and MONAI given our frozen network as its predictor.
2. The driver with 1 and 2 local workers (1 dask thread and 1 torch thread each) on blocks
   small enough to give ≥ 8 tasks.
3. Scheduler overhead: the driver with an identity processor on a 128³ volume, per block,
   against the same blocks read, processed and written in the client process.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import markdown_table, write_section
from hpcdeconv.config import ClusterConfig, ExperimentConfig, load_config
from hpcdeconv.data.zarr_io import create_dataset, write_volume
from hpcdeconv.inference.cluster import open_client
from hpcdeconv.inference.driver import RunReport, deconvolve_volumes
from hpcdeconv.inference.frozen import inference_network
from hpcdeconv.inference.model import LoadedModel, load_model
from hpcdeconv.inference.plan import BlockPlan
from hpcdeconv.inference.predict import Model, predict_volume
from hpcdeconv.inference.processors import BlockProcessor, NetworkProcessor, process_block
from hpcdeconv.inference.sources import open_sources
from hpcdeconv.inference.tiling import Block
from hpcdeconv.models.factory import build_generator
from hpcdeconv.training.checkpoint import save_checkpoint
from hpcdeconv.training.engine import CHECKPOINT_FORMAT

SHAPE = (64, 160, 160)
TILE = 64
OVERLAP = 16  # = 0.25 × TILE, MONAI's overlap fraction
THREADS = 2
# 1 × 5 × 5 = 25 blocks of SHAPE: 2 workers need 13 rounds, so at most 1.92× (9 blocks: 1.8×).
SCALING_BLOCK = (64, 32, 32)
SCALING_HALO = 8
OVERHEAD_SHAPE = (128, 128, 128)
OVERHEAD_BLOCKS = (32, 64)
GOAL_VS_MONAI = 1.5
GOAL_SCALING = 1.7
ROUNDS = 2
VOXEL = (0.2, 0.1, 0.1)


@dataclass(frozen=True)
class IdentityProcessor:
    """Returns the block's own region unchanged: what is left is reading, writing, scheduling."""

    @property
    def fingerprint(self) -> dict[str, Any]:
        """Nothing but the kind determines the output."""
        return {"kind": "identity"}

    def __call__(self, data: np.ndarray, block: Block) -> np.ndarray:
        """``data`` cropped to ``block.write`` (the read region minus the clipped halo)."""
        keep = tuple(
            slice(c.start - before, c.stop - before)
            for c, (before, _) in zip(block.crop, block.pad, strict=True)
        )
        return np.asarray(data[keep], dtype=np.float32)


def make_checkpoint(run_dir: Path) -> LoadedModel:
    """A seeded, untrained 16-channel depth-3 U-Net saved as a checkpoint and reloaded."""
    cfg = load_config(
        ExperimentConfig, None, ["method.generator.channels=16", "method.generator.depth=3"]
    )
    torch.manual_seed(0)
    net = build_generator(cfg.method.generator, spatial_dims=3, in_channels=1, out_channels=1)
    state = {
        "format": CHECKPOINT_FORMAT,
        "deblur": net.state_dict(),
        "config": cfg.model_dump(mode="json"),
        "step": 0,
    }
    save_checkpoint(run_dir, 0, state)
    return load_model(run_dir)


def write_input(store: Path, volume: np.ndarray) -> Path:
    """``volume`` as ``store/blurred/v0`` with 32³ chunks."""
    write_volume(create_dataset(store), "blurred/v0", volume, VOXEL, chunks=(32, 32, 32))
    return store / "blurred" / "v0"


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall seconds of one call and its result."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def monai_run(
    model: LoadedModel, volume: np.ndarray, mode: str, predictor: Model | None = None
) -> np.ndarray:
    """MONAI sliding-window inference with the brief's settings (``model.net`` by default)."""
    from monai.inferers import sliding_window_inference

    with torch.inference_mode():
        out = sliding_window_inference(
            torch.from_numpy(volume)[None, None],
            roi_size=(TILE,) * 3,
            sw_batch_size=1,
            predictor=predictor or model.net,
            overlap=OVERLAP / TILE,
            mode=mode,
        )
    return out[0, 0].numpy()


def ours_run(model: LoadedModel, network: Model, volume: np.ndarray, blend: str) -> np.ndarray:
    """Our in-memory tiling of ``network`` (G_Θ) with the same tile, overlap and batch size."""
    return predict_volume(
        network,
        volume,
        tile=(TILE,) * 3,
        overlap=OVERLAP,
        blend=blend,  # type: ignore[arg-type]
        size_multiple=model.size_multiple,
    )


def driver_run(
    client: Any, source: Path, output: Path, processor: BlockProcessor, plan: BlockPlan
) -> RunReport:
    """One driver pass over ``source`` into a fresh or overwritten ``output``."""
    mode = "overwrite" if output.exists() else "new"
    return deconvolve_volumes(
        client, open_sources([source]), output, processor, plan, mode=mode, progress=False
    )


def read_output(output: Path) -> np.ndarray:
    import zarr

    return zarr.open_array(output / "deconvolved" / "v0" / "0", mode="r")[...]


def compare_with_monai(model: LoadedModel, volume: np.ndarray, work: Path) -> str:
    """Section "driver": seconds, voxels/s, ratio to MONAI, max |difference|."""
    voxels = volume.size
    rows: list[list[object]] = []
    source = write_input(work / "in.zarr", volume)
    processor = NetworkProcessor.from_model(
        model, (TILE,) * 3, OVERLAP, "gaussian", 1, "fp32", threads=THREADS
    )
    plan = BlockPlan(SHAPE, (0, 0, 0), (32, 32, 32))
    frozen = inference_network(model.net, "cpu", None, freeze=True)
    trace_s, _ = timed(lambda: frozen(torch.zeros(1, 1, TILE, TILE, TILE)))
    times: dict[str, list[float]] = {"monai": [], "ours": [], "warm": [], "eager": [], "mf": []}
    with open_client(ClusterConfig(workers=1, threads_per_worker=1, dashboard=False)) as client:
        cold = driver_run(client, source, work / "whole.zarr", processor, plan)
        # Interleaved rounds, best of each: other jobs' load on the shared cores varies.
        for _ in range(ROUNDS):
            seconds, monai_g = timed(lambda: monai_run(model, volume, "gaussian"))
            times["monai"].append(seconds)
            seconds, ours_g = timed(lambda: ours_run(model, frozen, volume, "gaussian"))
            times["ours"].append(seconds)
            report = driver_run(client, source, work / "whole.zarr", processor, plan)
            times["warm"].append(report.seconds)
            seconds, eager_g = timed(lambda: ours_run(model, model.net, volume, "gaussian"))
            times["eager"].append(seconds)
            seconds, monai_f = timed(lambda: monai_run(model, volume, "gaussian", frozen))
            times["mf"].append(seconds)
    monai_s, ours_s, warm_s, eager_s, monai_fs = (min(times[k]) for k in times)
    monai_cs, monai_c = timed(lambda: monai_run(model, volume, "constant"))
    ours_cs, ours_c = timed(lambda: ours_run(model, frozen, volume, "constant"))
    driver_out = read_output(work / "whole.zarr")

    def row(name: str, seconds: float, out: np.ndarray, reference: np.ndarray) -> list[object]:
        return [
            name,
            f"{seconds:.1f}",
            f"{voxels / seconds / 1e3:.0f}",
            f"{monai_s / seconds:.2f}",
            f"{np.abs(out - reference).max():.2e} / {np.abs(out - reference).mean():.1e}",
        ]

    rows.append(row("MONAI `sliding_window_inference`, gaussian", monai_s, monai_g, monai_g))
    rows.append(row("ours `predict_volume`, gaussian, frozen G_Θ", ours_s, ours_g, monai_g))
    rows.append(row("MONAI, constant", monai_cs, monai_c, monai_g))
    rows.append(row("ours, constant (vs MONAI constant)", ours_cs, ours_c, monai_c))
    rows.append(row("ours `predict_volume`, gaussian, eager G_Θ", eager_s, eager_g, monai_g))
    rows.append(row("MONAI, gaussian, our frozen G_Θ as predictor", monai_fs, monai_f, monai_g))
    rows.append(row("ours driver, 1 worker, 1 block, first run", cold.seconds, driver_out, monai_g))
    rows.append(row("ours driver, 1 worker, 1 block, warm run", warm_s, driver_out, monai_g))
    header = ["Method", "Seconds", "kvoxels/s", "Speed-up vs MONAI gaussian", "Abs diff max / mean"]
    ratio = monai_s / warm_s
    met = "met" if ratio >= GOAL_VS_MONAI else "missed"
    diff_driver = np.abs(driver_out - ours_g).max()
    diff_frozen = np.abs(ours_g - eager_g).max()
    return (
        markdown_table(header, rows)
        + f"\n\nGoal: driver ≥ {GOAL_VS_MONAI}× MONAI; measured {ratio:.2f}× warm "
        f"({monai_s / cold.seconds:.2f}× including the worker's model load) — {met}. "
        f"Driver output vs `predict_volume` (gaussian): max abs diff {diff_driver:.2e}. "
        f"Frozen vs eager G_Θ in `predict_volume`: max abs diff {diff_frozen:.1e}; the "
        f"frozen trace alone speeds MONAI up {monai_s / monai_fs:.2f}×, ours "
        f"{eager_s / ours_s:.2f}×; tracing it for one tile shape took {trace_s:.1f} s, paid "
        "once per `predict` run and once per driver worker (outside the warm run). "
        "Differences are against MONAI gaussian unless the row names another reference; "
        "G_Θ's output lies in [0, 1] (sigmoid). Tile positions are identical (checked: a "
        "tile core agrees to 0.0); the differences come from the blending windows, and, "
        "for constant, from ours keeping each tile's core (crop-and-stitch) where MONAI "
        "averages overlapping tiles, which instance norm makes disagree."
    )


def scaling(model: LoadedModel, work: Path) -> tuple[str, list[float]]:
    """Driver wall time with 1 and 2 workers (1 thread each) on ≥ 8 blocks."""
    source = work / "in.zarr" / "blurred" / "v0"
    tile = tuple(b + 2 * SCALING_HALO for b in SCALING_BLOCK)
    processor = NetworkProcessor.from_model(model, tile, 0, "constant", 1, "fp32", 1)
    plan = BlockPlan(SCALING_BLOCK, (SCALING_HALO,) * 3, (32, 32, 32))
    blocks = len(plan.grid(SHAPE))
    warm_block = plan.grid(SHAPE)[0]
    warm_data = np.zeros([s.stop - s.start for s in warm_block.read], dtype=np.float32)
    best: dict[int, float] = {}
    # Alternate 1 and 2 workers, best of each: other jobs' load on the shared cores varies.
    for workers in (1, 2) * ROUNDS:
        cfg = ClusterConfig(workers=workers, threads_per_worker=1, dashboard=False)
        with open_client(cfg) as client:
            client.wait_for_workers(workers)
            # Warm-up: every worker loads the model and runs one block before the timed run.
            client.run(processor, warm_data, warm_block)
            report = driver_run(client, source, work / f"scale{workers}.zarr", processor, plan)
        best[workers] = min(best.get(workers, float("inf")), report.seconds)
    seconds = [best[1], best[2]]
    rows = [
        [w, blocks, f"{t:.1f}", f"{np.prod(SHAPE) / t / 1e3:.0f}", f"{seconds[0] / t:.2f}"]
        for w, t in zip((1, 2), seconds, strict=True)
    ]
    header = ["Workers", "Blocks", "Seconds", "kvoxels/s", "Speed-up vs 1 worker"]
    return markdown_table(header, rows), seconds


def overhead(work: Path) -> str:
    """Per-block driver wall time with an identity processor vs the same work in-process."""
    volume = np.random.default_rng(7).random(OVERHEAD_SHAPE, dtype=np.float32)
    source_path = write_input(work / "ovh.zarr", volume)
    rows: list[list[object]] = []
    with open_client(ClusterConfig(workers=1, threads_per_worker=1, dashboard=False)) as client:
        client.wait_for_workers(1)
        for side in OVERHEAD_BLOCKS:
            plan = BlockPlan((side,) * 3, (0, 0, 0), (side,) * 3)
            output = work / f"ovh{side}.zarr"
            driver_run(client, source_path, output, IdentityProcessor(), plan)
            report = driver_run(client, source_path, output, IdentityProcessor(), plan)
            source = open_sources([source_path])[0]
            target = output / "deconvolved" / "v0" / "0"
            grid = plan.grid(OVERHEAD_SHAPE)
            local_s, _ = timed(
                lambda grid=grid, source=source, target=target: [
                    process_block(source, target, b, i, IdentityProcessor())
                    for i, b in enumerate(grid)
                ]
            )
            per_driver = report.seconds / len(grid) * 1e3
            per_local = local_s / len(grid) * 1e3
            rows.append(
                [
                    f"{side}³",
                    len(grid),
                    f"{report.seconds:.2f}",
                    f"{per_driver:.1f}",
                    f"{per_local:.1f}",
                    f"{per_driver - per_local:.1f}",
                ]
            )
    header = [
        "Block",
        "Blocks",
        "Driver seconds",
        "Driver ms/block",
        "In-process ms/block",
        "Overhead ms/block",
    ]
    return markdown_table(header, rows)


def main() -> None:
    torch.set_num_threads(THREADS)
    volume = np.random.default_rng(2024).random(SHAPE, dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="bench_driver_") as tmp:
        work = Path(tmp)
        model = make_checkpoint(work / "run")
        ours_run(model, model.net, volume[:, :64, :64], "gaussian")  # warm-up: oneDNN kernels
        load = [os.getloadavg()[0]]
        driver_body = compare_with_monai(model, volume, work)
        load.append(os.getloadavg()[0])
        scaling_table, seconds = scaling(model, work)
        load.append(os.getloadavg()[0])
        overhead_table = overhead(work)
        load.append(os.getloadavg()[0])
    problem = (
        f"{SHAPE[0]}×{SHAPE[1]}×{SHAPE[2]} seeded uniform random float32 volume, U-Net G_Θ "
        "16 channels, depth 3, instance norm, sigmoid output (untrained, seeded, loaded from a "
        f"checkpoint), CPU fp32. Tile {TILE}³, overlap {OVERLAP} (MONAI overlap "
        f"{OVERLAP / TILE}), batch 1."
    )
    write_section(
        "driver",
        "Inference driver vs MONAI sliding-window inference",
        f"{problem} {THREADS} torch threads everywhere. Seconds: best of {ROUNDS} interleaved "
        "rounds for the gaussian rows and the warm driver; one run otherwise. "
        f"Load average (1 min) {load[0]:.1f} before and {load[1]:.1f} after, on "
        f"{os.cpu_count()} cores shared with other jobs.\n\n{driver_body}",
    )
    speedup = seconds[0] / seconds[1]
    write_section(
        "scaling",
        "Driver scaling 1 → 2 dask workers, and per-block overhead",
        f"{problem} Local cluster of worker processes, 1 dask thread and 1 torch thread per "
        f"worker; blocks {'×'.join(map(str, SCALING_BLOCK))} with halo {SCALING_HALO}, one "
        f"{'×'.join(str(b + 2 * SCALING_HALO) for b in SCALING_BLOCK)} tile per block, blend "
        "constant (the halo makes each block compute 2.8× its own voxels). Every worker "
        "first loads the model and processes one block outside the timed pass; best of "
        f"{ROUNDS} alternating runs per worker count. Load average "
        f"(1 min) {load[1]:.1f} before and {load[2]:.1f} after, on {os.cpu_count()} cores "
        f"shared with other jobs.\n\n{scaling_table}\n\nGoal ≥ {GOAL_SCALING}×; measured "
        f"{speedup:.2f}× ({'met' if speedup >= GOAL_SCALING else 'missed'}).\n\n"
        f"Overhead per block: identity processor on a {OVERHEAD_SHAPE[0]}³ random volume, "
        "halo 0, 1 worker, second (warm) pass; in-process is the same read / check / write "
        "of every block in the client, without dask. Load average (1 min) "
        f"{load[2]:.1f} before and {load[3]:.1f} after.\n\n{overhead_table}",
    )


if __name__ == "__main__":
    main()
