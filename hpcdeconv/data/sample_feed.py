"""Training feed of PSF-parameter samples (store layout: :mod:`hpcdeconv.data.samples`).

:class:`PSFSampleFeed` feeds a training run like the image feed
(:class:`~hpcdeconv.training.feed.TrainingFeed`): batch ``k`` of its loader is step
``start_step + k``, and every sample is a pure function of ``(seed, rank, step, index)``.
Training indices are visited in a fresh seeded permutation per epoch of the *global*
batch order, so within an epoch no two ranks (and no two steps) draw the same sample, and
the samples of a step do not depend on the number of ranks.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from hpcdeconv.config import PSFSamplesData
from hpcdeconv.data.datasets import StepIndexed
from hpcdeconv.data.samples import PSFSamples, PSFSampleStore
from hpcdeconv.data.sampling import centre_crop_slices, sample_rng
from hpcdeconv.errors import InputError
from hpcdeconv.methods.base import DataInfo

#: Random stream of the epoch permutations (see :func:`~hpcdeconv.data.sampling.sample_rng`).
_STREAM_ORDER = 7


@lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, count: int) -> np.ndarray:
    """Seeded permutation of ``range(count)`` for one epoch (read-only)."""
    order = sample_rng(seed, epoch, 0, stream=_STREAM_ORDER).permutation(count)
    order.flags.writeable = False
    return order


class PSFSamplePatches(StepIndexed):
    """Training samples of one rank, step by step (map-style, like the image datasets).

    Sample ``index`` of this rank's batch at ``step`` is training sample
    ``order_e[q mod T]`` with ``q = (step * batch_size + index) * world_size + rank`` the
    global position, ``T`` the number of training samples, ``e = q // T`` the epoch and
    ``order_e`` the epoch's seeded permutation.

    Parameters
    ----------
    store
        Samples store handle.
    train
        Training sample indices.
    seed
        Run seed.
    rank, world_size
        Data-parallel position of this process.
    batch_size, steps, start_step
        Samples per step on this rank, number of steps, first step.
    """

    def __init__(
        self,
        store: PSFSampleStore,
        train: Sequence[int],
        seed: int,
        rank: int,
        world_size: int,
        batch_size: int,
        steps: int,
        start_step: int = 0,
    ) -> None:
        super().__init__(batch_size, steps, start_step)
        if not train:
            raise InputError(f"{store.path}: the samples store lists no training samples")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.store = store
        self.train = tuple(int(i) for i in train)
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size

    def sample_index(self, step: int, index: int) -> int:
        """Store index of sample ``index`` of this rank's batch at ``step``."""
        q = (step * self.batch_size + index) * self.world_size + self.rank
        epoch, position = divmod(q, len(self.train))
        return self.train[int(_epoch_order(self.seed, epoch, len(self.train))[position])]

    def sample_at(self, step: int, index: int) -> dict[str, torch.Tensor]:
        """``{"patch": (C, *S), "params": (P,), "valid": (P,) bool}``."""
        one = self.store.read([self.sample_index(step, index)])
        return {
            "patch": torch.from_numpy(np.ascontiguousarray(one.patches[0])),
            "params": torch.from_numpy(np.ascontiguousarray(one.params[0])),
            "valid": torch.from_numpy(np.ascontiguousarray(one.valid[0])),
        }


class PSFSampleFeed:
    """Training batches and validation samples of a PSF-samples store, for one rank.

    The same interface as the image feed (``info``, ``loader``, ``validation``,
    ``state_dict``). Geometric augmentation is never applied, whatever ``cfg.augment``
    says: a rotation or flip of a patch changes its astigmatism parameters.

    Parameters
    ----------
    cfg
        Data configuration (store path, batch size, workers, number of validation samples).
    seed
        Run seed (shared by all ranks).
    rank, world_size
        Data-parallel position of this process.

    Raises
    ------
    InputError
        The store is missing, malformed or lists no training samples.
    """

    def __init__(self, cfg: PSFSamplesData, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.cfg = cfg
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.store = PSFSampleStore(cfg.path)
        self.train_ids = self.store.split("train")
        if not self.train_ids:
            raise InputError(f"{cfg.path}: the samples store lists no training samples")
        self.val_ids = self.store.split("val")[: cfg.val_samples]

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the ``P`` regressed parameters."""
        return self.store.names

    def info(self) -> DataInfo:
        """Spatial dims, channels, shape and voxel size of the patches and the PSF model
        that made them (no PSF, no means)."""
        channels, *spatial = self.store.patch_shape()
        return DataInfo(
            spatial_dims=len(spatial),
            channels=channels,
            voxel_size=tuple(self.store.root["voxel_size"]),
            psf_model=self.store.root.get("psf_model"),
            patch_shape=tuple(spatial),
        )

    def dataset(self, start_step: int, steps: int) -> PSFSamplePatches:
        """The map-style dataset whose batch ``k`` is step ``start_step + k``."""
        return PSFSamplePatches(
            self.store,
            self.train_ids,
            self.seed,
            self.rank,
            self.world_size,
            self.cfg.batch_size,
            steps,
            start_step,
        )

    def loader(
        self, start_step: int, pin_memory: bool = False, steps: int = 1 << 30
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches ``{"patch": (B, C, *S), "params": (B, P), "valid": (B, P) bool}``.

        Batch ``k`` is training step ``start_step + k``.

        Raises
        ------
        InputError
            A patch or parameter holds NaN or Inf values.
        """
        loader = self.dataset(start_step, steps).loader(self.cfg.num_workers, pin_memory)
        for step, batch in enumerate(loader, start=start_step):
            for name in ("patch", "params"):
                finite = torch.isfinite(batch[name])
                if name == "params":
                    finite = finite | ~batch["valid"]  # undefined entries may hold anything
                if not finite.all():
                    raise InputError(
                        f"{self.cfg.path}: NaN or Inf in a {name} sample at step {step + 1}"
                    )
            yield batch

    def validation(self, crop: Sequence[int] | None = None) -> PSFSamples | None:
        """The first ``cfg.val_samples`` validation samples, read once; None without any.

        ``crop`` cuts every patch to its centred crop of that many voxels per spatial axis
        (clamped to the patch).
        """
        if not self.val_ids:
            return None
        samples = self.store.read(self.val_ids)
        if crop is None:
            return samples
        cut = centre_crop_slices(samples.patches.shape[2:], crop)
        patches = np.ascontiguousarray(samples.patches[(slice(None), slice(None), *cut)])
        return PSFSamples(patches, samples.params, samples.valid, samples.names, samples.units)

    def state_dict(self) -> dict[str, Any]:
        """What identifies the batches: seed, training samples, parameters, batch size."""
        return {
            "seed": self.seed,
            "train_ids": list(self.train_ids),
            "parameters": list(self.names),
            "batch_size": self.cfg.batch_size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Refuse to resume onto different samples or sampling (one InputError line)."""
        mine = self.state_dict()
        for key, value in mine.items():
            if state.get(key) != value:
                shown = value if key != "train_ids" else f"{len(value)} samples"
                was = state.get(key) if key != "train_ids" else "other samples"
                raise InputError(f"cannot resume: data {key} was {was!r}, now {shown!r}")
