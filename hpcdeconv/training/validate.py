"""Validation: tiled whole-volume prediction of held-out volumes against their truth."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hpcdeconv.inference.predict import predict_volume
from hpcdeconv.metrics import psnr, ssim
from hpcdeconv.training.feed import TrainingFeed


def validate(
    net: nn.Module,
    feed: TrainingFeed,
    tile: tuple[int, int, int],
    overlap: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> dict[str, float]:
    """Mean PSNR/SSIM over the validation volumes of the input and of G_Θ's output.

    The data range is that of each ground-truth volume.
    """
    was_training = net.training
    net.eval()
    scores: dict[str, list[float]] = {"psnr": [], "ssim": [], "psnr_input": [], "ssim_input": []}
    try:
        for vid in feed.val_ids:
            blurred, sharp = feed.read_pair(vid)
            pred = predict_volume(
                net,
                blurred,
                tile=tile,
                overlap=overlap,
                blend="linear",
                device=device,
                autocast_dtype=autocast_dtype,
                size_multiple=getattr(net, "size_multiple", 1),
            )
            rng = float(sharp.max() - sharp.min()) or 1.0
            scores["psnr"].append(psnr(pred, sharp, data_range=rng))
            scores["ssim"].append(ssim(pred, sharp, data_range=rng))
            scores["psnr_input"].append(psnr(blurred, sharp, data_range=rng))
            scores["ssim_input"].append(ssim(blurred, sharp, data_range=rng))
    finally:
        net.train(was_training)
    return {k: float(np.mean(v)) for k, v in scores.items() if v}
