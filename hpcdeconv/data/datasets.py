"""Patch datasets read lazily from a zarr dataset, safe for multi-process data loading.

:class:`ZarrVolumes` is a picklable handle (a path and a list of ids); each process opens
the zarr group itself on first use, so DataLoader workers (fork or spawn) and dask workers
never share open stores. The datasets are map-style over a flat index
``i = (step - start_step) * batch_size + index``; with ``DataLoader(batch_size=batch_size,
shuffle=False)`` batch ``k`` is training step ``start_step + k`` on this rank, and every
sample is a pure function of ``(seed, rank, step, index)`` whatever the number of workers.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset

from hpcdeconv.data.augment import random_rot_flip_many
from hpcdeconv.data.sampling import PatchSampler, PatchSpec
from hpcdeconv.data.zarr_io import (
    BLURRED,
    DOMAINS,
    SHARP,
    get_split,
    open_array,
    open_dataset,
    volume_ids,
)
from hpcdeconv.errors import InputError

# Independent random streams of one sample (see PatchSampler.rng).
_STREAM_SHARP, _STREAM_BLURRED, _STREAM_AUG_X, _STREAM_AUG_Y = 0, 1, 2, 3


def read_patch(array: zarr.Array, spec: PatchSpec) -> np.ndarray:
    """Read one patch as float32; zarr fetches only the chunks the patch intersects.

    Returns
    -------
    numpy.ndarray
        ``(Z, Y, X)`` float32.
    """
    if len(spec.start) != array.ndim or any(
        s < 0 or e > n for s, e, n in zip(spec.start, spec.stop, array.shape, strict=True)
    ):
        raise ValueError(f"patch {spec} is outside array '{array.path}' of {array.shape}")
    return np.asarray(array[spec.slices], dtype=np.float32)


class ZarrVolumes:
    """Picklable, lazily opened view of the volumes of one dataset.

    Parameters
    ----------
    path
        Dataset directory.
    ids
        Volume ids this handle may read (e.g. one split); ``None`` allows all.
    """

    def __init__(self, path: str | Path, ids: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        self.ids: tuple[str, ...] | None = None if ids is None else tuple(ids)
        self._reset()

    @classmethod
    def from_split(cls, path: str | Path, split: str) -> ZarrVolumes:
        """Handle restricted to the ids that the dataset lists under ``split``."""
        splits = get_split(open_dataset(path))
        if split not in splits:
            raise InputError(f"unknown split '{split}'; use one of {', '.join(splits)}")
        if not splits[split]:
            raise InputError(f"{path}: split '{split}' lists no volumes")
        return cls(path, splits[split])

    def _reset(self) -> None:
        self._group: zarr.Group | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Open stores stay in the process that opened them.
        return {"path": self.path, "ids": self.ids}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self.ids = state["ids"]
        self._reset()

    def group(self) -> zarr.Group:
        """The dataset group, opened on first use in the calling process."""
        if self._group is None or self._pid != os.getpid():
            self._reset()
            self._group = open_dataset(self.path)
            self._pid = os.getpid()
        return self._group

    def _allowed(self, volume: str) -> bool:
        return self.ids is None or volume in self.ids

    def array(self, domain: str, volume: str) -> zarr.Array:
        """The stored array ``<domain>/<volume>``, opened once per process."""
        if domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
        if not self._allowed(volume):
            raise InputError(f"volume '{volume}' is not among this handle's ids {self.ids}")
        group = self.group()
        name = f"{domain}/{volume}"
        if name not in self._arrays:
            self._arrays[name] = open_array(group, name)
        return self._arrays[name]

    def shapes(self, domain: str) -> dict[str, tuple[int, int, int]]:
        """Shape of every allowed volume stored in ``domain``."""
        ids = [i for i in volume_ids(self.group(), domain) if self._allowed(i)]
        return {i: _shape3(self.array(domain, i)) for i in ids}

    def paired_shapes(self) -> dict[str, tuple[int, int, int]]:
        """Shapes of the allowed ids stored in both domains; their shapes must agree."""
        sharp, blurred = self.shapes(SHARP), self.shapes(BLURRED)
        common = sorted(set(sharp) & set(blurred))
        if not common:
            raise InputError(f"{self.path}: no volume id has both a sharp and a blurred array")
        for i in common:
            if sharp[i] != blurred[i]:
                raise InputError(
                    f"{self.path}: volume '{i}' is {sharp[i]} sharp but {blurred[i]} blurred"
                )
        return {i: sharp[i] for i in common}

    def chunks(self, domain: str) -> tuple[int, int, int] | None:
        """Storage chunk shape shared by all allowed volumes of ``domain``; None if they differ."""
        found = {tuple(self.array(domain, i).chunks) for i in self.shapes(domain)}
        return found.pop() if len(found) == 1 else None  # type: ignore[return-value]

    def read(self, domain: str, spec: PatchSpec) -> np.ndarray:
        """One ``(Z, Y, X)`` float32 patch of ``<domain>/<spec.volume>``."""
        return read_patch(self.array(domain, spec.volume), spec)


def _shape3(array: zarr.Array) -> tuple[int, int, int]:
    if array.ndim != 3:
        raise InputError(f"array '{array.path}' is {array.ndim}D, expected (Z, Y, X)")
    return tuple(int(n) for n in array.shape)  # type: ignore[return-value]


def _as_sample(x: np.ndarray, y: np.ndarray) -> dict[str, torch.Tensor]:
    return {"x": torch.from_numpy(x[None]), "y": torch.from_numpy(y[None])}


class _StepIndexed(Dataset, ABC):
    """Map a flat index onto ``(step, index)``: ``batch_size`` samples per training step."""

    def __init__(self, batch_size: int, steps: int, start_step: int) -> None:
        if batch_size < 1 or steps < 0 or start_step < 0:
            raise ValueError(
                f"need batch_size >= 1, steps >= 0, start_step >= 0; got "
                f"{batch_size}, {steps}, {start_step}"
            )
        self.batch_size = batch_size
        self.steps = steps
        self.start_step = start_step

    def __len__(self) -> int:
        return self.steps * self.batch_size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        step, index = divmod(i, self.batch_size)
        return self.sample_at(self.start_step + step, index)

    @abstractmethod
    def sample_at(self, step: int, index: int) -> dict[str, torch.Tensor]:
        """Sample ``index`` of this rank's batch at ``step``."""


class PairedPatches(_StepIndexed):
    """Sharp and blurred patches from the same volume and location (supervised / paired).

    Parameters
    ----------
    volumes
        Dataset handle; the ids drawn must exist in both domains.
    sampler
        Draws the patch locations (e.g. over ``volumes.paired_shapes()``).
    batch_size
        Samples per step on this rank.
    steps
        Number of steps the dataset spans.
    start_step
        First step (set when resuming).
    augment
        Apply one random rotation/flip to both patches.

    Notes
    -----
    Each item is ``{"x": (1, Z, Y, X) sharp, "y": (1, Z, Y, X) blurred}``, float32 tensors.
    """

    def __init__(
        self,
        volumes: ZarrVolumes,
        sampler: PatchSampler,
        batch_size: int,
        steps: int,
        start_step: int = 0,
        augment: bool = True,
    ) -> None:
        super().__init__(batch_size, steps, start_step)
        self.volumes = volumes
        self.sampler = sampler
        self.augment = augment

    def sample_at(self, step: int, index: int) -> dict[str, torch.Tensor]:
        """Sample ``index`` of this rank's batch at ``step``."""
        spec = self.sampler.sample(step, index, stream=_STREAM_SHARP)
        x = self.volumes.read(SHARP, spec)
        y = self.volumes.read(BLURRED, spec)
        if self.augment:
            x, y = random_rot_flip_many([x, y], self.sampler.rng(step, index, _STREAM_AUG_X))
        return _as_sample(x, y)


class UnpairedPatches(_StepIndexed):
    """Sharp and blurred patches from different volumes (unpaired cycleGAN training).

    The blurred patch is drawn excluding the sharp patch's volume id, so even a simulated,
    paired dataset is used as unpaired data. Each patch is augmented independently.

    Parameters
    ----------
    volumes
        Dataset handle.
    sharp, blurred
        Samplers over the sharp and over the blurred volumes.
    batch_size, steps, start_step, augment
        As for :class:`PairedPatches`.
    """

    def __init__(
        self,
        volumes: ZarrVolumes,
        sharp: PatchSampler,
        blurred: PatchSampler,
        batch_size: int,
        steps: int,
        start_step: int = 0,
        augment: bool = True,
    ) -> None:
        super().__init__(batch_size, steps, start_step)
        for volume in sharp.volumes:
            if not set(blurred.volumes) - {volume}:
                raise InputError(f"unpaired sampling needs a blurred volume other than '{volume}'")
        self.volumes = volumes
        self.sharp = sharp
        self.blurred = blurred
        self.augment = augment

    def sample_at(self, step: int, index: int) -> dict[str, torch.Tensor]:
        """Sample ``index`` of this rank's batch at ``step``."""
        x_spec = self.sharp.sample(step, index, stream=_STREAM_SHARP)
        y_spec = self.blurred.sample(step, index, stream=_STREAM_BLURRED, exclude=x_spec.volume)
        x = self.volumes.read(SHARP, x_spec)
        y = self.volumes.read(BLURRED, y_spec)
        if self.augment:
            (x,) = random_rot_flip_many([x], self.sharp.rng(step, index, _STREAM_AUG_X))
            (y,) = random_rot_flip_many([y], self.blurred.rng(step, index, _STREAM_AUG_Y))
        return _as_sample(x, y)
