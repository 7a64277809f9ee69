"""Validation: tiled prediction of held-out images (or fixed crops of them) against truth.

Every evaluation of a run must score the same voxels, or a change of the score says
nothing about the model: with ``train.val_crop`` each validation image is cut once to a
fixed centred crop (clamped to the image), and the data range of each PSNR/SSIM is that
of the whole ground-truth image, also fixed for the run. Images keep their stored layout:
``(*S)`` or ``(C, *S)`` with ``S`` the run's spatial axes (``(Z, Y, X)`` or ``(Y, X)``);
with channels, SSIM is the mean over channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hpcdeconv.data.sampling import centre_crop_slices
from hpcdeconv.inference.predict import predict_volume
from hpcdeconv.metrics import psnr, ssim_as_seen
from hpcdeconv.training.feed import TrainingFeed


@dataclass(frozen=True)
class ValidationVolume:
    """One held-out pair, cropped: ``blurred`` and ``sharp`` are ``(*S)`` or ``(C, *S)``
    float32 (their stored layout).

    ``data_range`` is max - min of the whole ground-truth image (1 if it is constant).
    """

    vid: str
    blurred: np.ndarray
    sharp: np.ndarray
    data_range: float


@dataclass(frozen=True)
class ValidationSet:
    """The validation images of a run, read and cropped once.

    Build it once per run (:meth:`from_feed`) and pass it to :func:`validate` at every
    evaluation: the images are then neither re-read nor re-cut.
    """

    volumes: tuple[ValidationVolume, ...]
    crop: tuple[int, ...] | None = None

    @classmethod
    def from_feed(cls, feed: TrainingFeed, crop: Sequence[int] | None = None) -> ValidationSet:
        """Read ``feed.val_ids`` and cut each to the centred ``crop`` of its spatial axes.

        The spatial axes are the last ``len(feed.cfg.patch)`` ones; a leading channel axis
        is kept whole.
        """
        spatial_dims = len(feed.cfg.patch)
        volumes = []
        for vid in feed.val_ids:
            blurred, sharp = feed.read_pair(vid)
            rng = float(sharp.max() - sharp.min()) or 1.0
            lead = sharp.ndim - spatial_dims
            cut = (slice(None),) * lead + centre_crop_slices(sharp.shape[lead:], crop)
            volumes.append(
                ValidationVolume(
                    vid,
                    np.ascontiguousarray(blurred[cut]),
                    np.ascontiguousarray(sharp[cut]),
                    rng,
                )
            )
        fixed = None if crop is None else tuple(int(c) for c in crop)
        return cls(tuple(volumes), fixed)


def validate(
    net: nn.Module,
    feed: TrainingFeed | ValidationSet,
    tile: tuple[int, ...],
    overlap: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    crop: Sequence[int] | None = None,
) -> dict[str, float]:
    """Mean PSNR/SSIM over the validation images of the input and of G_Θ's output.

    Parameters
    ----------
    net
        G_Θ (or its EMA), mapping ``(B, C, *S)`` to the same shape.
    feed
        The training feed (its volumes are read and cropped now) or a
        :class:`ValidationSet` built once for the run (``crop`` is then its own).
    tile, overlap, device, autocast_dtype
        Tiled prediction settings (see :func:`~hpcdeconv.inference.predict.predict_volume`);
        ``len(tile)`` is the number of spatial axes ``S``, an image with one axis more has
        channels first.
    crop
        Centred crop of the spatial axes of each image for a :class:`TrainingFeed`;
        ``None``: whole.

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
            # A leading channel axis goes to the network whole: (C, *S) -> (1, C, *S).
            channel_axis = 0 if vol.blurred.ndim > len(tile) else None
            layout = {} if channel_axis is None else {"channels": vol.blurred.shape[0], "lead": 1}
            pred = predict_volume(
                net,
                vol.blurred,
                tile=tile,
                overlap=overlap,
                blend="linear",
                device=device,
                autocast_dtype=autocast_dtype,
                size_multiple=getattr(net, "size_multiple", 1),
                **layout,
            )
            rng = vol.data_range
            scores["psnr"].append(psnr(pred, vol.sharp, data_range=rng))
            # Channels scored apart and averaged; a volume thinner than the SSIM window is
            # scored with the largest window that fits instead of failing the run.
            scores["ssim"].append(ssim_as_seen(pred, vol.sharp, rng, len(tile))[0])
            scores["psnr_input"].append(psnr(vol.blurred, vol.sharp, data_range=rng))
            scores["ssim_input"].append(ssim_as_seen(vol.blurred, vol.sharp, rng, len(tile))[0])
    finally:
        net.train(was_training)
    return {k: float(np.mean(v)) for k, v in scores.items() if v}
