"""What one dask worker needs in memory to process blocks, checked before a run starts.

A dask worker is paused when its process memory reaches the ``pause`` fraction of its
limit (no new task starts) and killed by its nanny at the ``terminate`` fraction (its tasks
are retried elsewhere, up to ``distributed.scheduler.allowed-failures`` times). A limit
below what one block needs therefore either restarts workers in a loop or pauses them for
good; :func:`check_worker_memory` refuses such a limit before any block is submitted.

The estimate is measured, not derived: peak RSS of a fresh CPU process (torch, dask,
zarr and the driver imported, one torch thread) running one real block, less the RSS
before the block. Measured on a 2-core x86-64 Linux machine, torch 2 CPU, Dec 2026:

===========================  ==============  =================  =============
processor                    read / padded   measured block     estimate
===========================  ==============  =================  =============
U-Net c=4, d=2, tile 64      87^3 / 110^3    183 MiB            269 MiB
U-Net c=4, d=2, tile 64      151^3 / 174^3   228 MiB            328 MiB
U-Net c=16, d=3, tile 64     115^3 / 166^3   322 MiB            441 MiB
U-Net c=16, d=3, tile 64     179^3 / 230^3   405 MiB            553 MiB
RL, 7^3 PSF                  41^3 / 47^3     19 MiB             48 MiB
RL, 7^3 PSF                  85^3 / 91^3     59 MiB             97 MiB
RL, 7^3 PSF                  106^3 / 112^3   96-120 MiB         147 MiB
RL, 7^3 PSF                  149^3 / 155^3   244 MiB            324 MiB
RL, 31^3 PSF                 160^3 / 190^3   379 MiB            563 MiB
TV-RL, 7^3 PSF               149^3 / 155^3   359 MiB            466 MiB
TV-RL, 31^3 PSF              160^3 / 190^3   464 MiB            825 MiB
===========================  ==============  =================  =============

(read / padded: the block's read region and the padded block for networks, the FFT shape
for RL.) ``tests/integration/test_driver_faults.py`` measures a block of each kind again
and requires the estimate to lie between the measured need and three times it.

The process before the block held 287-309 MiB (mostly torch's libraries); an idle dask
worker 287 MiB, 309-333 MiB after 125 tiny blocks, and 344 MiB before the block in a
freshly built venv: :data:`WORKER_BASE_BYTES`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dask.utils import parse_bytes

from hpcdeconv.errors import ConfigError, HpcdeconvError
from hpcdeconv.inference.cluster import wait_for_workers

if TYPE_CHECKING:
    from distributed import Client

    from hpcdeconv.config import ClusterConfig
    from hpcdeconv.inference.plan import BlockPlan
    from hpcdeconv.inference.processors import BlockProcessor
    from hpcdeconv.inference.sources import VolumeSource

MiB = 2**20
#: RSS of an idle CPU worker process once torch, zarr and the driver are imported
#: (287-309 MiB measured in a plain process of the development venv, 344 MiB in a venv
#: freshly built by ``make venv``; the worker's own state adds ~10-30 MiB).
WORKER_BASE_BYTES = 384 * MiB
#: Network processor, fixed part at 64^3 tiles: the frozen TorchScript trace, oneDNN's
#: scratch and the thread pool (fitted 133-135 MiB from two widths; a 4-channel net on a
#: 94^3 padded block re-measured 189-212 MiB in all (VmHWM) from one venv to another,
#: hence the margin). Smaller tiles need less (a 32^3 tile: 57 MiB in all), so the
#: estimate errs on the safe side there.
NETWORK_FIXED_BYTES = 208 * MiB
#: Network processor, per voxel of one batch of tiles and feature channel at full
#: resolution: the U-Net's activations (fitted 35 B: ~9 float32 maps per channel).
NETWORK_TILE_CHANNEL_BYTES = 40
#: Network processor, per voxel of the padded block (block + 2 x halo): the padded
#: input, its tile-multiple padding and the float32 stitch accumulators (fitted 11-12 B).
NETWORK_PADDED_BYTES = 16
#: Richardson-Lucy, fixed part: pocketfft plans and scratch (fitted 13-18 MiB), plus the
#: spread of repeated runs (one 106^3 block peaked 96-120 MiB over the process before it:
#: glibc's moving mmap threshold keeps some freed buffers in the heap).
RL_FIXED_BYTES = 40 * MiB
#: Richardson-Lucy, per voxel of the FFT shape (read region + PSF - 1 per axis): estimate,
#: blurred estimate, ratio, complex spectra and the OTFs (fitted 62-65 B: ~16 float32).
#: Inside a dask worker (one malloc arena, no trimming) the same 160^3 block with a 31^3
#: PSF reached ~460 MiB over the idle worker against 379 MiB in a plain process, hence
#: the margin.
RL_FFT_BYTES = 80
#: TV-regularised RL, more per FFT voxel: gradient components and the divergence
#: (measured +128 MiB for a 155^3 FFT shape, 36 B; rounded up).
RL_TV_FFT_BYTES = 40


class WorkerMemoryError(HpcdeconvError):
    """The dask workers' memory limit is below what one block needs."""


def network_block_bytes(
    padded: Sequence[int], tile: Sequence[int], channels: int, batch_size: int = 1
) -> int:
    """Estimated working set of one block of network inference, in bytes.

    Parameters
    ----------
    padded
        Padded block, e.g. ``(Z, Y, X)``: block + 2 x halo per axis.
    tile
        Network input tile, e.g. ``(Z, Y, X)`` (or ``(Y, X)``).
    channels
        Feature channels of the U-Net's first level.
    batch_size
        Tiles per forward pass.
    """
    tile_voxels = math.prod(tile) * batch_size
    return (
        NETWORK_FIXED_BYTES
        + NETWORK_TILE_CHANNEL_BYTES * tile_voxels * channels
        + NETWORK_PADDED_BYTES * math.prod(padded)
    )


def rl_block_bytes(read: Sequence[int], psf: Sequence[int], tv: bool = False) -> int:
    """Estimated working set of Richardson-Lucy on one block's read region ``(Z, Y, X)``."""
    fft_voxels = math.prod(r + k - 1 for r, k in zip(read, psf, strict=True))
    per_voxel = RL_FFT_BYTES + (RL_TV_FFT_BYTES if tv else 0)
    return RL_FIXED_BYTES + per_voxel * fft_voxels


def mib(size: int) -> str:
    """``size`` bytes as ``'590MiB'``."""
    return f"{size / MiB:.0f}MiB"


def worker_need(block_bytes: int, threads: int) -> int:
    """Memory of one worker running ``threads`` blocks at once, in bytes."""
    return WORKER_BASE_BYTES + threads * block_bytes


def usable_fraction() -> float:
    """Fraction of its limit a worker can use for blocks (dask configuration).

    The lower of the ``pause`` fraction (no new task starts: a worker that reaches it
    between blocks stalls the run) and the ``terminate`` fraction (the nanny kills it);
    either may be switched off (``false``).
    """
    import dask
    import distributed  # noqa: F401 - loads distributed's defaults into dask.config

    fractions = [
        float(value)
        for key in ("pause", "terminate")
        if (value := dask.config.get(f"distributed.worker.memory.{key}"))
    ]
    return min(fractions, default=1.0)


def describe_need(need: int, block_bytes: int, threads: int, block: Sequence[int]) -> str:
    """``~590 MiB (worker ~320 MiB + 1 x block (128, 128, 128) ~270 MiB)``."""
    return (
        f"~{mib(need)} (worker ~{mib(WORKER_BASE_BYTES)} + {threads} x "
        f"block {tuple(block)} ~{mib(block_bytes)})"
    )


def suggested_limit(need: int) -> str:
    """A ``cluster.memory_per_worker`` value that holds ``need`` below the pause threshold."""
    limit = need / usable_fraction()
    return f"{math.ceil(limit / (64 * MiB)) * 64}MiB"


def check_worker_memory(
    limit: int | None, need: int, need_text: str, where: str = "cluster.memory_per_worker"
) -> None:
    """Refuse a worker memory limit below ``need`` (plus dask's margin before a kill).

    Parameters
    ----------
    limit
        The workers' memory limit in bytes; ``None`` or 0 for none.
    need
        Estimated bytes one worker needs (:func:`worker_need`).
    need_text
        The estimate in words (:func:`describe_need`).
    where
        The setting that fixes it.

    Raises
    ------
    WorkerMemoryError
        ``limit`` times the usable fraction is below ``need``.
    """
    if not limit or limit * usable_fraction() >= need:
        return
    raise WorkerMemoryError(
        f"{where}={mib(limit)} is too small: one dask worker needs {need_text} "
        f"and stalls at {usable_fraction():.0%} of its limit; set {where}="
        f"{suggested_limit(need)} or more, or use a smaller --block"
    )


def parse_limit(text: str | int | None) -> int | None:
    """``cluster.memory_per_worker`` in bytes; ``None`` for no limit (``0``, ``none``, ``auto``
    is left to dask and not checked).

    Raises
    ------
    ConfigError
        An unreadable size.
    """
    if text is None or (isinstance(text, str) and text.strip().lower() in ("auto", "none", "")):
        return None
    try:
        value = int(parse_bytes(text)) if isinstance(text, str) else int(text)
    except ValueError:
        raise ConfigError(
            f"cluster.memory_per_worker={text!r} is not a size such as 4GiB"
        ) from None
    return value or None


# --------------------------------------------------------------------------------------
# A run's need against its workers
# --------------------------------------------------------------------------------------

# Workers this client did not start (an existing scheduler) got their limit there; dask-mpi
# ranks get cluster.memory_per_worker, checked before they start (check_memory_setting).
_EXTERNAL_LIMIT = "dask worker --memory-limit"


@dataclass(frozen=True)
class MemoryNeed:
    """What one worker needs for the blocks of a run, and the workers' limit.

    Attributes
    ----------
    need
        Estimated bytes of one worker running ``threads`` blocks at once.
    text
        The estimate in words, for error messages.
    limit
        Smallest memory limit of the connected workers in bytes; None for none.
    where
        The setting that gives the workers their limit.
    """

    need: int
    text: str
    limit: int | None
    where: str = "cluster.memory_per_worker"

    @property
    def setting(self) -> str:
        """``cluster.memory_per_worker=300MiB``, or that it is unlimited."""
        return f"{self.where}={mib(self.limit) if self.limit else 'unlimited'}"

    def advice(self) -> str:
        """What to change; the finished blocks stay."""
        keep = "finished blocks are kept: run again with --resume"
        if self.limit and self.need <= self.limit * usable_fraction():
            # The estimate fitted the limit, yet the workers ran out: it was too low.
            return (
                f"one block was estimated at {self.text} but took more; raise "
                f"{self.where} above {mib(self.limit)} or use a smaller --block "
                f"({keep})"
            )
        return (
            f"one block needs {self.text}; set {self.where}="
            f"{suggested_limit(self.need)} or more, or use a smaller --block ({keep})"
        )


def block_memory(
    processor: BlockProcessor, plan: BlockPlan, sources: Sequence[VolumeSource], threads: int
) -> tuple[int, str]:
    """Estimated bytes of one worker for the largest block of ``sources``, and in words.

    Processors without ``block_bytes`` count as the worker alone.
    """
    estimate = getattr(processor, "block_bytes", None)
    largest, shape = 0, plan.block
    for source in sources:
        for block in plan.grid(source.shape):
            size = estimate(block) if estimate is not None else 0
            if size > largest:
                largest, shape = size, tuple(s.stop - s.start for s in block.write)
    need = worker_need(largest, threads)
    return need, describe_need(need, largest, threads, shape)


def check_memory_setting(
    cluster: ClusterConfig,
    processor: BlockProcessor,
    plan: BlockPlan,
    sources: Sequence[VolumeSource],
) -> None:
    """Refuse ``cluster.memory_per_worker`` below one block's need before a cluster starts.

    A cluster started here (local, SLURM, MPI) gives its workers this limit; the workers
    of an existing scheduler are checked once connected (:func:`check_memory`).

    Raises
    ------
    ConfigError
        An unreadable size.
    WorkerMemoryError
        Naming ``cluster.memory_per_worker``, its value and the estimated need.
    """
    if cluster.kind == "scheduler":
        return
    need, text = block_memory(processor, plan, sources, cluster.threads_per_worker)
    check_worker_memory(parse_limit(cluster.memory_per_worker), need, text)


def check_memory(
    client: Client,
    processor: BlockProcessor,
    plan: BlockPlan,
    sources: Sequence[VolumeSource],
) -> MemoryNeed:
    """Refuse workers whose memory limit is below what one block needs.

    The workers of a cluster started here have ``cluster.memory_per_worker``; those of an
    existing scheduler (or dask-mpi ranks) were given theirs when started, e.g. by
    ``dask worker --memory-limit``.

    Raises
    ------
    WorkerMemoryError
        Naming the setting, its value and the estimated need.
    """
    workers = wait_for_workers(client)
    limits = [int(w.get("memory_limit") or 0) for w in workers.values()]
    threads = max((int(w.get("nthreads") or 1) for w in workers.values()), default=1)
    limit = min(limits) if limits and all(limits) else None
    where = "cluster.memory_per_worker" if client.cluster is not None else _EXTERNAL_LIMIT
    need, text = block_memory(processor, plan, sources, threads)
    check_worker_memory(limit, need, text, where)
    return MemoryNeed(need, text, limit, where)
