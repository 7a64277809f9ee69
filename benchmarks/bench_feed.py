"""Training feed: patches delivered vs consumed, bytes read per patch, host memory per rank.

Three questions about :class:`hpcdeconv.training.feed.TrainingFeed`, the lazily read,
rank-sharded patch stream of ``hpcdeconv train``:

1. Throughput. Samples (one sharp and one blurred 64³ patch, unpaired, augmented) per
   second delivered by ``TrainingFeed.loader`` with 0 and 2 DataLoader workers, against the
   samples per second a blind-cycleGAN training step consumes at 64³ (``configs/blind.yaml``
   networks, same device). Goal: feed ≥ 5× consumption.
2. Bytes read per sample. The growth of ``rchar`` in ``/proc/self/io`` (bytes returned by
   ``read`` calls of this process, from the page cache or the disk alike) while drawing
   samples with 0 workers, divided by the bytes of the two float32 patches. zarr reads and
   decompresses whole chunks, so this is what the store hands over; it is compared with the
   prediction *chunks touched per patch × mean compressed chunk size*. Measured for the
   feed's sampler and for chunk-aligned sampling (``PatchSampler(align=chunks)``, which
   the feed does not use) on 64³ chunks, and for the feed on 32³ chunks. Goal: ≤ 2× the
   patch bytes.
3. Host memory vs dataset size. Peak resident set (``VmHWM``) of a fresh process that
   builds the feed and draws N samples (0 workers), for datasets of 2, 8 and 32 volumes.
   Goal: flat as the dataset grows (no rank holds whole volumes).

The datasets hold uniform random float32 volumes of 64×256×256 per domain in 64³ Blosc
chunks (random floats barely compress: the worst case for bytes read), plus one 8-volume
dataset in 32³ chunks. The largest dataset is written once; the smaller ones hard-link
its arrays. Run from the repository root:
``.venv/bin/python benchmarks/bench_feed.py`` (about 3 minutes on 2 loaded cores).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import markdown_table, write_section
from benchmarks.bench_cost import bind_method, random_batch
from hpcdeconv.config import ExperimentConfig, ImageDomainsData, load_config
from hpcdeconv.data.datasets import UnpairedPatches, ZarrVolumes
from hpcdeconv.data.sampling import PatchSampler, chunks_touched
from hpcdeconv.data.zarr_io import (
    BLURRED,
    DOMAINS,
    SHARP,
    create_dataset,
    open_dataset,
    set_split,
    write_volume,
)
from hpcdeconv.training.feed import TrainingFeed
from hpcdeconv.training.strategy import resolve_device

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024**2
VOXEL = (0.1, 0.1, 0.1)
_STREAM_SHARP, _STREAM_BLURRED = 0, 1
FEED_GOAL = 5.0
BYTES_GOAL = 2.0


@dataclass(frozen=True)
class FeedRate:
    """Delivery of one loader: first-batch latency and the steady rate after it."""

    label: str
    first_s: float
    samples_per_s: float


@dataclass(frozen=True)
class BytesRead:
    """Bytes returned by ``read`` per sample against the two patches' bytes."""

    label: str
    measured_ratio: float
    chunks_per_patch: float
    predicted_ratio: float


# ----------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------


def volume_id(i: int) -> str:
    """Id of the ``i``-th training volume."""
    return f"v{i:03d}"


def write_master(path: Path, n: int, shape: tuple[int, int, int], chunks: tuple[int, ...]) -> None:
    """A dataset of ``n`` random sharp/blurred volume pairs, all in the training split."""
    group = create_dataset(path, overwrite=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        for domain in DOMAINS:
            data = rng.random(shape, dtype=np.float32)
            write_volume(group, f"{domain}/{volume_id(i)}", data, VOXEL, chunks=chunks)
    set_split(group, {"train": [volume_id(i) for i in range(n)]})


def link_subset(master: Path, path: Path, n: int) -> None:
    """A dataset of the master's first ``n`` volumes, its chunk files hard-linked."""
    group = create_dataset(path, overwrite=True)
    for domain in DOMAINS:
        (path / domain).mkdir()
        shutil.copy2(master / domain / "zarr.json", path / domain / "zarr.json")
        for i in range(n):
            src, dst = master / domain / volume_id(i), path / domain / volume_id(i)
            shutil.copytree(src, dst, copy_function=os.link)
    set_split(group, {"train": [volume_id(i) for i in range(n)]})


def compressed_chunk_bytes(path: Path) -> float:
    """Mean size on disk of a chunk file of the dataset."""
    sizes = [
        f.stat().st_size
        for domain in DOMAINS
        for f in (path / domain).rglob("*")
        if f.is_file() and f.name != "zarr.json"
    ]
    return statistics.fmean(sizes)


# ----------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------


def data_config(path: Path, patch: int, workers: int) -> ImageDomainsData:
    """The feed's settings: cubic patches, batch 1, augmentation on."""
    return ImageDomainsData(path=path, patch=(patch,) * 3, batch_size=1, num_workers=workers)


def feed_rate(label: str, path: Path, patch: int, workers: int, samples: int) -> FeedRate:
    """Time the first batch (worker start-up included), then ``samples`` more."""
    feed = TrainingFeed(data_config(path, patch, workers), seed=0)
    batches = feed.loader(start_step=0, steps=samples + 1)
    t0 = time.perf_counter()
    next(batches)
    t1 = time.perf_counter()
    for _ in range(samples):
        next(batches)
    t2 = time.perf_counter()
    # Closing the generator drops the DataLoader iterator, which stops its workers.
    batches.close()
    return FeedRate(label, t1 - t0, samples / (t2 - t1))


def consumption_rate(patch: int, steps: int, device: torch.device) -> tuple[float, float]:
    """Median seconds per blind-cycleGAN step at ``patch``³, and samples per second."""
    cfg = load_config(
        ExperimentConfig, ROOT / "configs" / "blind.yaml", [f"data.patch=[{patch},{patch},{patch}]"]
    )
    bound = bind_method(cfg, device)
    batch = random_batch((patch,) * 3, cfg.data.batch_size, device, seed=0)
    bound.step(batch)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        bound.step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return seconds, cfg.data.batch_size / seconds


def rchar() -> int:
    """Bytes this process has received from ``read``-like system calls so far."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar line")


def aligned_samples(path: Path, patch: int, chunks: tuple[int, ...]) -> UnpairedPatches:
    """The feed's unpaired dataset, but with samplers that keep patches chunk-aligned."""
    volumes = ZarrVolumes(path, open_dataset(path).attrs["hpcdeconv"]["split"]["train"])

    def sampler(domain: str) -> PatchSampler:
        return PatchSampler(volumes.shapes(domain), (patch,) * 3, seed=0, align=chunks)

    return UnpairedPatches(volumes, sampler(SHARP), sampler(BLURRED), batch_size=1, steps=1 << 20)


def bytes_read(
    label: str,
    dataset: UnpairedPatches,
    samples: int,
    chunks: tuple[int, ...],
    chunk_bytes: float,
) -> BytesRead:
    """Measure ``rchar`` per sample and predict it from the chunks the patches touch."""
    for step in range(4):  # opens the arrays and warms the code paths
        dataset.sample_at(step, 0)
    before = rchar()
    for step in range(4, 4 + samples):
        dataset.sample_at(step, 0)
    per_sample = (rchar() - before) / samples
    patch_bytes = math.prod(dataset.sharp.patch) * 4
    sharp, blurred = dataset.sharp, dataset.blurred
    touched = []
    for step in range(4, 4 + samples):
        x_spec = sharp.sample(step, 0, stream=_STREAM_SHARP)
        y_spec = blurred.sample(step, 0, stream=_STREAM_BLURRED, exclude=x_spec.volume)
        touched += [chunks_touched(x_spec, chunks), chunks_touched(y_spec, chunks)]
    per_patch = statistics.fmean(touched)
    return BytesRead(
        label,
        measured_ratio=per_sample / (2 * patch_bytes),
        chunks_per_patch=per_patch,
        predicted_ratio=per_patch * chunk_bytes / patch_bytes,
    )


def memory_child(path: Path, patch: int, samples: int) -> None:
    """In a fresh process: build the feed, draw samples, print resident-set figures (MiB)."""
    status = Path("/proc/self/status")

    def kib(field: str) -> int:
        line = next(x for x in status.read_text().splitlines() if x.startswith(field + ":"))
        return int(line.split()[1])

    baseline = kib("VmRSS")
    feed = TrainingFeed(data_config(path, patch, 0), seed=0)
    for _ in feed.loader(start_step=0, steps=samples):
        pass
    print(json.dumps({"baseline": baseline / 1024, "peak": kib("VmHWM") / 1024}))


def peak_memory(path: Path, patch: int, samples: int) -> dict[str, float]:
    """Run :func:`memory_child` in a new interpreter and return its figures."""
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", str(path), str(patch), str(samples)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------


def load_average() -> float:
    """One-minute load average."""
    return os.getloadavg()[0]


def _met(ok: bool) -> str:
    return "yes" if ok else "no"


def report(
    args: argparse.Namespace,
    rates: list[FeedRate],
    step: tuple[float, float],
    reads: list[BytesRead],
    memory: dict[int, dict[str, float]],
    chunk_mib: dict[str, float],
    loads: tuple[float, float],
) -> str:
    """The markdown body of the ``feed`` section."""
    seconds, consumed = step
    patch, n = args.patch, args.volumes[1]
    device = resolve_device(args.device).type
    rate_rows = [
        [
            r.label,
            f"{r.samples_per_s:.1f}",
            f"{r.first_s:.2f}",
            f"{r.samples_per_s / consumed:.0f}×",
            _met(r.samples_per_s >= FEED_GOAL * consumed),
        ]
        for r in rates
    ]
    rate_rows.append([f"blind-cycleGAN training step ({device})", f"{consumed:.2f}", "", "1×", ""])
    read_rows = [
        [
            r.label,
            f"{r.chunks_per_patch:.2f}",
            f"{r.predicted_ratio:.2f}",
            f"{r.measured_ratio:.2f}",
            _met(r.measured_ratio <= BYTES_GOAL),
        ]
        for r in reads
    ]
    sizes = sorted(memory)
    mem_rows = [
        [
            k,
            f"{2 * k * math.prod(args.shape) * 4 / MIB:.0f}",
            f"{memory[k]['baseline']:.0f}",
            f"{memory[k]['peak']:.0f}",
            f"{memory[k]['peak'] - memory[k]['baseline']:.0f}",
        ]
        for k in sizes
    ]
    shape = "×".join(str(s) for s in args.shape)
    on_disk = ", ".join(f"{name}: {mib:.2f} MiB" for name, mib in chunk_mib.items())
    spread = max(m["peak"] for m in memory.values()) - min(m["peak"] for m in memory.values())
    return "\n\n".join(
        [
            f"Unpaired {patch}³ samples (a sharp and a blurred patch, augmented, batch 1) from "
            f"datasets of random uniform float32 volumes of {shape} per domain in Blosc zstd "
            f"chunks (mean chunk file {on_disk}; random floats barely compress, the worst "
            f"case for bytes read). Load average (1 min) {loads[0]:.1f} before and "
            f"{loads[1]:.1f} after, on {os.cpu_count()} cores shared with other jobs; "
            "there, rates vary several-fold between runs, and worker processes compete with "
            "the main process for the same cores.",
            f"**Throughput** ({n} volumes, {args.samples} samples timed after the first, which "
            "includes worker start-up). The feed runs in this process (0 workers) or in 2 "
            f"DataLoader worker processes. The training step is the median of {args.steps} "
            f"after one warm-up, configs/blind.yaml networks, fp32, {args.threads} torch "
            f"thread(s), {seconds:.2f} s per step. Goal: feed ≥ 5× consumption.",
            markdown_table(
                ["Stage", "Samples/s", "First batch (s)", "vs consumption", "≥ 5×"], rate_rows
            ),
            f"**Bytes read per sample** ({n} volumes, {args.samples} samples, 0 workers): "
            "growth of `rchar` in /proc/self/io (bytes returned by `read` calls, page cache "
            "or disk) divided by the bytes of the two float32 patches "
            f"({2 * patch**3 * 4 / MIB:.0f} MiB). zarr reads and decompresses whole chunks, "
            "so the prediction is chunks touched per patch × mean chunk file size / patch "
            "bytes. Goal: ≤ 2×.",
            markdown_table(
                [
                    "Sampling, chunks",
                    "Chunks per patch",
                    "Predicted ratio",
                    "Measured ratio",
                    "≤ 2×",
                ],
                read_rows,
            ),
            f"**Host memory per rank** (fresh process, 0 workers, {args.samples} samples, "
            f"{args.chunks[0]}³ chunks): resident set after the imports and peak resident set "
            "(VmHWM). Goal: flat as the dataset grows; the peaks differ by "
            f"{spread:.0f} MiB across a {sizes[-1] // sizes[0]}× range of dataset sizes.",
            markdown_table(
                ["Volumes", "Dataset (MiB raw)", "After imports (MiB)", "Peak (MiB)", "Growth"],
                mem_rows,
            ),
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, nargs=3, default=[2, 8, 32])
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 256, 256])
    parser.add_argument("--chunks", type=int, nargs=3, default=[64, 64, 64])
    parser.add_argument(
        "--small-chunks", type=int, nargs=3, default=[32, 32, 32], help="second chunk shape"
    )
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--samples", type=int, default=64, help="samples per measurement")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps")
    parser.add_argument("--device", default="auto", help="training-step device")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the training step (on a loaded 2-core machine 1 is fastest)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where datasets go")
    parser.add_argument("--no-write", action="store_true", help="print, don't edit the doc")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def make_datasets(args: argparse.Namespace, workdir: Path) -> dict[int, Path]:
    """Write the largest dataset, hard-link the smaller ones; paths by number of volumes."""
    counts = sorted(set(args.volumes))
    master = workdir / f"feed_{counts[-1]}.zarr"
    write_master(master, counts[-1], tuple(args.shape), tuple(args.chunks))
    paths = {counts[-1]: master}
    for n in counts[:-1]:
        paths[n] = workdir / f"feed_{n}.zarr"
        link_subset(master, paths[n], n)
    return paths


def cube(shape: list[int]) -> str:
    """``64³`` for a cube, ``32×64×64`` otherwise."""
    return f"{shape[0]}³" if len(set(shape)) == 1 else "×".join(map(str, shape))


def run(args: argparse.Namespace, workdir: Path) -> str:
    """All measurements; returns the report body."""
    loads = [load_average()]
    t0 = time.perf_counter()
    paths = make_datasets(args, workdir)
    n, patch = args.volumes[1], args.patch
    small = workdir / f"feed_{n}_small_chunks.zarr"
    write_master(small, n, tuple(args.shape), tuple(args.small_chunks))
    print(f"datasets written in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    big_name, small_name = f"{cube(args.chunks)} chunks", f"{cube(args.small_chunks)} chunks"
    chunk_mib = {
        big_name: compressed_chunk_bytes(paths[n]) / MIB,
        small_name: compressed_chunk_bytes(small) / MIB,
    }
    rates = [
        feed_rate(f"feed, 0 workers, {big_name}", paths[n], patch, 0, args.samples),
        feed_rate(f"feed, 2 workers, {big_name}", paths[n], patch, 2, args.samples),
        feed_rate(f"feed, 0 workers, {small_name}", small, patch, 0, args.samples),
    ]
    print(f"feed: {rates}", file=sys.stderr)
    torch.set_num_threads(args.threads)
    step = consumption_rate(patch, args.steps, resolve_device(args.device))
    print(f"step: {step}", file=sys.stderr)

    def unaligned(path: Path) -> UnpairedPatches:
        dataset = TrainingFeed(data_config(path, patch, 0), seed=0).dataset(0, 1 << 20)
        assert isinstance(dataset, UnpairedPatches)
        return dataset

    big_chunks, small_chunks = tuple(args.chunks), tuple(args.small_chunks)
    reads = [
        bytes_read(
            f"feed (unaligned), {big_name}",
            unaligned(paths[n]),
            args.samples,
            big_chunks,
            chunk_mib[big_name] * MIB,
        ),
        bytes_read(
            f"chunk-aligned `PatchSampler`, {big_name}",
            aligned_samples(paths[n], patch, big_chunks),
            args.samples,
            big_chunks,
            chunk_mib[big_name] * MIB,
        ),
        bytes_read(
            f"feed (unaligned), {small_name}",
            unaligned(small),
            args.samples,
            small_chunks,
            chunk_mib[small_name] * MIB,
        ),
    ]
    print(f"bytes: {reads}", file=sys.stderr)
    memory = {k: peak_memory(path, patch, args.samples) for k, path in paths.items()}
    print(f"memory: {memory}", file=sys.stderr)
    loads.append(load_average())
    return report(args, rates, step, reads, memory, chunk_mib, (loads[0], loads[1]))


@contextlib.contextmanager
def workdir_of(args: argparse.Namespace) -> Iterator[Path]:
    """The given work directory, or a temporary one removed afterwards."""
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        yield args.workdir
        return
    with tempfile.TemporaryDirectory(prefix="bench_feed_") as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_child:
        path, patch, samples = args.memory_child
        memory_child(Path(path), int(patch), int(samples))
        return
    with workdir_of(args) as workdir:
        body = run(args, workdir)
    print(body)
    if not args.no_write:
        write_section("feed", "Training feed: throughput, bytes read, host memory", body)


if __name__ == "__main__":
    main()
