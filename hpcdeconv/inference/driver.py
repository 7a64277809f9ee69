"""Block-wise, dask-distributed deconvolution of whole volumes into a zarr group.

Each input volume ``(Z, Y, X)`` is cut by :func:`~hpcdeconv.inference.tiling.block_grid`
into blocks that each own whole chunks of a pre-created output array
``OUT.zarr/deconvolved/<name>``. One dask task per block

1. opens the input itself (paths travel, never arrays) and reads the block grown by the
   halo (``Block.read``),
2. refuses NaN/Inf voxels, reporting the block and the input,
3. runs a :class:`BlockProcessor` on it: a network via
   :func:`~hpcdeconv.inference.predict.predict_block` (tiles and blending inside the
   block, symmetric padding where the halo leaves the volume), or Richardson-Lucy (whose
   operator treats the volume's border itself, see :class:`RLProcessor`),
4. writes exactly ``Block.write`` into the output array: whole chunks that no other task
   touches, so there is no read-modify-write and no lock (the array is not sharded).

With a halo at least the network's receptive-field radius, every block computes what the
network gives on the whole volume (padded symmetrically by the halo) on its region, so the
stitched output has no seams. RL couples voxels ``2 r`` apart per iteration for a PSF of
radius ``r``; its blocks match whole-volume RL to within the error documented in
:func:`~hpcdeconv.classical.rl.rl_halo`. The client alone records finished blocks
(:mod:`~hpcdeconv.inference.manifest`), which makes ``--resume`` skip them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import tifffile
import torch
import zarr
from distributed import Client, KilledWorker, wait
from tqdm import tqdm

from hpcdeconv import __version__
from hpcdeconv.config import ClusterConfig, CodecConfig
from hpcdeconv.data.ngff import LEVEL0, add_pyramid, create_image
from hpcdeconv.data.opener import open_image, read_region
from hpcdeconv.data.zarr_io import (
    blosc_codec,
    clip_chunks,
    create_dataset,
    open_dataset,
)
from hpcdeconv.errors import ConfigError, HpcdeconvError, InputError, OutputExistsError
from hpcdeconv.inference.cluster import GPU_RESOURCE, SchedulerLostError, workers_declare_gpus
from hpcdeconv.inference.frozen import inference_network
from hpcdeconv.inference.manifest import Manifest
from hpcdeconv.inference.memory import (
    WorkerMemoryError,
    check_worker_memory,
    describe_need,
    mib,
    network_block_bytes,
    parse_limit,
    rl_block_bytes,
    suggested_limit,
    usable_fraction,
    worker_need,
)
from hpcdeconv.inference.model import LoadedModel, load_model
from hpcdeconv.inference.predict import Model, PredictSettings, predict_block
from hpcdeconv.inference.tiling import BlendMode, Block, Slices, block_grid
from hpcdeconv.inference.volume_io import TIFF_SUFFIXES

logger = logging.getLogger(__name__)

OutputMode = Literal["new", "overwrite", "resume"]

#: Group inside the output store that holds one array per input.
OUTPUT_GROUP = "deconvolved"
_AXES = ("z", "y", "x")


class NonFiniteOutputError(HpcdeconvError):
    """A block of finite input produced NaN or Inf (e.g. fp16 overflow)."""


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VolumeSource:
    """One input volume, described by path so that any worker can open it.

    Attributes
    ----------
    path
        Absolute path of a TIFF stack or of an array directory inside a zarr store.
    name
        Name of the output array (``deconvolved/<name>``).
    shape
        ``(Z, Y, X)``.
    voxel_size
        ``(dz, dy, dx)`` in micrometres, carried over to the output; None where unknown.
    plain
        Whether the stored data reshaped to ``shape`` is the volume (singleton axes only).
    """

    path: Path
    name: str
    shape: tuple[int, ...]
    voxel_size: tuple[float | None, ...]
    plain: bool = True

    @property
    def is_tiff(self) -> bool:
        """Whether the volume is a TIFF stack (else a zarr array)."""
        return self.path.suffix.lower() in TIFF_SUFFIXES

    def read(self, region: Slices) -> np.ndarray:
        """``volume[region]`` as float32, read on whichever process calls it."""
        if self.is_tiff and self.plain:
            stat = self.path.stat()
            volume = _tiff_volume(str(self.path), stat.st_mtime_ns, self.shape)
            return np.asarray(volume[region], dtype=np.float32)
        return read_region(self.path, region)


@functools.lru_cache(maxsize=2)
def _tiff_volume(path: str, mtime_ns: int, shape: tuple[int, ...]) -> np.ndarray:
    """A TIFF stack as a ``(Z, Y, X)`` array, memory-mapped where the file allows it.

    Cached per process (``mtime_ns`` keys out a rewritten file), so a worker reads a
    compressed stack once rather than once per block.
    """
    try:
        data = tifffile.memmap(path, mode="r")
    except ValueError:  # compressed or not contiguous: decode it once
        data = tifffile.imread(path)
    return data.reshape(shape)


def open_source(
    path: Path, voxel_size: Sequence[float] | None = None, warn: bool = True
) -> VolumeSource:
    """Describe one input (any image :func:`~hpcdeconv.data.opener.open_image` reads).

    ``voxel_size`` (µm) overrides the file's; an unknown size stays None.

    Raises
    ------
    InputError
        Missing or unreadable input, or axes that are not (Z, Y, X).
    """
    path = Path(path).absolute()
    image = open_image(path, voxel_size=voxel_size, warn=warn)
    shape = tuple(int(n) for n in image.data.shape)
    return VolumeSource(path, image.name, shape, tuple(image.voxel_size), image.plain)


def open_sources(
    paths: Sequence[Path], voxel_size: Sequence[float] | None = None
) -> list[VolumeSource]:
    """:func:`open_source` for each path; two inputs may not share an output name."""
    sources = [open_source(p, voxel_size) for p in paths]
    seen: dict[str, Path] = {}
    for source in sources:
        if source.name in seen:
            raise InputError(
                f"{source.path} and {seen[source.name]} would both be written to "
                f"'{OUTPUT_GROUP}/{source.name}'"
            )
        seen[source.name] = source.path
    return sources


# --------------------------------------------------------------------------------------
# Decomposition
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockPlan:
    """How volumes are cut into tasks and how failed tasks are retried.

    Attributes
    ----------
    block
        Block shape ``(Z, Y, X)``: a multiple of ``chunks``. Along an axis where a volume
        needs more than one block it must be at least ``2 * halo`` (:meth:`check`), so a
        block does not read several times what it writes; a volume that fits in one block
        along an axis is taken whole there, whatever the halo.
    halo
        Voxels read beyond each side of a block, per axis; clipped to the volume's length
        (:meth:`halo_for`).
    chunks
        Output chunk shape; clipped to the volume along short axes.
    retries
        Times a failed task is run again before the run fails.
    """

    block: tuple[int, int, int]
    halo: tuple[int, int, int]
    chunks: tuple[int, int, int]
    retries: int = 2

    def __post_init__(self) -> None:
        if min(self.block) < 1 or min(self.chunks) < 1 or min(self.halo) < 0:
            raise ConfigError(
                f"block {self.block} and chunks {self.chunks} must be positive, "
                f"halo {self.halo} non-negative"
            )
        if self.retries < 0:
            raise ConfigError(f"retries must be >= 0, got {self.retries}")
        if any(b % c for b, c in zip(self.block, self.chunks, strict=True)):
            raise ConfigError(f"block {self.block} must be a multiple of chunks {self.chunks}")

    def chunks_for(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Output chunks of a volume of ``shape``: ``chunks`` clipped to the volume."""
        return clip_chunks(self.chunks, shape)

    def halo_for(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The halo clipped to the volume: no axis reads or pads more than its length.

        Along an axis that one block covers, the read region is the whole axis whatever
        the halo; the symmetric padding (networks) then holds one mirror image at most.
        """
        return tuple(min(h, int(n)) for h, n in zip(self.halo, shape, strict=True))

    def check(self, shape: Sequence[int], what: str = "volume") -> None:
        """Refuse a halo above half the block along axes where ``shape`` needs several blocks.

        Raises
        ------
        ConfigError
            Naming the axes and the ``--block`` or ``--halo`` value that fixes it.
        """
        split = [a for a, (n, b) in enumerate(zip(shape, self.block, strict=True)) if n > b]
        bad = [a for a in split if self.block[a] < 2 * self.halo[a]]
        if not bad:
            return
        step = math.lcm(*self.chunks)
        # The smallest --block (all three axes) that either covers each bad axis or is
        # at least twice its halo; a larger block only removes splits.
        block = step
        while any(block < n and block < 2 * self.halo[a] for a, n in enumerate(shape)):
            block += step
        halo = min(self.block[a] // 2 for a in bad)
        axes = ", ".join(_AXES[a] for a in bad)
        raise ConfigError(
            f"{what} {tuple(int(n) for n in shape)}: block {self.block} is smaller than "
            f"2 x halo {self.halo} along {axes}, where the volume needs several blocks; "
            f"use --block {block} or more, or --halo {halo} or less"
        )

    def grid(self, shape: Sequence[int]) -> list[Block]:
        """Blocks of a volume of ``shape``, in C order of block index.

        Along an axis no longer than a chunk, the single chunk is the single block.
        """
        chunks = self.chunks_for(shape)
        block = tuple(
            b if s > c else s for b, c, s in zip(self.block, self.chunks, shape, strict=True)
        )
        return block_grid(shape, block, self.halo_for(shape), chunks)


def check_plan(plan: BlockPlan, sources: Sequence[VolumeSource]) -> None:
    """:meth:`BlockPlan.check` for every input, before anything is started or written."""
    for source in sources:
        plan.check(source.shape, str(source.path))


def check_halo(halo: Sequence[int], needed: Sequence[int], what: str) -> None:
    """Warn when the halo is below the radius the processing needs for seamless output."""
    if any(h < n for h, n in zip(halo, needed, strict=True)):
        logger.warning(
            "halo %s is smaller than the %s %s: block borders will show seams",
            tuple(halo),
            what,
            tuple(needed),
        )


# --------------------------------------------------------------------------------------
# What runs on a block
# --------------------------------------------------------------------------------------


class BlockProcessor(Protocol):
    """Maps one block's read region to its write region, on a worker.

    ``fingerprint`` is a JSON-serialisable description of everything that determines the
    output (compared before resuming a run). A processor may also have a string property
    ``nonfinite_advice``: what to try, in its verb's own settings, when a block of finite
    input gives NaN/Inf.
    """

    @property
    def fingerprint(self) -> dict[str, Any]: ...

    def __call__(self, data: np.ndarray, block: Block) -> np.ndarray: ...


# Per-process worker state; filled on first use so that importing has no side effects.
_RUNTIME: dict[str, torch.device] = {}
_NETWORKS: dict[tuple[str, str, str, bool], Model] = {}
_LOCK = threading.Lock()
_LOCAL_RANK_VARIABLES = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID")


def _local_index() -> int:
    """Which of the node's GPUs this worker takes.

    A LocalCluster numbers its workers 0, 1, …; other workers (dask-mpi ranks, SLURM jobs)
    have string names and take their node-local rank from the launcher.
    """
    from distributed import get_worker

    try:
        name = get_worker().name
    except ValueError:
        name = None
    if isinstance(name, int):
        return name
    for variable in _LOCAL_RANK_VARIABLES:
        if os.environ.get(variable, "").isdigit():
            return int(os.environ[variable])
    return 0


def worker_device() -> torch.device:
    """The device of this worker: one GPU per worker if any are visible, else the CPU."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return torch.device("cpu")
    return torch.device("cuda", _local_index() % count)


def _worker_runtime(threads: int, client_pid: int) -> torch.device:
    """Pin this worker process to its device and thread count, once.

    Torch threads are set only in worker processes: a worker thread inside the client
    process must not change the client's own setting.
    """
    with _LOCK:
        if "device" not in _RUNTIME:
            if os.getpid() != client_pid:
                torch.set_num_threads(threads)
            device = worker_device()
            if device.type == "cuda":
                torch.cuda.set_device(device)
            _RUNTIME["device"] = device
            logger.info("worker %d uses %s with %d thread(s)", os.getpid(), device, threads)
        return _RUNTIME["device"]


def _cached_network(
    checkpoint: Path,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    freeze: bool,
    weights: Literal["raw", "ema"] = "raw",
) -> Model:
    """G_Θ of ``checkpoint`` on ``device`` as tiles run it, built once per worker process."""
    key = (str(checkpoint), str(device), str(autocast_dtype), freeze, weights)
    with _LOCK:
        if key not in _NETWORKS:
            net = load_model(checkpoint, device, weights=weights).net
            _NETWORKS[key] = inference_network(net, device, autocast_dtype, freeze)
        return _NETWORKS[key]


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for piece in iter(lambda: fh.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _first_level_channels(model: LoadedModel) -> int:
    """Feature channels of G_Θ's first level: its first convolution's outputs."""
    for module in model.net.modules():
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            return int(module.out_channels)
    return 1


@dataclass(frozen=True)
class NetworkProcessor:
    """Tiled inference of a checkpoint's deblurring generator G_Θ inside each block.

    Attributes
    ----------
    checkpoint
        Resolved checkpoint file; every worker loads it once (``weights_only=True``).
    sha256
        Its digest, recorded and compared on resume.
    settings
        Tiling, blending and precision inside a block (``device`` is chosen per worker).
    precision
        ``"fp32"``, ``"bf16"`` or ``"fp16"``, as configured.
    threads
        Torch threads per worker process.
    freeze
        Run G_Θ through :class:`~hpcdeconv.inference.frozen.FrozenNetwork` on CPU workers
        in fp32.
    client_pid
        Process id of the client (see :func:`_worker_runtime`).
    weights
        ``"raw"`` or ``"ema"``: which of the checkpoint's weights (as loaded on the client).
    """

    checkpoint: Path
    sha256: str
    settings: PredictSettings
    precision: str
    threads: int = 1
    freeze: bool = True
    client_pid: int = field(default_factory=os.getpid)
    weights: Literal["raw", "ema"] = "raw"
    channels: int = 16

    @classmethod
    def from_model(
        cls,
        model: LoadedModel,
        tile: Sequence[int],
        overlap: int,
        blend: BlendMode,
        batch_size: int,
        precision: str,
        threads: int = 1,
        freeze: bool = True,
    ) -> NetworkProcessor:
        """Settings for ``model`` (loaded on the client to validate the checkpoint)."""
        settings = PredictSettings(
            tile=tuple(int(t) for t in tile),
            overlap=overlap,
            blend=blend,
            batch_size=batch_size,
            autocast_dtype=_AUTOCAST.get(precision),
            size_multiple=model.size_multiple,
        )
        checkpoint = model.checkpoint.absolute()
        return cls(
            checkpoint,
            file_sha256(checkpoint),
            settings,
            precision,
            threads,
            freeze,
            weights=model.weights,
            channels=_first_level_channels(model),
        )

    def block_bytes(self, block: Block) -> int:
        """Estimated memory of one block on a worker (:mod:`~hpcdeconv.inference.memory`)."""
        padded = [
            s.stop - s.start + before + after
            for s, (before, after) in zip(block.read, block.pad, strict=True)
        ]
        tile = [min(t, n) for t, n in zip(self.settings.rounded_tile, padded, strict=True)]
        return network_block_bytes(padded, tile, self.channels, self.settings.batch_size)

    @property
    def nonfinite_advice(self) -> str:
        """What to try when a block of finite input gave NaN/Inf: half precision overflows."""
        if self.precision == "fp32":
            return ""
        return f"{self.precision} may have overflowed; run with --set precision=fp32"

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What determines the output: weights, tiling, blending, precision, freezing."""
        return {
            "kind": "network",
            "checkpoint_sha256": self.sha256,
            "weights": self.weights,
            "tile": list(self.settings.tile),
            "overlap": self.settings.overlap,
            "blend": self.settings.blend,
            "precision": self.precision,
            "freeze": self.freeze,
        }

    def __call__(self, data: np.ndarray, block: Block) -> np.ndarray:
        """G_Θ on the padded block, tiled and blended, cropped to ``block.write``."""
        device = _worker_runtime(self.threads, self.client_pid)
        network = _cached_network(
            self.checkpoint, device, self.settings.autocast_dtype, self.freeze, self.weights
        )
        settings = dataclasses.replace(self.settings, device=device)
        return predict_block(network, data, block, settings)


@dataclass(frozen=True)
class RLProcessor:
    """(TV-)Richardson-Lucy of each padded block, cropped to the block's own region.

    Attributes
    ----------
    psf
        ``(Kz, Ky, Kx)`` PSF, centre at ``k // 2``.
    iterations
        RL updates.
    tv
        TV weight (0 for plain RL).
    threads, client_pid
        As in :class:`NetworkProcessor`.
    boundary
        Treatment of the volume's own border, ``"reflect"`` or ``"truncated"`` (see
        :mod:`hpcdeconv.classical.rl`).
    """

    psf: np.ndarray = field(repr=False)
    iterations: int
    tv: float = 0.0
    threads: int = 1
    client_pid: int = field(default_factory=os.getpid)
    boundary: str = "reflect"

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What determines the output: PSF, iteration count, TV weight, boundary."""
        psf = np.ascontiguousarray(self.psf, dtype=np.float32)
        return {
            "kind": "richardson_lucy",
            "psf_sha256": hashlib.sha256(psf.tobytes()).hexdigest(),
            "psf_shape": list(psf.shape),
            "iterations": self.iterations,
            "tv": self.tv,
            "boundary": self.boundary,
        }

    def block_bytes(self, block: Block) -> int:
        """Estimated memory of one block on a worker (:mod:`~hpcdeconv.inference.memory`)."""
        read = [s.stop - s.start for s in block.read]
        return rl_block_bytes(read, self.psf.shape, tv=self.tv > 0)

    @property
    def nonfinite_advice(self) -> str:
        """What to try when a block of finite input gave NaN/Inf: RL runs in float32."""
        return "RL computes in float32; scale the input's intensities down"

    def __call__(self, data: np.ndarray, block: Block) -> np.ndarray:
        """RL on the unpadded read region; the part of the result that ``block`` writes.

        RL is not padded like a network: its operator treats each side itself. Where the
        read region meets the volume's border it applies ``boundary``, so a border block
        sees the border exactly as whole-volume RL does. Where the halo ends inside the
        volume it reflects: the mirrored halo is a better guess of the unseen neighbours
        than darkness, and the block core then matches whole-volume RL 1.5 to 7 times more
        closely (measured in :func:`~hpcdeconv.classical.rl.rl_halo`).
        """
        from hpcdeconv.classical.rl import richardson_lucy

        device = _worker_runtime(self.threads, self.client_pid)
        # A Block made without ``border`` (not by block_grid) is taken as a whole volume.
        border = block.border or ((True, True),) * data.ndim
        sides = [
            (self.boundary if before else "reflect", self.boundary if after else "reflect")
            for before, after in border
        ]
        result = richardson_lucy(
            data, self.psf, self.iterations, tv=self.tv, device=device, boundary=sides
        )
        keep = tuple(
            slice(c.start - before, c.stop - before)
            for c, (before, _) in zip(block.crop, block.pad, strict=True)
        )
        return np.asarray(result[keep], dtype=np.float32)


# --------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockOutcome:
    """What a task reports back: which block, and how many bad voxels it met."""

    name: str
    flat: int
    voxels: int
    nonfinite_input: int = 0
    nonfinite_output: int = 0


def _count_nonfinite(array: np.ndarray) -> int:
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def process_block(
    source: VolumeSource, target: Path, block: Block, flat: int, processor: BlockProcessor
) -> BlockOutcome:
    """Read, check, process and write one block (runs on a worker).

    Nothing is written when the input region or the result holds NaN/Inf; the client
    turns that outcome into an error naming the block.
    """
    data = source.read(block.read)
    voxels = int(np.prod([s.stop - s.start for s in block.write]))
    bad = _count_nonfinite(data)
    if bad:
        return BlockOutcome(source.name, flat, voxels, nonfinite_input=bad)
    result = processor(data, block)
    bad = _count_nonfinite(result)
    if bad:
        return BlockOutcome(source.name, flat, voxels, nonfinite_output=bad)
    zarr.open_array(target, mode="r+")[block.write] = result
    return BlockOutcome(source.name, flat, voxels)


def _identity(value: Any) -> Any:
    return value


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def _contains(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def check_output(output: Path, sources: Sequence[VolumeSource], mode: OutputMode) -> None:
    """Refuse an output that is not ``.zarr``, overlaps an input, or exists (mode ``new``)."""
    output = Path(output).absolute()
    for source in sources:
        if _contains(output, source.path) or _contains(source.path, output):
            raise InputError(f"input {source.path} and output {output} overlap; choose another")
    if output.suffix != ".zarr":
        raise InputError(f"--output must be a .zarr directory, got {output.name}")
    if mode == "new" and (output.exists() or output.is_symlink()):
        raise OutputExistsError(
            f"{output} exists; pass --overwrite to replace it or --resume to continue it"
        )


def _create_arrays(
    group: zarr.Group,
    sources: Sequence[VolumeSource],
    plan: BlockPlan,
    provenance: Mapping[str, Any],
) -> None:
    for source in sources:
        # An OME-NGFF 0.5 image per input; blocks write its level 0.
        create_image(
            group,
            f"{OUTPUT_GROUP}/{source.name}",
            source.shape,
            plan.chunks_for(source.shape),
            blosc_codec(CodecConfig()),
            source.voxel_size,
            {"provenance": {**provenance, "input": str(source.path)}},
        )


def prepare_output(
    output: Path,
    sources: Sequence[VolumeSource],
    plan: BlockPlan,
    fingerprint: Mapping[str, Any],
    provenance: Mapping[str, Any],
    mode: OutputMode,
) -> Manifest:
    """Create the output group and its arrays, or reopen them to resume.

    ``resume`` of an output that does not exist starts a new one.
    """
    output = Path(output)
    if mode == "resume" and output.exists():
        return Manifest.resume(open_dataset(output, mode="r+"), fingerprint)
    group = create_dataset(output, overwrite=mode == "overwrite")
    _create_arrays(group, sources, plan, provenance)
    manifest = Manifest(group, fingerprint, provenance)
    manifest.flush()
    return manifest


def run_fingerprint(
    sources: Sequence[VolumeSource], plan: BlockPlan, processor: BlockProcessor
) -> dict[str, Any]:
    """Everything a resumed run must share with the run it continues."""
    return {
        "inputs": [{"name": s.name, "path": str(s.path), "shape": list(s.shape)} for s in sources],
        "block": list(plan.block),
        "halo": list(plan.halo),
        "chunks": list(plan.chunks),
        "processor": processor.fingerprint,
    }


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


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


def _region_text(block: Block) -> str:
    return ", ".join(f"{a} {s.start}:{s.stop}" for a, s in zip(_AXES, block.write, strict=True))


def _raise_for(
    outcome: BlockOutcome, source: VolumeSource, block: Block, processor: BlockProcessor
) -> None:
    where = f"{source.path}: block {block.index} ({_region_text(block)})"
    if outcome.nonfinite_input:
        raise InputError(f"{where} reads {outcome.nonfinite_input} NaN or Inf voxel(s)")
    if outcome.nonfinite_output:
        # Only the processor knows which of its verb's settings could help.
        advice = getattr(processor, "nonfinite_advice", "")
        raise NonFiniteOutputError(
            f"{where} produced {outcome.nonfinite_output} NaN or Inf voxel(s) from finite "
            "input" + (f"; {advice}" if advice else "")
        )


def _task_resources(client: Client) -> dict[str, int] | None:
    _wait_for_workers(client)
    return {GPU_RESOURCE: 1} if workers_declare_gpus(client) else None


def _wait_for_workers(client: Client) -> dict[str, Any]:
    """The scheduler's workers, once at least one has connected."""
    if not client.scheduler_info(n_workers=-1).get("workers"):
        logger.info("waiting for the first dask worker to connect")
        client.wait_for_workers(1)
    return client.scheduler_info(n_workers=-1).get("workers", {})


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
    workers = _wait_for_workers(client)
    limits = [int(w.get("memory_limit") or 0) for w in workers.values()]
    threads = max((int(w.get("nthreads") or 1) for w in workers.values()), default=1)
    limit = min(limits) if limits and all(limits) else None
    where = "cluster.memory_per_worker" if client.cluster is not None else _EXTERNAL_LIMIT
    need, text = block_memory(processor, plan, sources, threads)
    check_worker_memory(limit, need, text, where)
    return MemoryNeed(need, text, limit, where)


# Workers this client did not start (an existing scheduler) got their limit there; dask-mpi
# ranks get cluster.memory_per_worker, checked before they start (check_memory_setting).
_EXTERNAL_LIMIT = "dask worker --memory-limit"


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
    where = f"{source.path}: block {block.index} ({_region_text(block)})"
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
        Inputs, from :func:`open_sources`.
    output
        ``.zarr`` directory; input ``name`` is written to ``deconvolved/<name>`` with the
        input's voxel size and ``plan.chunks`` chunks.
    processor
        What runs on a block (:class:`NetworkProcessor`, :class:`RLProcessor`).
    plan
        Blocks, halo, chunks and retries.
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
