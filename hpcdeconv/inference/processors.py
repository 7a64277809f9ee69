"""What runs on one block inside a dask worker: a network, or Richardson-Lucy.

A :class:`BlockProcessor` maps the region a block reads to the region it writes. Each
worker process pins itself to one device and thread count once (:func:`worker_device`)
and builds a checkpoint's network once per process; :func:`process_block`
is the task itself: read, check, process, write.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import zarr

from hpcdeconv.inference.frozen import inference_network
from hpcdeconv.inference.memory import network_block_bytes, rl_block_bytes
from hpcdeconv.inference.model import LoadedModel, load_model
from hpcdeconv.inference.predict import Model, PredictSettings, predict_block
from hpcdeconv.inference.sources import VolumeSource
from hpcdeconv.inference.tiling import BlendMode, Block
from hpcdeconv.precision import autocast_dtype

logger = logging.getLogger(__name__)


class BlockProcessor(Protocol):
    """Maps one block's read region to its write region, on a worker.

    ``fingerprint`` is a JSON-serialisable description of everything that determines the
    output (compared before resuming a run). A processor may also have a string property
    ``nonfinite_advice``: what to try, in its verb's own settings, when a block of finite
    input gives NaN/Inf, and a method ``block_bytes(block)``: its memory estimate.
    """

    @property
    def fingerprint(self) -> dict[str, Any]: ...

    def __call__(self, data: np.ndarray, block: Block) -> np.ndarray: ...


# Per-process worker state; filled on first use so that importing has no side effects.
_RUNTIME: dict[str, torch.device] = {}
_NETWORKS: dict[tuple[str, str, str, bool, str], Model] = {}
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


def worker_runtime(threads: int, client_pid: int) -> torch.device:
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
    dtype: torch.dtype | None,
    freeze: bool,
    weights: Literal["raw", "ema"] = "raw",
) -> Model:
    """G_Θ of ``checkpoint`` on ``device`` as tiles run it, built once per worker process."""
    key = (str(checkpoint), str(device), str(dtype), freeze, weights)
    with _LOCK:
        if key not in _NETWORKS:
            net = load_model(checkpoint, device, weights=weights).net
            _NETWORKS[key] = inference_network(net, device, dtype, freeze)
        return _NETWORKS[key]


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for piece in iter(lambda: fh.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


@dataclass(frozen=True)
class NetworkProcessor:
    """Tiled inference of a checkpoint's image-to-image generator G_Θ inside each block.

    A block holds the image's axes (e.g. ``(Z, Y, X)``); G_Θ runs on its trailing
    ``spatial_dims`` axes, once per Z plane (2D G_Θ) and per channel (1-channel G_Θ on
    a multichannel image), see :func:`~hpcdeconv.inference.predict.predict_array`.

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
        Process id of the client (see :func:`worker_runtime`).
    weights
        ``"raw"`` or ``"ema"``: which of the checkpoint's weights (as loaded on the client).
    channels
        Feature channels of G_Θ's first level (for the memory estimate).
    in_channels
        Image channels G_Θ takes.
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
    in_channels: int = 1

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
            autocast_dtype=autocast_dtype(precision),
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
            channels=model.first_level_channels,
            in_channels=model.channels,
        )

    def block_bytes(self, block: Block) -> int:
        """Estimated memory of one block on a worker (:mod:`~hpcdeconv.inference.memory`)."""
        padded = [
            s.stop - s.start + before + after
            for s, (before, after) in zip(block.read, block.pad, strict=True)
        ]
        spatial = padded[len(padded) - len(self.settings.tile) :]
        tile = [min(t, n) for t, n in zip(self.settings.rounded_tile, spatial, strict=True)]
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
        device = worker_runtime(self.threads, self.client_pid)
        network = _cached_network(
            self.checkpoint, device, self.settings.autocast_dtype, self.freeze, self.weights
        )
        settings = dataclasses.replace(self.settings, device=device)
        return predict_block(network, data, block, settings, self.in_channels)


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

        device = worker_runtime(self.threads, self.client_pid)
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
