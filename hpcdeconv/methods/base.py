"""What every training method provides to the engine.

A method declares the kind of data it trains on (:data:`DataKind`), owns its networks
grouped by optimiser (e.g. ``G`` and ``D``), its frozen loss networks (never optimised,
never checkpointed), a :meth:`Method.step` that reads like the paper's algorithm, its
validation (:meth:`Method.validate`) and the network inference rebuilds from a checkpoint
(:meth:`Method.artefact`). The engine hands it one
:class:`~hpcdeconv.training.strategy.Trainable` per group; the method never sees whether
that is a plain module, DDP or DeepSpeed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from hpcdeconv.data.intensity import IntensityMap
from hpcdeconv.training.strategy import Trainable

#: What a method trains on: two unpaired image domains (``x`` sharp, ``y`` blurred),
#: paired images of the same place, or (patch, PSF parameter vector, validity) samples.
DataKind = Literal["domains", "paired", "psf_samples"]


@dataclass(frozen=True)
class DataInfo:
    """What a method needs to know of its training data to build its networks.

    Attributes
    ----------
    spatial_dims
        2 (images ``(Y, X)``) or 3 (volumes ``(Z, Y, X)``).
    channels
        Channels per image (1 for fluorescence stacks, 3 for RGB).
    voxel_size
        Voxel (pixel) size per spatial axis in µm.
    psf
        The dataset's PSF, ``spatial_dims`` axes, if it stores one.
    means
        Mean intensity by batch key (``"x"``: sharp domain, ``"y"``: blurred domain), the
        same on every rank; where a generator's output starts (``head_init: data``).
    psf_model
        For PSF-parameter samples: the record of the PSF model that made them
        (:meth:`hpcdeconv.psfnet.psf_models.PSFModel.record`), if the store names one.
    patch_shape
        For PSF-parameter samples: the spatial shape ``(*S)`` of one stored patch, in
        pixels (the window a regressor is trained on).
    intensity
        The mapping from raw values to the stored ones, when the dataset records one
        (:mod:`hpcdeconv.data.intensity`); inference applies it to raw inputs.
    paired
        Whether a batch's ``x`` and ``y`` show the same place (``data.kind: paired``).
    """

    spatial_dims: int
    channels: int
    voxel_size: tuple[float, ...]
    psf: np.ndarray | None = None
    means: Mapping[str, float] = field(default_factory=dict)
    psf_model: Mapping[str, Any] | None = None
    patch_shape: tuple[int, ...] | None = None
    intensity: IntensityMap | None = None
    paired: bool = False


@dataclass(frozen=True)
class Artefact:
    """The trained network inference rebuilds, and how to rebuild it.

    Attributes
    ----------
    kind
        ``"image_to_image"`` (used by ``predict`` and ``deconvolve``) or another kind a
        method defines (e.g. a PSF-parameter regressor).
    key
        Checkpoint key of its weights (``"deblur"`` for image-to-image methods; the
        EMA's weights, when kept, are under ``key + "_ema"``).
    network
        The network itself (unwrapped, as trained).
    record
        JSON-able description stored in the checkpoint under ``"artefact"``: enough to
        rebuild ``network`` without the method (network config with its ``kind``,
        ``spatial_dims``, ``in_channels``, ``out_channels``).
    """

    kind: str
    key: str
    network: nn.Module
    record: dict[str, Any]


@dataclass(frozen=True)
class ValidationSettings:
    """How validation runs the network: tiled like inference.

    Attributes
    ----------
    tile
        Tile size per spatial axis in voxels.
    overlap
        Overlap of neighbouring tiles in voxels.
    autocast_dtype
        Autocast dtype of the run's precision, ``None`` for fp32.
    """

    tile: tuple[int, ...]
    overlap: int
    autocast_dtype: torch.dtype | None = None


class Method(ABC):
    """Base class of the training methods.

    Subclasses build their group modules in ``__init__`` and expose them through
    :meth:`groups`; after :meth:`bind` the trainables are available as ``self.t[name]``.
    """

    #: The data this method trains on; the engine builds the matching feed.
    data_kind: ClassVar[DataKind] = "domains"
    #: Further kinds it can train on (e.g. paired planes for a cycleGAN).
    also_data_kinds: ClassVar[tuple[DataKind, ...]] = ()
    #: Metric names :meth:`validate` returns that a run may select its best checkpoint
    #: by, each with whether higher is better.
    metrics: ClassVar[Mapping[str, bool]] = {"psnr": True, "ssim": True}

    def __init__(self) -> None:
        self.t: dict[str, Trainable] = {}

    @abstractmethod
    def groups(self) -> dict[str, nn.Module]:
        """The optimised groups, each one ``nn.Module`` with its own optimiser."""

    def loss_networks(self) -> dict[str, nn.Module]:
        """Frozen networks used by the losses (e.g. VGG-19 features).

        Placed on the strategy's device by the engine, never optimised, broadcast or
        checkpointed; their weights come from files named in the method config.
        """
        return {}

    def learning_rates(self) -> Mapping[str, float]:
        """Per-group learning rate overrides (default: the configured one for all)."""
        return {}

    def bind(self, trainables: Mapping[str, Trainable]) -> None:
        """Receive the strategy's wrapped groups."""
        self.t = dict(trainables)

    @abstractmethod
    def step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One optimisation step on ``batch``; its keys follow :attr:`data_kind`.

        ``domains``/``paired``: ``x`` sharp and ``y`` blurred, each ``(B, C, *S)`` with
        ``S`` the ``spatial_dims`` spatial axes. ``psf_samples``: ``patch`` ``(B, C, *S)``,
        ``params`` ``(B, P)`` and ``valid`` ``(B, P)`` (bool).

        Returns the detached scalar losses of the step by name.
        """

    @abstractmethod
    def artefact(self) -> Artefact:
        """The network inference uses (its EMA, when kept, is of this network)."""

    @abstractmethod
    def validate(
        self,
        network: nn.Module,
        data: Any,
        device: torch.device,
        settings: ValidationSettings,
    ) -> dict[str, float]:
        """Validation scores of ``network`` (the artefact's network or its EMA).

        ``data`` is the feed's validation data and ``settings`` the run's validation
        settings (tile, overlap, autocast dtype); the returned names include
        :attr:`metrics`. Runs on one rank, under ``torch.no_grad``.
        """

    def images(self) -> dict[str, torch.Tensor]:
        """Images of the last step for image summaries, each ``(*S)``."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Method-owned state that is not in a group (history pools, generators)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore :meth:`state_dict`."""

    def export(self, run_dir: Path, true_psf: torch.Tensor | None) -> dict[str, Path]:
        """Write method artefacts (e.g. the learned PSF) at the end of training."""
        return {}
