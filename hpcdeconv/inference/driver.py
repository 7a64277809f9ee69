"""Block-wise, dask-distributed deconvolution of whole images into a zarr group.

Each input image (e.g. ``(Z, Y, X)``) is cut by a :class:`~hpcdeconv.inference.plan.BlockPlan`
into blocks that each own whole chunks of a pre-created output array
``OUT.zarr/deconvolved/<name>`` (:mod:`~hpcdeconv.inference.output`). One dask task per
block (:func:`~hpcdeconv.inference.processors.process_block`)

1. opens the input itself (paths travel, never arrays, :mod:`~hpcdeconv.inference.sources`)
   and reads the block grown by the halo (``Block.read``),
2. refuses NaN/Inf voxels, reporting the block and the input,
3. runs a processor (:mod:`~hpcdeconv.inference.processors`) on it: a network via
   :func:`~hpcdeconv.inference.predict.predict_block` (tiles and blending inside the
   block, symmetric padding where the halo leaves the volume), or Richardson-Lucy (whose
   operator treats the volume's border itself),
4. writes exactly ``Block.write`` into the output array: whole chunks that no other task
   touches, so there is no read-modify-write and no lock (the array is not sharded).

With a halo at least the network's receptive-field radius, every block computes what the
network gives on the whole volume (padded symmetrically by the halo) on its region, so the
stitched output has no seams. A 2D network on a stack of planes runs on blocks of one
plane each, with a halo in Y and X only (:func:`~hpcdeconv.inference.plan.image_plan`).
RL couples voxels ``2 r`` apart per iteration for a PSF of radius ``r``; its blocks match
whole-volume RL to within the error documented in :func:`~hpcdeconv.classical.rl.rl_halo`.
This module is the scheduling loop: the client alone records finished blocks
(:mod:`~hpcdeconv.inference.manifest`), which makes ``--resume`` skip them, and turns
whatever the cluster does to a run into one error line.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import CancelledError
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zarr
from distributed import Client, KilledWorker, wait
from tqdm import tqdm

from hpcdeconv import __version__
from hpcdeconv.data.ngff import LEVEL0, add_pyramid
from hpcdeconv.errors import HpcdeconvError, InputError
from hpcdeconv.inference.cluster import (
    GPU_RESOURCE,
    SchedulerLostError,
    wait_for_workers,
    workers_declare_gpus,
)
from hpcdeconv.inference.manifest import Manifest
from hpcdeconv.inference.memory import MemoryNeed, WorkerMemoryError, check_memory
from hpcdeconv.inference.output import (
    OutputMode,
    check_output,
    prepare_output,
    run_fingerprint,
)
from hpcdeconv.inference.plan import BlockPlan, check_plan
from hpcdeconv.inference.processors import BlockOutcome, BlockProcessor, process_block
from hpcdeconv.inference.sources import OUTPUT_GROUP, VolumeSource
from hpcdeconv.inference.tiling import Block

logger = logging.getLogger(__name__)


class NonFiniteOutputError(HpcdeconvError):
    """A block of finite input produced NaN or Inf (e.g. fp16 overflow)."""


@dataclass(frozen=True)
class RunReport:
    """Outcome of :func:`deconvolve_volumes`.

    Attributes
    ----------
    outputs
        Output array paths, one per input, e.g. ``out.zarr/deconvolved/test000``.
    total_blocks
        Blocks of all inputs together.
    skipped
        Blocks already finished by an earlier run (``--resume``).
    processed
        Blocks computed by this run.
    voxels
        Output voxels computed by this run.
    seconds
        Wall time from the first submission to the last result.
    """

    outputs: tuple[Path, ...]
    total_blocks: int
    skipped: int
    processed: int
    voxels: int
    seconds: float

    @property
    def complete(self) -> bool:
        """Whether every block of every input is now stored."""
        return self.skipped + self.processed == self.total_blocks

    @property
    def voxels_per_second(self) -> float:
        """Throughput of this run."""
        return self.voxels / self.seconds if self.seconds > 0 else 0.0


def _region_text(source: VolumeSource, block: Block) -> str:
    return ", ".join(
        f"{a.lower()} {s.start}:{s.stop}" for a, s in zip(source.dims, block.write, strict=True)
    )


def _raise_for(
    outcome: BlockOutcome, source: VolumeSource, block: Block, processor: BlockProcessor
) -> None:
    where = f"{source.path}: block {block.index} ({_region_text(source, block)})"
    if outcome.nonfinite_input:
        raise InputError(f"{where} reads {outcome.nonfinite_input} NaN or Inf voxel(s)")
    if outcome.nonfinite_output:
        # Only the processor knows which of its verb's settings could help.
        advice = getattr(processor, "nonfinite_advice", "")
        raise NonFiniteOutputError(
            f"{where} produced {outcome.nonfinite_output} NaN or Inf voxel(s) from finite "
            "input" + (f"; {advice}" if advice else "")
        )


#: Seconds every worker may stay paused for memory while no block finishes.
PAUSED_LIMIT_S = 30.0
#: Seconds between looks at the workers while blocks run.
_POLL_S = 1.0


def _scheduler_lost(client: Client) -> SchedulerLostError:
    address = getattr(client.scheduler, "address", None) or "?"
    return SchedulerLostError(
        f"lost the dask scheduler at {address} during the run; finished blocks are kept: "
        "run again with --resume"
    )


def _killed(source: VolumeSource, block: Block, memory: MemoryNeed) -> WorkerMemoryError:
    """The one-line error for a block whose workers kept dying (dask's ``KilledWorker``)."""
    import dask

    attempts = int(dask.config.get("distributed.scheduler.allowed-failures")) + 1
    where = f"{source.path}: block {block.index} ({_region_text(source, block)})"
    return WorkerMemoryError(
        f"{where}: {attempts} dask workers died running it, most likely killed for "
        f"exceeding {memory.setting}; {memory.advice()}"
    )


def _run_blocks(
    client: Client,
    work: Sequence[tuple[VolumeSource, int, Block]],
    output: Path,
    processor: BlockProcessor,
    retries: int,
    manifest: Manifest,
    bar: tqdm,
    memory: MemoryNeed,
) -> int:
    """Submit one task per block, record each as it finishes; returns the voxels written.

    Whatever the cluster does to the run ends it in one :class:`HpcdeconvError`: workers
    killed again and again (dask's ``KilledWorker``), every worker paused for memory with no
    block finishing for :data:`PAUSED_LIMIT_S`, or the scheduler gone. Finished blocks are
    recorded first, so ``--resume`` continues from them.
    """
    if not work:
        return 0
    run_id = uuid.uuid4().hex[:8]
    resources = _task_resources(client)
    # One task holds the processor (e.g. a PSF) so it is shipped once per worker, not per block.
    shared = client.submit(_identity, processor, key=f"hpcdeconv-processor-{run_id}")
    futures = {
        client.submit(
            process_block,
            source,
            output / OUTPUT_GROUP / source.name / LEVEL0,
            block,
            flat,
            shared,
            key=f"hpcdeconv-block-{run_id}-{source.name}-{flat}",
            retries=retries,
            resources=resources,
        ): (source, block)
        for source, flat, block in work
    }
    voxels = 0
    pending = set(futures)
    watch = _ClusterWatch(client, memory)
    try:
        while pending:
            try:
                done, pending = wait(pending, timeout=_POLL_S, return_when="FIRST_COMPLETED")
            except TimeoutError:
                done = set()
            for future in done:
                if future.status == "cancelled" or client.status != "running":
                    raise _scheduler_lost(client)
                try:
                    outcome: BlockOutcome = future.result()
                except KilledWorker:
                    raise _killed(*futures[future], memory) from None
                _raise_for(outcome, *futures[future], processor)
                manifest.mark(outcome.name, outcome.flat)
                voxels += outcome.voxels
                bar.update(1)
                watch.finished()
            if pending:
                watch.look()
    except SchedulerLostError:
        raise
    except CancelledError as exc:
        # dask cancels every future of a client that lost its scheduler.
        if client.status != "running" or "scheduler-connection-lost" in str(exc):
            raise _scheduler_lost(client) from None
        raise SchedulerLostError(
            "the run's dask tasks were cancelled on the scheduler (by another client?); "
            "finished blocks are kept: run again with --resume"
        ) from None
    except OSError:  # CommClosedError included
        # A look at the workers failed: the scheduler is gone.
        raise _scheduler_lost(client) from None
    except BaseException:
        _cancel(client, [*futures, shared])
        raise
    finally:
        manifest.flush()
    shared.release()
    return voxels


class _ClusterWatch:
    """Ends a run that makes no progress because its workers run out of memory.

    Two signs, both reset by every finished block: workers that vanish (a nanny kills a
    worker at the ``terminate`` fraction of its limit and starts another) more often than
    there are workers, at least twice; and every worker paused for memory and running
    nothing for :data:`PAUSED_LIMIT_S` (a worker paused during a block still finishes it).
    dask itself gives up on a task only after ``allowed-failures`` + 1 killed workers, each
    restart reloading torch (15-20 s apiece on a busy 2-core node), so the first sign ends
    the run sooner.
    """

    def __init__(self, client: Client, memory: MemoryNeed) -> None:
        self.client = client
        self.memory = memory
        self.progress = time.monotonic()
        self.last_look = 0.0
        self.workers: set[str] = set()
        self.lost = 0
        self.most = 1

    def finished(self) -> None:
        """A block finished: the run progresses."""
        self.progress = time.monotonic()
        self.lost = 0

    def look(self) -> None:
        """Look at the workers (at most once per :data:`_POLL_S`).

        Raises
        ------
        SchedulerLostError
            The client lost its scheduler.
        WorkerMemoryError
            Workers keep dying, or all stay paused, with no block finishing.
        OSError
            The scheduler does not answer.
        """
        now = time.monotonic()
        if now - self.last_look < _POLL_S:
            return
        self.last_look = now
        if self.client.status != "running":
            raise _scheduler_lost(self.client)
        workers = self.client.scheduler_info(n_workers=-1).get("workers", {})
        current = set(workers)
        self.lost += len(self.workers - current)
        self.workers = current
        self.most = max(self.most, len(current))
        if self.lost >= max(2, self.most + 1):
            raise WorkerMemoryError(
                f"{self.lost} dask workers died while no block finished, most likely killed "
                f"for exceeding {self.memory.setting}; {self.memory.advice()}"
            )
        # A paused worker still finishes the blocks it runs; only paused and idle is stuck.
        stuck = bool(workers) and all(_paused_idle(w) for w in workers.values())
        if not stuck:
            self.progress = now
        elif now - self.progress > PAUSED_LIMIT_S:
            raise WorkerMemoryError(
                f"every dask worker has been paused for memory, running nothing, for "
                f"{PAUSED_LIMIT_S:g} s (at {_pause_fraction():.0%} of {self.memory.setting}); "
                f"{self.memory.advice()}"
            )


def _paused_idle(worker: Mapping[str, Any]) -> bool:
    """Whether a worker (the scheduler's record of it) is paused and runs no task."""
    counts = (worker.get("metrics") or {}).get("task_counts") or {}
    return worker.get("status") == "paused" and not counts.get("executing")


def _pause_fraction() -> float:
    import dask

    return float(dask.config.get("distributed.worker.memory.pause") or 1.0)


def _cancel(client: Client, futures: list[Any]) -> None:
    """Cancel the run's tasks if the scheduler still answers."""
    if client.status != "running":
        return
    with contextlib.suppress(OSError, TimeoutError):
        client.cancel(futures)


def deconvolve_volumes(
    client: Client,
    sources: Sequence[VolumeSource],
    output: Path,
    processor: BlockProcessor,
    plan: BlockPlan,
    mode: OutputMode = "new",
    provenance: Mapping[str, Any] | None = None,
    max_blocks: int | None = None,
    progress: bool = True,
) -> RunReport:
    """Process every block of every input on the cluster behind ``client``.

    Parameters
    ----------
    client
        Connected dask client.
    sources
        Inputs, from :func:`~hpcdeconv.inference.sources.open_sources`.
    output
        ``.zarr`` directory; input ``name`` is written to ``deconvolved/<name>`` with the
        input's voxel size and ``plan.chunks`` chunks.
    processor
        What runs on a block (:class:`~hpcdeconv.inference.processors.NetworkProcessor`,
        :class:`~hpcdeconv.inference.processors.RLProcessor`).
    plan
        Blocks, halo, chunks and retries, one entry per axis of the inputs.
    mode
        ``"new"`` (the output must not exist), ``"overwrite"`` or ``"resume"`` (skip blocks
        recorded as finished; the inputs, plan and processor must be those of the record).
    provenance
        Extra attributes stored on the output (configuration, checkpoint, ...).
    max_blocks
        Stop after submitting this many blocks (to interrupt a run in tests).
    progress
        Show a progress bar over blocks.

    Returns
    -------
    RunReport
        Counts and throughput.

    Raises
    ------
    InputError
        A block reads NaN/Inf voxels (named with its input), or the record to resume does
        not match.
    NonFiniteOutputError
        A block of finite input produced NaN/Inf.
    """
    output = Path(output).absolute()
    check_output(output, sources, mode)
    check_plan(plan, sources)
    fingerprint = run_fingerprint(sources, plan, processor)
    provenance = {
        "version": __version__,
        "block": list(plan.block),
        "halo": list(plan.halo),
        "chunks": list(plan.chunks),
        "processor": processor.fingerprint,
        **(provenance or {}),
    }
    # Before anything is written: workers too small for one block would be killed in a loop.
    memory = check_memory(client, processor, plan, sources)
    manifest = prepare_output(output, sources, plan, fingerprint, provenance, mode)
    grids = {s.name: plan.grid(s.shape) for s in sources}
    total = sum(len(g) for g in grids.values())
    work = [
        (source, flat, block)
        for source in sources
        for flat, block in enumerate(grids[source.name])
        if flat not in manifest.done(source.name)
    ]
    skipped = total - len(work)
    work = work if max_blocks is None else work[:max_blocks]
    start = time.perf_counter()
    with tqdm(
        total=total, initial=skipped, unit="block", disable=not progress, smoothing=0.1
    ) as bar:
        voxels = _run_blocks(client, work, output, processor, plan.retries, manifest, bar, memory)
    report = RunReport(
        outputs=tuple(output / OUTPUT_GROUP / s.name for s in sources),
        total_blocks=total,
        skipped=skipped,
        processed=len(work),
        voxels=voxels,
        seconds=time.perf_counter() - start,
    )
    if report.complete:
        # Viewer levels are built from the finished full resolution (lazily, with dask).
        group = zarr.open_group(output, mode="r+")
        for source in sources:
            add_pyramid(group[f"{OUTPUT_GROUP}/{source.name}"])
    logger.info(
        "%d block(s), %d voxels in %.1f s: %.3g voxels/s",
        report.processed,
        report.voxels,
        report.seconds,
        report.voxels_per_second,
    )
    return report


def _task_resources(client: Client) -> dict[str, int] | None:
    wait_for_workers(client)
    return {GPU_RESOURCE: 1} if workers_declare_gpus(client) else None


def _identity(value: Any) -> Any:
    return value
