"""Content (perceptual) loss: mean squared difference of frozen VGG-19 feature maps."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpcdeconv.config.perceptual import ContentLossConfig
from hpcdeconv.errors import ConfigError
from hpcdeconv.models.vgg import LAYER_NAMES, VGG19Features, load_vgg19

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ContentLoss", "build_content_loss"]

log = logging.getLogger(__name__)

#: Per-channel (R, G, B) statistics of ImageNet images in [0, 1]: the normalisation the
#: published VGG-19 weights were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_channels(channels: int) -> None:
    """Raise ConfigError unless VGG-19 (an RGB network) can take ``channels``-channel images."""
    if channels not in (1, 3):
        raise ConfigError(
            f"the VGG-19 content loss (method.content.vgg_weights) needs 1- or 3-channel "
            f"images, got {channels} channels"
        )


class ContentLoss(nn.Module):
    """Content term ``l_content`` of COMI (Zhang et al., "Correction of out-of-focus
    microscopic images by deep learning", CSBJ 2022): the L2 distance between VGG-19
    feature maps of the target and the generated image, i.e. the feature reconstruction
    loss of Johnson et al., "Perceptual losses for real-time style transfer and
    super-resolution", ECCV 2016, with VGG-19 of Simonyan & Zisserman (ICLR 2015).

    ``l = mean over layers ℓ of mean((φ_ℓ(ŷ) − φ_ℓ(y))²)`` with ``y`` the target, ``ŷ``
    the generated image and φ_ℓ the feature map at layer ℓ; both images are first mapped
    from ``data_range`` to [0, 1], a single channel is replicated to RGB, and the result is
    normalised by the ImageNet mean and standard deviation. The weight λ₂ is applied by
    the caller.

    Without a VGG (``vgg=None``) the loss is the pixel mean squared error of the images
    as given (in ``data_range``), so a run without weights still trains.

    Parameters
    ----------
    vgg
        Frozen VGG-19 features (:func:`hpcdeconv.models.vgg.load_vgg19`), reachable as
        ``self.vgg`` so the method lists it among its loss networks; or ``None``.
    layers
        Names of the compared feature maps (:data:`hpcdeconv.models.vgg.LAYER_NAMES`).
    channels
        Channels C of the images: 1 (grey, replicated to RGB) or 3 (RGB); any C without
        a VGG.
    data_range
        ``(lo, hi)``: the network's intensity range, e.g. ``(-1, 1)`` for a ``tanh`` head
        (see :mod:`hpcdeconv.data.intensity`); mapped to [0, 1].

    Raises
    ------
    ConfigError
        With a VGG: ``channels`` not 1 or 3, or no or unknown layers. Any case:
        ``data_range`` with ``hi <= lo``.
    """

    def __init__(
        self,
        vgg: VGG19Features | None,
        layers: Sequence[str],
        channels: int,
        data_range: tuple[float, float],
    ) -> None:
        super().__init__()
        lo, hi = (float(v) for v in data_range)
        if not hi > lo:
            raise ConfigError(f"content loss data_range needs hi > lo, got {[lo, hi]}")
        if vgg is not None:
            _check_channels(channels)
            unknown = [name for name in layers if name not in LAYER_NAMES]
            if unknown or not layers:
                raise ConfigError(
                    f"content loss layers must be a non-empty list of VGG-19 layers, got "
                    f"{list(layers)}"
                )
        self.vgg = vgg
        self.layers = tuple(layers)
        self.channels = channels
        self.data_range = (lo, hi)

    def _normalised(self, images: Tensor) -> Tensor:
        """(B, C, Y, X) in ``data_range`` → (B, 3, Y, X) ImageNet-normalised, fp32."""
        lo, hi = self.data_range
        # fp32 whatever precision the generator ran in; the VGG's weights are fp32.
        unit = (images.float() - lo) / (hi - lo)
        if unit.shape[1] == 1:
            unit = unit.expand(-1, 3, -1, -1)
        # Made per call, on the images' device: the engine moves only ``self.vgg``.
        mean = unit.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = unit.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (unit - mean) / std

    def forward(self, target: Tensor, generated: Tensor) -> Tensor:
        """The content loss of ``generated`` against ``target``.

        Parameters
        ----------
        target
            (B, C, Y, X) in ``data_range``; no gradient flows into it.
        generated
            (B, C, Y, X) in ``data_range``, same shape.

        Returns
        -------
        Tensor
            Scalar, fp32.

        Raises
        ------
        ValueError
            Shapes differ, are not (B, C, Y, X), or C is not ``channels``.
        """
        if target.shape != generated.shape:
            raise ValueError(
                f"content loss: target has shape {tuple(target.shape)} but the generated "
                f"image {tuple(generated.shape)}"
            )
        if generated.ndim != 4 or generated.shape[1] != self.channels:
            raise ValueError(
                f"content loss needs (B, {self.channels}, Y, X) images, got "
                f"{tuple(generated.shape)}"
            )
        if self.vgg is None:
            return F.mse_loss(generated.float(), target.detach().float())
        # The target is a fixed reference: no graph is kept through its features.
        with torch.no_grad():
            wanted = self.vgg(self._normalised(target), self.layers)
        got = self.vgg(self._normalised(generated), self.layers)
        per_layer = [
            (got[name].float() - wanted[name].float()).pow(2).mean() for name in self.layers
        ]
        return torch.stack(per_layer).mean()


def build_content_loss(
    cfg: ContentLossConfig, channels: int, data_range: tuple[float, float]
) -> ContentLoss:
    """The content loss ``cfg`` describes, its VGG-19 read from ``cfg.vgg_weights``.

    Without weights (``cfg.vgg_weights`` is ``None``) one warning is logged and the loss
    is the pixel mean squared error.

    Parameters
    ----------
    cfg
        Weights file and layers.
    channels
        Channels of the images compared (1 or 3 with weights).
    data_range
        The network's intensity range ``(lo, hi)``.

    Raises
    ------
    ConfigError
        Weights with ``channels`` other than 1 or 3 (checked before the file is read).
    InputError
        The weights file is unreadable or not a torchvision VGG-19 state dict.
    """
    if cfg.vgg_weights is None:
        log.warning("no VGG-19 weights (method.content.vgg_weights): the content loss is pixel L2")
        return ContentLoss(None, cfg.layers, channels, data_range)
    _check_channels(channels)
    return ContentLoss(load_vgg19(cfg.vgg_weights), cfg.layers, channels, data_range)
