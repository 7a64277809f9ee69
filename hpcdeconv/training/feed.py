"""The training feed: lazily read, rank-sharded patches from a zarr dataset.

Every rank (and every DataLoader worker) opens the store itself and reads only the
chunks its patches touch; no rank loads whole training volumes. Batch ``k`` of the loader
is training step ``start_step + k``, and each sample is a pure function of
``(seed, rank, step, index)``, so a resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hpcdeconv.config import DataConfig
from hpcdeconv.data.datasets import PairedPatches, UnpairedPatches, ZarrVolumes
from hpcdeconv.data.sampling import PatchSampler
from hpcdeconv.data.zarr_io import (
    BLURRED,
    PSF_KEY,
    SHARP,
    get_split,
    open_array,
    open_dataset,
    volume_ids,
    volume_meta,
)
from hpcdeconv.errors import InputError


class TrainingFeed:
    """Training patches and validation volumes of one dataset, for one rank.

    Parameters
    ----------
    cfg
        Data configuration (dataset path, patch shape, batch size, workers).
    seed
        Run seed (shared by all ranks; the rank decorrelates the draws).
    rank, world_size
        Data-parallel position of this process.
    """

    def __init__(self, cfg: DataConfig, seed: int, rank: int = 0, world_size: int = 1) -> None:
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
        self.psf: np.ndarray | None = None
        if PSF_KEY in group:
            self.psf = np.asarray(open_array(group, PSF_KEY)[...], dtype=np.float32)
        first = blurred & set(self.train_ids) or sharp & set(self.train_ids)
        if not first:
            raise InputError(f"{cfg.path}: no training volume is stored in sharp/ or blurred/")
        self.voxel_size = volume_meta(open_array(group, _any_array(group, first))).voxel_size

    def require(self, paired: bool) -> None:
        """Check the dataset holds the domains a method needs and the patch fits."""
        shapes = self.volumes.paired_shapes() if paired else None
        if not paired:
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

    def dataset(self, start_step: int, steps: int, paired: bool) -> Dataset:
        """The map-style dataset whose batch ``k`` is step ``start_step + k``."""
        common = {
            "batch_size": self.cfg.batch_size,
            "steps": steps,
            "start_step": start_step,
            "augment": self.cfg.augment,
        }
        sampler = _sampler_factory(self.cfg, self.seed, self.rank, self.world_size)
        if paired:
            return PairedPatches(self.volumes, sampler(self.volumes.paired_shapes()), **common)
        return UnpairedPatches(
            self.volumes,
            sampler(self.volumes.shapes(SHARP)),
            sampler(self.volumes.shapes(BLURRED)),
            **common,
        )

    def loader(
        self, start_step: int, paired: bool, pin_memory: bool = False, steps: int = 1 << 30
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches ``{"x": (B,1,Z,Y,X) sharp, "y": (B,1,Z,Y,X) blurred}`` from ``start_step``."""
        loader = DataLoader(
            self.dataset(start_step, steps, paired),
            batch_size=self.cfg.batch_size,
            shuffle=False,
            num_workers=self.cfg.num_workers,
            pin_memory=pin_memory,
            persistent_workers=self.cfg.num_workers > 0,
            prefetch_factor=4 if self.cfg.num_workers > 0 else None,
        )
        for step, batch in enumerate(loader, start=start_step):
            for name, tensor in batch.items():
                if not torch.isfinite(tensor).all():
                    raise InputError(
                        f"{self.cfg.path}: NaN or Inf voxels in a {name} patch at step {step + 1}"
                    )
            yield batch

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


def _any_array(group: Any, ids: set[str]) -> str:
    vid = sorted(ids)[0]
    return f"{BLURRED}/{vid}" if f"{BLURRED}/{vid}" in group else f"{SHARP}/{vid}"


def _sampler_factory(cfg: DataConfig, seed: int, rank: int, world_size: int) -> Any:
    def make(shapes: Mapping[str, tuple[int, int, int]]) -> PatchSampler:
        return PatchSampler(shapes, cfg.patch, seed, rank=rank, world_size=world_size)

    return make
