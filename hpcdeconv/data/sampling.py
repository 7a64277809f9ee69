"""Random training patches: which volume and where, drawn deterministically per sample.

A draw depends only on ``(seed, step, global_index, stream)`` with
``global_index = index * world_size + rank``. Hence

* a resumed run draws exactly the patches of the uninterrupted run (no sampler state
  besides the step counter);
* ranks never share a draw, and the union of all ranks' draws at a step equals the draws
  of a single process with the same global batch (the data seen does not depend on how
  many GPUs are used).

Patch positions are uniform over every valid placement in the dataset, so a volume is
picked with probability proportional to its number of placements. With ``align`` (the
storage chunk shape) placements are restricted to those touching the fewest chunks,
``ceil(patch / chunk)`` per axis, plus the last placement along each axis so that every
voxel stays reachable.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from hpcdeconv.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

#: A spatial shape: ``(Z, Y, X)`` or ``(Y, X)``.
SpatialShape = tuple[int, ...]
# SeedSequence only takes non-negative entropy; negative seeds wrap like uint64.
_SEED_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class PatchSpec:
    """Location of one patch.

    Attributes
    ----------
    volume
        Volume id, e.g. ``"v003"``.
    start
        First voxel ``(z, y, x)`` (or ``(y, x)``).
    size
        Patch shape ``(Z, Y, X)`` (or ``(Y, X)``); spatial axes only, every channel is read.
    """

    volume: str
    start: tuple[int, ...]
    size: tuple[int, ...]

    @property
    def stop(self) -> tuple[int, ...]:
        """One past the last voxel along each axis."""
        return tuple(s + n for s, n in zip(self.start, self.size, strict=True))

    @property
    def slices(self) -> tuple[slice, ...]:
        """Index that cuts the patch out of its ``(Z, Y, X)`` or ``(Y, X)`` image."""
        return tuple(slice(s, e) for s, e in zip(self.start, self.stop, strict=True))


def chunks_touched(spec: PatchSpec, chunks: Sequence[int]) -> int:
    """Number of storage chunks of shape ``chunks`` that the patch intersects."""
    count = 1
    for start, stop, chunk in zip(spec.start, spec.stop, chunks, strict=True):
        count *= (stop - 1) // chunk - start // chunk + 1
    return count


@lru_cache(maxsize=256)
def axis_starts(length: int, patch: int, chunk: int | None) -> np.ndarray:
    """Valid start positions of a patch along one axis.

    Parameters
    ----------
    length
        Volume size along the axis.
    patch
        Patch size along the axis, ``<= length``.
    chunk
        Storage chunk size, or ``None`` for every start in ``[0, length - patch]``.

    Returns
    -------
    numpy.ndarray
        Sorted unique starts (read-only). With ``chunk``: starts ``s`` such that the patch
        spans the minimal ``ceil(patch / chunk)`` chunks, i.e. ``s % chunk <= slack`` with
        ``slack = ceil(patch / chunk) * chunk - patch``, plus ``length - patch``.
    """
    last = length - patch
    starts = np.arange(last + 1, dtype=np.int64)
    if chunk is not None:
        slack = math.ceil(patch / chunk) * chunk - patch
        starts = starts[(starts % chunk <= slack) | (starts == last)]
    starts.flags.writeable = False
    return starts


def centre_crop_slices(shape: Sequence[int], crop: Sequence[int] | None) -> tuple[slice, ...]:
    """Slices of the centred ``crop`` of an array of spatial ``shape``, clamped to it.

    ``shape`` and ``crop`` are ``(Z, Y, X)`` or ``(Y, X)``; ``crop=None`` selects the whole
    array. An odd margin leaves the extra voxel after the crop (start ``(n - c) // 2``).

    Raises
    ------
    ValueError
        ``crop`` and ``shape`` differ in length.
    """
    if crop is None:
        return (slice(None),) * len(shape)
    if len(shape) != len(crop):
        raise ValueError(f"crop {list(crop)} and shape {list(shape)} differ in axes")
    sizes = [min(int(c), int(n)) for c, n in zip(crop, shape, strict=True)]
    starts = [(int(n) - c) // 2 for c, n in zip(sizes, shape, strict=True)]
    return tuple(slice(s, s + c) for s, c in zip(starts, sizes, strict=True))


def sample_rng(seed: int, step: int, global_index: int, stream: int = 0) -> np.random.Generator:
    """Generator that depends only on its arguments (a fresh, independent stream each)."""
    if step < 0 or global_index < 0 or stream < 0:
        raise ValueError("step, index and stream must be non-negative")
    return np.random.default_rng(
        np.random.SeedSequence([seed & _SEED_MASK, step, global_index, stream])
    )


class PatchSampler:
    """Draws :class:`PatchSpec` s for rank ``rank`` of ``world_size``.

    Parameters
    ----------
    volumes
        Volume id -> spatial shape ``(Z, Y, X)`` or ``(Y, X)`` (no channel axis).
    patch
        Patch shape with as many axes as the volumes (2 or 3); must fit in every volume.
    seed
        Run seed.
    rank, world_size
        This process's data-parallel rank and the number of ranks.
    align
        Storage chunk shape; when given, patches touch as few chunks as possible.
    """

    def __init__(
        self,
        volumes: Mapping[str, Sequence[int]],
        patch: Sequence[int],
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        align: Sequence[int] | None = None,
    ) -> None:
        if not volumes:
            raise InputError("no volumes to sample patches from")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.patch: SpatialShape = _spatial_shape(patch, "patch")
        self.volumes: dict[str, SpatialShape] = {
            k: _spatial_shape(v, f"volume '{k}'") for k, v in sorted(volumes.items())
        }
        for volume, shape in self.volumes.items():
            if len(shape) != len(self.patch):
                raise InputError(
                    f"patch {list(self.patch)} has {len(self.patch)} spatial axes but volume "
                    f"'{volume}' of {list(shape)} has {len(shape)}: the patch must be "
                    f"{'(Z, Y, X)' if len(shape) == 3 else '(Y, X)'} for this data"
                )
        self.align: SpatialShape | None = None
        if align is not None:
            self.align = _spatial_shape(align, "align")
            if len(self.align) != len(self.patch):
                raise ValueError(f"align {list(align)} and patch {list(patch)} differ in axes")
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self._ids = list(self.volumes)
        counts = np.array([self._placements(v, s) for v, s in self.volumes.items()], float)
        self._weights = counts / counts.sum()

    def _starts(self, shape: SpatialShape) -> list[np.ndarray]:
        chunks = self.align or (None,) * len(shape)
        return [axis_starts(n, p, c) for n, p, c in zip(shape, self.patch, chunks, strict=True)]

    def _placements(self, volume: str, shape: SpatialShape) -> int:
        if any(p > n for p, n in zip(self.patch, shape, strict=True)):
            raise InputError(f"patch {self.patch} does not fit in volume '{volume}' of {shape}")
        return math.prod(len(s) for s in self._starts(shape))

    def rng(self, step: int, index: int, stream: int = 0) -> np.random.Generator:
        """Generator for sample ``index`` of this rank's batch at ``step`` (e.g. augmentation)."""
        if index < 0:
            raise ValueError(f"index must be non-negative, got {index}")
        return sample_rng(self.seed, step, index * self.world_size + self.rank, stream)

    def sample(
        self, step: int, index: int, *, stream: int = 0, exclude: str | None = None
    ) -> PatchSpec:
        """Patch for sample ``index`` of this rank's batch at training step ``step``.

        Parameters
        ----------
        step, index
            Training step and position in this rank's batch (both ``>= 0``).
        stream
            Independent draw for the same sample (e.g. 0 for sharp, 1 for blurred).
        exclude
            Volume id that must not be drawn (unpaired sampling needs two volumes).
        """
        rng = self.rng(step, index, stream)
        weights = self._weights
        if exclude is not None and exclude in self.volumes:
            weights = np.where(np.array(self._ids) == exclude, 0.0, weights)
            if weights.sum() == 0:
                raise InputError(f"no volume other than '{exclude}' to sample from")
            weights = weights / weights.sum()
        volume = self._ids[int(rng.choice(len(self._ids), p=weights))]
        starts = self._starts(self.volumes[volume])
        start = tuple(int(s[rng.integers(len(s))]) for s in starts)
        return PatchSpec(volume=volume, start=start, size=self.patch)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint records to verify that a resumed run draws the same patches."""
        return {
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "patch": list(self.patch),
            "align": None if self.align is None else list(self.align),
            "volumes": {k: list(v) for k, v in self.volumes.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Check that ``state`` describes this sampler; raise ConfigError where it does not.

        Seed, patch, alignment and volumes must match. Rank and world size may differ
        (checkpoints are written by rank 0; the global batch is what matters), which is
        only logged.
        """
        mine = self.state_dict()
        for key in ("seed", "patch", "align", "volumes"):
            if state.get(key) != mine[key]:
                raise ConfigError(
                    f"cannot resume: sampler {key} was {state.get(key)!r}, now {mine[key]!r}"
                )
        if state.get("world_size") != self.world_size:
            logger.info(
                "resuming with world size %s (checkpoint: %s)",
                self.world_size,
                state.get("world_size"),
            )


def _spatial_shape(value: Sequence[int], what: str) -> SpatialShape:
    shape = tuple(int(v) for v in value)
    if len(shape) not in (2, 3) or any(n < 1 for n in shape):
        raise InputError(
            f"{what} must be two (Y, X) or three (Z, Y, X) positive sizes, got {tuple(value)}"
        )
    return shape
