"""Configuration of the content (perceptual) loss: VGG-19 weights and feature layers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

from hpcdeconv.config.base import StrictModel

#: Named outputs of VGG-19's convolutional stack (Simonyan & Zisserman, ICLR 2015), in
#: network order: ``convB_I`` / ``reluB_I`` is the I-th 3×3 convolution of block B (before
#: / after its ReLU), ``poolB`` the 2×2 max pooling closing block B. Written out (rather
#: than generated) so the configuration needs no torch; ``hpcdeconv.models.vgg`` derives
#: the same names from the architecture and a test keeps the two equal.
VGGLayer = Literal[
    "conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1",
    "conv2_1", "relu2_1", "conv2_2", "relu2_2", "pool2",
    "conv3_1", "relu3_1", "conv3_2", "relu3_2", "conv3_3", "relu3_3", "conv3_4", "relu3_4",
    "pool3",
    "conv4_1", "relu4_1", "conv4_2", "relu4_2", "conv4_3", "relu4_3", "conv4_4", "relu4_4",
    "pool4",
    "conv5_1", "relu5_1", "conv5_2", "relu5_2", "conv5_3", "relu5_3", "conv5_4", "relu5_4",
    "pool5",
]  # fmt: skip


class ContentLossConfig(StrictModel):
    """The content term ``l_content`` of COMI (Zhang et al., CSBJ 2022): the mean squared
    difference of VGG-19 feature maps of the target and the generated image.

    Attributes
    ----------
    vgg_weights
        File holding torchvision's VGG-19 state dict (the full model's or only its
        ``features``), read with ``torch.load(weights_only=True``); nothing is downloaded.
        ``None``: no VGG, the content loss falls back to the pixel mean squared error.
    layers
        Feature maps compared, averaged with equal weight. The default ``relu3_3`` is the
        COMI authors' choice: their code (github.com/jiangdat/COMI, ``deblur.py``,
        ``build_vgg_hr``) takes Keras VGG-19's ``layers[9]``, ``block3_conv3`` with its
        ReLU, "image features extracted at the third block of the model".
    """

    vgg_weights: Path | None = None
    layers: Annotated[tuple[VGGLayer, ...], Field(min_length=1)] = ("relu3_3",)

    @field_validator("layers")
    @classmethod
    def _distinct(cls, layers: tuple[str, ...]) -> tuple[str, ...]:
        # A repeated layer would silently double its weight in the average.
        repeated = sorted({name for name in layers if layers.count(name) > 1})
        if repeated:
            raise ValueError(f"layers are repeated: {repeated}")
        return layers
