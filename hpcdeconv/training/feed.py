"""The training feed: lazily read, rank-sharded patches from a zarr dataset.

:func:`make_feed` chooses the feed of the data's ``kind``; every feed has the same
interface (``info``, ``loader``, ``validation``, ``state_dict``/``load_state_dict``), so
the engine knows none of them. Every rank (and every DataLoader worker) opens the store
itself and reads only the chunks its patches touch; no rank loads whole training volumes.
Batch ``k`` of the loader is training step ``start_step + k``, and each sample is a pure
function of ``(seed, rank, step, index)``, so a resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import zarr

from hpcdeconv.config import DataConfig, ImageDomainsData, PSFSamplesData
from hpcdeconv.data.datasets import PairedPatches, StepIndexed, UnpairedPatches, ZarrVolumes
from hpcdeconv.data.layout import volume_meta
from hpcdeconv.data.sampling import PatchSampler
from hpcdeconv.data.zarr_io import (
    BLURRED,
    PSF_KEY,
    SHARP,
    VolumeMeta,
    get_intensity,
    get_split,
    open_array,
    open_dataset,
    volume_ids,
)
from hpcdeconv.errors import InputError
from hpcdeconv.methods.base import DataInfo

if TYPE_CHECKING:
    from hpcdeconv.training.validate import ValidationSet

#: Voxels read per domain for :meth:`TrainingFeed.data_means` (64 MiB of float32, read one
#: storage chunk at a time): the exact mean for datasets up to this size, beyond it the
#: mean of a fixed random sample of whole chunks.
MEAN_SAMPLE_VOXELS = 1 << 24
#: Seed of that sample: a property of the dataset alone, the same on every rank and run.
_MEAN_SAMPLE_SEED = 0


class Feed(Protocol):
    """What the engine asks of the training data of one rank, whatever its kind."""

    def info(self) -> DataInfo:
        """What the method needs to know of the data to build its networks."""
        ...

    def loader(
        self, start_step: int, pin_memory: bool = False
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of the data's kind; batch ``k`` is training step ``start_step + k``."""
        ...

    def validation(self, crop: tuple[int, ...] | None = None) -> Any:
        """The fixed validation data of the run (read once), or ``None`` if it has none."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run must find unchanged."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Refuse to resume onto other data."""
        ...


def make_feed(cfg: DataConfig, seed: int, rank: int = 0, world_size: int = 1) -> Feed:
    """The feed of ``cfg.kind`` for one rank.

    ``domains``: unpaired sharp and blurred patches; ``paired``: patches at the same place
    of both; ``psf_samples``: (patch, PSF parameters, validity) samples.

    Raises
    ------
    InputError
        The dataset does not hold what its kind needs.
    """
    match cfg:
        case ImageDomainsData():
            return TrainingFeed(cfg, seed, rank, world_size)
        case PSFSamplesData():
            from hpcdeconv.data.sample_feed import PSFSampleFeed

            return PSFSampleFeed(cfg, seed, rank, world_size)
    raise TypeError(f"unknown data configuration {type(cfg).__name__}")


class TrainingFeed:
    """Training patches and validation volumes of one image dataset, for one rank.

    ``cfg.kind`` decides the batches: ``domains`` draws the sharp and the blurred patch of
    a sample independently, ``paired`` at the same place of one volume pair.

    Parameters
    ----------
    cfg
        Data configuration (kind, dataset path, patch shape, batch size, workers).
    seed
        Run seed (shared by all ranks; the rank decorrelates the draws).
    rank, world_size
        Data-parallel position of this process.
    """

    def __init__(
        self, cfg: ImageDomainsData, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.cfg = cfg
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        group = open_dataset(cfg.path)
        split = get_split(group)
        self.train_ids = list(split.get("train", []))
        if not self.train_ids:
            raise InputError(f"{cfg.path}: the dataset lists no training volumes")
        self.volumes = ZarrVolumes(cfg.path, self.train_ids)
        sharp, blurred = set(volume_ids(group, SHARP)), set(volume_ids(group, BLURRED))
        self.val_ids = [v for v in split.get("val", []) if v in sharp and v in blurred]
        self.val_ids = self.val_ids[: cfg.val_volumes]
        self.intensity = get_intensity(group)
        self.psf: np.ndarray | None = None
        if PSF_KEY in group:
            self.psf = np.asarray(open_array(group, PSF_KEY)[...], dtype=np.float32)
        first = blurred & set(self.train_ids) or sharp & set(self.train_ids)
        if not first:
            raise InputError(f"{cfg.path}: no training volume is stored in sharp/ or blurred/")
        stored = open_array(group, _any_array(group, first))
        self.channels, self.voxel_size = _layout(
            volume_meta(stored), stored.shape, len(cfg.patch), cfg.path
        )
        self._data_means: dict[str, float] | None = None
        self._check_volumes()

    @property
    def paired(self) -> bool:
        """Whether a sample's two patches come from the same place of one volume pair."""
        return self.cfg.kind == "paired"

    def data_means(self) -> dict[str, float]:
        """Mean intensity of the training volumes of each stored domain, by batch key.

        Where a generator's output should start (``"x"``: sharp domain, ``"y"``: blurred
        domain; a domain without training volumes is left out). Computed once, chunk by
        chunk, from at most :data:`MEAN_SAMPLE_VOXELS` voxels per domain: exact when the
        domain's training volumes hold no more, otherwise the mean over a seeded random
        sample of whole storage chunks (cheap whole-chunk reads; a random rather than a
        regular choice cannot alias with periodic structure such as stitched tiles).
        Depends on the data alone, so every rank gets the same values.

        Returns
        -------
        dict[str, float]
            ``{"x": mean of sharp/, "y": mean of blurred/}`` in the data's units.

        Raises
        ------
        InputError
            If a read chunk holds NaN or Inf voxels.
        """
        if self._data_means is None:
            self._data_means = {}
            for key, domain in (("x", SHARP), ("y", BLURRED)):
                ids = sorted(self.volumes.shapes(domain))
                if ids:
                    arrays = {f"{domain}/{vid}": self.volumes.array(domain, vid) for vid in ids}
                    self._data_means[key] = sampled_mean(arrays, MEAN_SAMPLE_VOXELS)
        return dict(self._data_means)

    def info(self) -> DataInfo:
        """What the methods need to know of this data (dims, channels, voxel size, PSF, means)."""
        return DataInfo(
            spatial_dims=len(self.cfg.patch),
            channels=self.channels,
            voxel_size=tuple(float(v) for v in self.voxel_size),
            psf=self.psf,
            means=self.data_means(),
            intensity=self.intensity,
            paired=self.paired,
        )

    def _check_volumes(self) -> None:
        """Check the dataset holds the domains its kind needs and the patch fits."""
        shapes = self.volumes.paired_shapes() if self.paired else None
        if not self.paired:
            sharp, blurred = self.volumes.shapes(SHARP), self.volumes.shapes(BLURRED)
            for domain, found in ((SHARP, sharp), (BLURRED, blurred)):
                if not found:
                    raise InputError(
                        f"{self.cfg.path}: no training volume in {domain}/; "
                        "unpaired training needs both domains"
                    )
            shapes = {**sharp, **blurred}
        assert shapes is not None
        for vid, shape in shapes.items():
            if any(p > n for p, n in zip(self.cfg.patch, shape, strict=True)):
                raise InputError(
                    f"data.patch {self.cfg.patch} is larger than volume '{vid}' {shape}"
                )

    def dataset(self, start_step: int, steps: int) -> StepIndexed:
        """The map-style dataset whose batch ``k`` is step ``start_step + k``."""
        common = {
            "batch_size": self.cfg.batch_size,
            "steps": steps,
            "start_step": start_step,
            "augment": self.cfg.augment,
        }
        sampler = _sampler_factory(self.cfg, self.seed, self.rank, self.world_size)
        if self.paired:
            return PairedPatches(self.volumes, sampler(self.volumes.paired_shapes()), **common)
        return UnpairedPatches(
            self.volumes,
            sampler(self.volumes.shapes(SHARP)),
            sampler(self.volumes.shapes(BLURRED)),
            **common,
        )

    def loader(
        self, start_step: int, pin_memory: bool = False, steps: int = 1 << 30
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches ``{"x": (B, C, *S) sharp, "y": (B, C, *S) blurred}`` from ``start_step``.

        ``steps`` bounds the number of batches (benchmarks); training reads on.

        Raises
        ------
        InputError
            A patch holds NaN or Inf voxels (named with its step).
        """
        loader = self.dataset(start_step, steps).loader(self.cfg.num_workers, pin_memory)
        for step, batch in enumerate(loader, start=start_step):
            for name, tensor in batch.items():
                if not torch.isfinite(tensor).all():
                    raise InputError(
                        f"{self.cfg.path}: NaN or Inf voxels in a {name} patch at step {step + 1}"
                    )
            yield batch

    def validation(self, crop: tuple[int, ...] | None = None) -> ValidationSet | None:
        """The validation volumes cut once to the centred ``crop``, ``None`` without any."""
        if not self.val_ids:
            return None
        # Imported here: validation reads through this feed (it imports this module).
        from hpcdeconv.training.validate import ValidationSet

        return ValidationSet.from_feed(self, crop)

    def read_pair(self, vid: str) -> tuple[np.ndarray, np.ndarray]:
        """Whole validation volume: (blurred, sharp), each (Z, Y, X) float32."""
        group = open_dataset(self.cfg.path)
        blurred = np.asarray(open_array(group, f"{BLURRED}/{vid}")[...], dtype=np.float32)
        sharp = np.asarray(open_array(group, f"{SHARP}/{vid}")[...], dtype=np.float32)
        return blurred, sharp

    def state_dict(self) -> dict[str, Any]:
        """Sampler identity; batches are a pure function of the step."""
        return {"seed": self.seed, "patch": list(self.cfg.patch), "train_ids": self.train_ids}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Refuse to resume onto a different dataset or sampling."""
        mine = self.state_dict()
        for key, value in mine.items():
            if state.get(key) != value:
                raise InputError(f"cannot resume: data {key} was {state.get(key)!r}, now {value!r}")


def sampled_mean(
    volumes: Mapping[str, zarr.Array], budget: int, seed: int = _MEAN_SAMPLE_SEED
) -> float:
    """Mean voxel value of ``arrays`` from at most ``budget`` voxels, one chunk in memory.

    Every storage chunk of every array is a candidate; when all of them hold no more than
    ``budget`` voxels they are all read (the exact mean), otherwise ``budget //
    (largest chunk)`` distinct chunks (at least one) drawn with ``seed``. The estimate is
    the sum of the read voxels over their count.

    Parameters
    ----------
    volumes
        Volumes by name (for error messages), each (Z, Y, X).
    budget
        Most voxels to read.
    seed
        Seed of the chunk sample.

    Returns
    -------
    float
        The (estimated) mean.

    Raises
    ------
    InputError
        If a read chunk holds NaN or Inf voxels.
    """
    names, arrays = list(volumes), list(volumes.values())
    grids = [
        tuple(math.ceil(n / c) for n, c in zip(a.shape, a.chunks, strict=True)) for a in arrays
    ]
    counts = np.array([math.prod(g) for g in grids], dtype=np.int64)
    total = int(counts.sum())
    voxels = sum(int(a.size) for a in arrays)
    if voxels <= budget:
        picks = np.arange(total)
    else:
        largest = max(math.prod(a.chunks) for a in arrays)
        k = min(total, max(1, budget // largest))
        picks = np.sort(np.random.default_rng(seed).choice(total, size=k, replace=False))
    ends = np.cumsum(counts)
    acc, count = 0.0, 0
    for flat in picks:
        which = int(np.searchsorted(ends, flat, side="right"))
        array = arrays[which]
        local = int(flat - (ends[which] - counts[which]))
        index = np.unravel_index(local, grids[which])
        region = tuple(
            slice(i * c, min((i + 1) * c, size))
            for i, c, size in zip(index, array.chunks, array.shape, strict=True)
        )
        part = float(np.sum(np.asarray(array[region]), dtype=np.float64))
        if not math.isfinite(part):
            raise InputError(f"NaN or Inf voxels in training volume '{names[which]}'")
        acc += part
        count += math.prod(s.stop - s.start for s in region)
    if not count:
        raise InputError("the training volumes hold no voxels")
    return float(acc / count)


def _layout(
    meta: VolumeMeta, shape: tuple[int, ...], spatial_dims: int, path: Any
) -> tuple[int, tuple[float | None, ...]]:
    """Channels and spatial voxel size (µm) of a stored image with ``meta``'s axes.

    An image with channels has a ``"c"`` axis (OME-NGFF); without one it has one channel.

    Raises
    ------
    InputError
        The image's spatial axes are not as many as ``data.patch``'s.
    """
    spatial = [i for i, name in enumerate(meta.axes) if name != "c"]
    if len(spatial) != spatial_dims:
        axes = ", ".join(meta.axes)
        raise InputError(
            f"{path}: data.patch has {spatial_dims} axes but the stored images have "
            f"{len(spatial)} spatial axes ({axes}); give (Y, X) for images and (Z, Y, X) "
            "for volumes"
        )
    channels = int(shape[meta.axes.index("c")]) if "c" in meta.axes else 1
    return channels, tuple(meta.voxel_size[i] for i in spatial)


def _any_array(group: Any, ids: set[str]) -> str:
    vid = sorted(ids)[0]
    return f"{BLURRED}/{vid}" if f"{BLURRED}/{vid}" in group else f"{SHARP}/{vid}"


def _sampler_factory(cfg: ImageDomainsData, seed: int, rank: int, world_size: int) -> Any:
    def make(shapes: Mapping[str, tuple[int, ...]]) -> PatchSampler:
        return PatchSampler(shapes, cfg.patch, seed, rank=rank, world_size=world_size)

    return make
