"""Validation: tiled prediction of held-out volumes (or fixed crops of them) against truth.

Every evaluation of a run must score the same voxels, or a change of the score says
nothing about the model: with ``train.val_crop`` each validation volume is cut once to a
fixed centred crop (clamped to the volume), and the data range of each PSNR/SSIM is that
of the whole ground-truth volume, also fixed for the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hpcdeconv.inference.predict import predict_volume
from hpcdeconv.metrics import psnr, ssim
from hpcdeconv.training.feed import TrainingFeed


def centre_crop_slices(
    shape: Sequence[int], crop: Sequence[int] | None
) -> tuple[slice, slice, slice]:
    """Slices of the centred ``crop`` (Z, Y, X) of an array of ``shape``, clamped to it.

    ``crop=None`` selects the whole array. An odd margin leaves the extra voxel after
    the crop (start ``(n - c) // 2``).
    """
    if crop is None:
        return (slice(None),) * 3  # type: ignore[return-value]
    if len(shape) != 3 or len(crop) != 3:
        raise ValueError(f"crop {list(crop)} and shape {list(shape)} must both be (Z, Y, X)")
    sizes = [min(int(c), int(n)) for c, n in zip(crop, shape, strict=True)]
    starts = [(int(n) - c) // 2 for c, n in zip(sizes, shape, strict=True)]
    z, y, x = (slice(s, s + c) for s, c in zip(starts, sizes, strict=True))
    return z, y, x


@dataclass(frozen=True)
class ValidationVolume:
    """One held-out pair, cropped: ``blurred`` and ``sharp`` are (Z, Y, X) float32.

    ``data_range`` is max - min of the whole ground-truth volume (1 if it is constant).
    """

    vid: str
    blurred: np.ndarray
    sharp: np.ndarray
    data_range: float


@dataclass(frozen=True)
class ValidationSet:
    """The validation volumes of a run, read and cropped once.

    Build it once per run (:meth:`from_feed`) and pass it to :func:`validate` at every
    evaluation: the volumes are then neither re-read nor re-cut.
    """

    volumes: tuple[ValidationVolume, ...]
    crop: tuple[int, int, int] | None = None

    @classmethod
    def from_feed(cls, feed: TrainingFeed, crop: Sequence[int] | None = None) -> ValidationSet:
        """Read ``feed.val_ids`` and cut each to the centred ``crop`` (Z, Y, X) voxels."""
        volumes = []
        for vid in feed.val_ids:
            blurred, sharp = feed.read_pair(vid)
            rng = float(sharp.max() - sharp.min()) or 1.0
            cut = centre_crop_slices(sharp.shape, crop)
            volumes.append(
                ValidationVolume(
                    vid,
                    np.ascontiguousarray(blurred[cut]),
                    np.ascontiguousarray(sharp[cut]),
                    rng,
                )
            )
        fixed = None if crop is None else (int(crop[0]), int(crop[1]), int(crop[2]))
        return cls(tuple(volumes), fixed)


def validate(
    net: nn.Module,
    feed: TrainingFeed | ValidationSet,
    tile: tuple[int, int, int],
    overlap: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    crop: Sequence[int] | None = None,
) -> dict[str, float]:
    """Mean PSNR/SSIM over the validation volumes of the input and of G_Θ's output.

    Parameters
    ----------
    net
        G_Θ (or its EMA), mapping (B, 1, Z, Y, X) to the same shape.
    feed
        The training feed (its volumes are read and cropped now) or a
        :class:`ValidationSet` built once for the run (``crop`` is then its own).
    tile, overlap, device, autocast_dtype
        Tiled prediction settings (see :func:`~hpcdeconv.inference.predict.predict_volume`).
    crop
        Centred (Z, Y, X) crop of each volume for a :class:`TrainingFeed`; ``None``: whole.

    Returns
    -------
    dict
        ``psnr`` (dB), ``ssim``, ``psnr_input``, ``ssim_input``; empty without volumes.

    Raises
    ------
    ValueError
        ``crop`` given with a :class:`ValidationSet` cut to another crop.
    """
    if isinstance(feed, ValidationSet):
        if crop is not None and tuple(int(c) for c in crop) != feed.crop:
            raise ValueError(f"the validation set is cut to {feed.crop}, not {list(crop)}")
        data = feed
    else:
        data = ValidationSet.from_feed(feed, crop)
    was_training = net.training
    net.eval()
    scores: dict[str, list[float]] = {"psnr": [], "ssim": [], "psnr_input": [], "ssim_input": []}
    try:
        for vol in data.volumes:
            pred = predict_volume(
                net,
                vol.blurred,
                tile=tile,
                overlap=overlap,
                blend="linear",
                device=device,
                autocast_dtype=autocast_dtype,
                size_multiple=getattr(net, "size_multiple", 1),
            )
            scores["psnr"].append(psnr(pred, vol.sharp, data_range=vol.data_range))
            scores["ssim"].append(ssim(pred, vol.sharp, data_range=vol.data_range))
            scores["psnr_input"].append(psnr(vol.blurred, vol.sharp, data_range=vol.data_range))
            scores["ssim_input"].append(ssim(vol.blurred, vol.sharp, data_range=vol.data_range))
    finally:
        net.train(was_training)
    return {k: float(np.mean(v)) for k, v in scores.items() if v}
