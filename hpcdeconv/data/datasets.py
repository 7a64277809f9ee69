"""Patch datasets read lazily from a zarr dataset, safe for multi-process data loading.

:class:`ZarrVolumes` is a picklable handle (a path and a list of ids); each process opens
the zarr group itself on first use, so DataLoader workers (fork or spawn) and dask workers
never share open stores. The datasets are map-style over a flat index
``i = (step - start_step) * batch_size + index``; with ``DataLoader(batch_size=batch_size,
shuffle=False)`` batch ``k`` is training step ``start_step + k`` on this rank, and every
sample is a pure function of ``(seed, rank, step, index)`` whatever the number of workers.

Stored images are ``(*S)`` or ``(C, *S)`` (``S`` = ``(Z, Y, X)`` or ``(Y, X)``, channels
first, as their NGFF axes say, see :func:`~hpcdeconv.data.zarr_io.array_layout`); samples
are always ``(C, *S)``.
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
from torch.utils.data import DataLoader, Dataset

from hpcdeconv.data.augment import random_rot_flip, random_rot_flip_many
from hpcdeconv.data.layout import array_layout
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

    ``array`` is ``(*S)`` or ``(C, *S)``; ``spec`` places the patch in ``S`` and every
    channel is read.

    Returns
    -------
    numpy.ndarray
        ``spec.size`` (``(Z, Y, X)`` or ``(Y, X)``), or ``(C, *spec.size)`` for an array with
        channels; float32.
    """
    lead = array.ndim - len(spec.start)
    spatial = array.shape[lead:]
    if lead not in (0, 1) or any(
        s < 0 or e > n for s, e, n in zip(spec.start, spec.stop, spatial, strict=True)
    ):
        raise ValueError(f"patch {spec} is outside array '{array.path}' of {array.shape}")
    return np.asarray(array[(slice(None),) * lead + spec.slices], dtype=np.float32)


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
        self._layouts: dict[str, tuple[int, int]] = {}
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

    def array_layout(self, domain: str, volume: str) -> tuple[int, int]:
        """``(spatial_dims, channels)`` of ``<domain>/<volume>`` from its NGFF axes."""
        name = f"{domain}/{volume}"
        if name not in self._layouts:
            self._layouts[name] = array_layout(self.array(domain, volume))
        return self._layouts[name]

    def shapes(self, domain: str) -> dict[str, tuple[int, ...]]:
        """Spatial shape (``(Z, Y, X)`` or ``(Y, X)``) of every allowed volume in ``domain``."""
        ids = [i for i in volume_ids(self.group(), domain) if self._allowed(i)]
        shapes = {}
        for i in ids:
            spatial_dims, _ = self.array_layout(domain, i)
            shapes[i] = tuple(int(n) for n in self.array(domain, i).shape[-spatial_dims:])
        return shapes

    def layout(self, domain: str) -> tuple[int, int] | None:
        """``(spatial_dims, channels)`` shared by the allowed volumes of ``domain``.

        None when the domain stores no allowed volume.

        Raises
        ------
        InputError
            The volumes differ in spatial dimensions or in channels.
        """
        found = {i: self.array_layout(domain, i) for i in self.shapes(domain)}
        kinds = set(found.values())
        if len(kinds) > 1:
            described = ", ".join(f"{i}: {d}D x {c} channels" for i, (d, c) in found.items())
            raise InputError(f"{self.path}: {domain}/ volumes differ in layout ({described})")
        return kinds.pop() if kinds else None

    def paired_shapes(self) -> dict[str, tuple[int, ...]]:
        """Spatial shapes of the allowed ids stored in both domains; their shapes must agree."""
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

    def chunks(self, domain: str) -> tuple[int, ...] | None:
        """Spatial storage chunk shape shared by the allowed volumes of ``domain``; None if
        they differ."""
        found = set()
        for i in self.shapes(domain):
            spatial_dims, _ = self.array_layout(domain, i)
            found.add(tuple(self.array(domain, i).chunks[-spatial_dims:]))
        return found.pop() if len(found) == 1 else None

    def read(self, domain: str, spec: PatchSpec) -> np.ndarray:
        """One float32 patch of ``<domain>/<spec.volume>`` in its stored layout.

        ``(*S)`` for an array without channel axis, ``(C, *S)`` with one.
        """
        return read_patch(self.array(domain, spec.volume), spec)

    def read_sample(self, domain: str, spec: PatchSpec) -> np.ndarray:
        """One float32 patch of ``<domain>/<spec.volume>`` as ``(C, *S)``."""
        patch = self.read(domain, spec)
        return patch if patch.ndim > len(spec.size) else patch[None]


def _as_sample(x: np.ndarray, y: np.ndarray) -> dict[str, torch.Tensor]:
    return {"x": torch.from_numpy(x), "y": torch.from_numpy(y)}


class StepIndexed(Dataset, ABC):
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

    def loader(self, num_workers: int, pin_memory: bool = False) -> DataLoader:
        """The batches in step order: batch ``k`` is step ``start_step + k``.

        Parameters
        ----------
        num_workers
            Reader processes; with any, they persist across epochs and prefetch 4 batches each.
        pin_memory
            Copy batches into page-locked memory (for asynchronous host-to-GPU copies).
        """
        return DataLoader(
            self,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None,
        )


class PairedPatches(StepIndexed):
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
    Each item is ``{"x": (C, *S) sharp, "y": (C, *S) blurred}``, float32 tensors, ``S`` the
    patch shape.
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
        x = self.volumes.read_sample(SHARP, spec)
        y = self.volumes.read_sample(BLURRED, spec)
        if self.augment:
            rng = self.sampler.rng(step, index, _STREAM_AUG_X)
            x, y = random_rot_flip_many([x, y], rng, spatial_dims=len(spec.size))
        return _as_sample(x, y)


class UnpairedPatches(StepIndexed):
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
        x = self.volumes.read_sample(SHARP, x_spec)
        y = self.volumes.read_sample(BLURRED, y_spec)
        if self.augment:
            dims = len(x_spec.size)
            x = random_rot_flip(x, self.sharp.rng(step, index, _STREAM_AUG_X), dims)
            y = random_rot_flip(y, self.blurred.rng(step, index, _STREAM_AUG_Y), dims)
        return _as_sample(x, y)
