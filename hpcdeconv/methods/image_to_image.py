"""Base of the methods whose trained artefact maps an image to an image (deblurring)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from hpcdeconv.config import GeneratorConfig
from hpcdeconv.methods.base import Artefact, DataInfo, Method, ValidationSettings
from hpcdeconv.models.factory import build_generator, generator_record
from hpcdeconv.training.validate import validate


class ImageToImageMethod(Method):
    """A method whose inference artefact is the deblurring generator G_Θ : Y → X.

    Builds G_Θ for the data's dimensionality and channels (``(B, C, *S)`` in and out),
    starting at the sharp domain's mean, before any other network of the method, so
    every method draws its initial weights in the same order. The checkpoint stores G_Θ
    under ``"deblur"`` with the record ``predict`` and ``deconvolve`` rebuild it from
    (with the dataset's intensity mapping, when it records one);
    validation is the tiled PSNR/SSIM of its output against the sharp truth.

    Parameters
    ----------
    generator
        Configuration of G_Θ.
    data
        The training data's description (spatial dims, channels, domain means).
    checkpointing
        Activation checkpointing of the generator while training.
    """

    metrics: ClassVar[Mapping[str, bool]] = {"psnr": True, "ssim": True}

    def __init__(self, generator: GeneratorConfig, data: DataInfo, checkpointing: bool) -> None:
        super().__init__()
        self.data = data
        self.generator_cfg = generator
        #: G_Θ, unwrapped (the engine wraps the group that holds it).
        self.generator = build_generator(
            generator,
            spatial_dims=data.spatial_dims,
            in_channels=data.channels,
            out_channels=data.channels,
            checkpointing=checkpointing,
            start_mean=data.means.get("x"),
        )

    def artefact(self) -> Artefact:
        """G_Θ with the record that rebuilds it (key ``"deblur"``)."""
        record = generator_record(
            self.generator_cfg,
            spatial_dims=self.data.spatial_dims,
            in_channels=self.data.channels,
            out_channels=self.data.channels,
            intensity=self.data.intensity,
        )
        return Artefact("image_to_image", "deblur", self.generator, record)

    def validate(
        self,
        network: nn.Module,
        data: Any,
        device: torch.device,
        settings: ValidationSettings,
    ) -> dict[str, float]:
        """Mean PSNR/SSIM of ``network``'s tiled prediction of the validation images.

        ``data`` is the run's :class:`~hpcdeconv.training.validate.ValidationSet`;
        returns ``psnr``, ``ssim`` and the input's ``psnr_input``, ``ssim_input``.
        """
        return validate(
            network, data, settings.tile, settings.overlap, device, settings.autocast_dtype
        )
