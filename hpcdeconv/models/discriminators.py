"""PatchGAN discriminators, single- and multi-scale."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
from torch import Tensor, nn

from hpcdeconv.errors import ConfigError
from hpcdeconv.models.blocks import ConvNormAct, HalveByMean, conv_nd

# Channel growth stops at this multiple of the first layer's width, as in the original
# PatchGAN, so deep discriminators stay affordable in 3D.
_MAX_WIDTH_FACTOR = 8


class PatchGAN(nn.Module):
    """Fully convolutional patch discriminator of Isola et al., "Image-to-image translation
    with conditional adversarial networks", CVPR 2017, in 2D or 3D.

    ``n_layers`` kernel-4 stride-2 convolutions (LeakyReLU 0.2, instance normalisation
    except on the first), one stride-1 convolution with normalisation, and a stride-1
    convolution to one channel of unbounded patch scores (no sigmoid: the losses act on
    raw scores, the log loss through BCE-with-logits). The two stride-1 convolutions have
    kernel ``head_kernel``: 3 keeps the map ``2**n_layers`` times smaller than the input
    per axis (receptive field 54 px at ``n_layers = 3``); 4 is Isola et al.'s, whose
    ``n_layers = 3`` network is the "70×70 PatchGAN" (receptive field 70 px; each
    stride-1 layer shortens the map by one, so it is ``Y // 8 − 2`` long).

    Parameters
    ----------
    spatial_dims
        2 or 3.
    in_channels
        Channels of the judged images.
    channels
        Width of the first layer; doubles per layer up to ``8 · channels``.
    n_layers
        Number of stride-2 convolutions (≥ 1).
    head_kernel
        Kernel of the two stride-1 convolutions, 3 or 4.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        channels: int = 32,
        n_layers: int = 3,
        head_kernel: int = 3,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ConfigError(f"PatchGAN n_layers must be at least 1, got {n_layers}")
        if head_kernel not in (3, 4):
            raise ConfigError(f"PatchGAN head_kernel must be 3 or 4, got {head_kernel}")
        self.n_layers = n_layers
        #: Map voxels per axis lost by the two stride-1 convolutions (padding 1 each).
        self.shrink = 2 * (head_kernel - 3)
        widths = [channels * min(2**i, _MAX_WIDTH_FACTOR) for i in range(n_layers + 1)]
        layers: list[nn.Module] = [
            ConvNormAct(
                spatial_dims,
                in_channels,
                widths[0],
                kernel_size=4,
                stride=2,
                norm=False,
                act="leaky_relu",
            )
        ]
        layers += [
            ConvNormAct(spatial_dims, c_in, c_out, kernel_size=4, stride=2, act="leaky_relu")
            for c_in, c_out in pairwise(widths[:n_layers])
        ]
        layers.append(
            ConvNormAct(
                spatial_dims,
                widths[n_layers - 1],
                widths[n_layers],
                kernel_size=head_kernel,
                act="leaky_relu",
            )
        )
        layers.append(
            conv_nd(spatial_dims)(widths[n_layers], 1, kernel_size=head_kernel, padding=1)
        )
        self.model = nn.Sequential(*layers)

    @property
    def reduction(self) -> int:
        """Factor by which the patch map is smaller than the input per axis."""
        return 2**self.n_layers

    def forward(self, x: Tensor) -> Tensor:
        """Score every patch.

        Parameters
        ----------
        x
            (B, C, Z, Y, X) or (B, C, Y, X); see :func:`check_patch_input`.

        Returns
        -------
        Tensor
            (B, 1, Z', Y', X') with ``Z' = Z // 2**n_layers − shrink`` etc.
        """
        check_patch_input(tuple(x.shape[2:]), self.reduction, self.shrink)
        return self.model(x)

    def receptive_field(self) -> int:
        """Side of the input region one patch score sees, in voxels (70 for Isola et al.'s
        ``n_layers = 3``, ``head_kernel = 4``)."""
        field, jump = 1, 1
        for module in self.model.modules():
            if isinstance(module, nn.modules.conv._ConvNd):
                field += (module.kernel_size[0] - 1) * jump
                jump *= module.stride[0]
        return field


def check_patch_input(spatial: tuple[int, ...], reduction: int, shrink: int = 0) -> None:
    """Raise ValueError unless a patch map of ``spatial // reduction - shrink`` is usable.

    Every axis must give at least one score, and the deepest instance normalisation needs
    more than one voxel in total (one voxel normalises to zero and carries no signal).
    """
    scores = [s // reduction - shrink for s in spatial]
    if min(scores) < 1 or int(np.prod(scores)) < 2:
        smallest = reduction * (1 + shrink)
        raise ValueError(
            f"input of spatial size {spatial} is too small for a discriminator that "
            f"reduces by {reduction}: every axis must be >= {smallest} and one >= "
            f"{smallest + reduction}"
        )


class MultiScalePatchGAN(nn.Module):
    """Independent PatchGANs at full, half, quarter, … resolution (the paper's multi-PatchGAN,
    after Wang et al., "High-resolution image synthesis and semantic manipulation with
    conditional GANs", CVPR 2018; used by Lim et al., IEEE TCI 2020).

    Scale ``s`` judges the input average-pooled ``s`` times by 2×.

    Parameters
    ----------
    spatial_dims
        2 or 3.
    in_channels, channels, n_layers, head_kernel
        As for :class:`PatchGAN`, shared by all scales.
    n_scales
        Number of resolutions (≥ 1).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        channels: int = 32,
        n_layers: int = 3,
        n_scales: int = 3,
        head_kernel: int = 3,
    ) -> None:
        super().__init__()
        if n_scales < 1:
            raise ConfigError(f"n_scales must be at least 1, got {n_scales}")
        self.discriminators = nn.ModuleList(
            PatchGAN(spatial_dims, in_channels, channels, n_layers, head_kernel)
            for _ in range(n_scales)
        )
        self.downsample = HalveByMean(spatial_dims)

    @property
    def n_scales(self) -> int:
        """Number of resolutions judged."""
        return len(self.discriminators)

    @property
    def reduction(self) -> int:
        """Factor by which the coarsest patch map is smaller than the input per axis."""
        return self.discriminators[0].reduction * 2 ** (self.n_scales - 1)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Score the input at every scale.

        Parameters
        ----------
        x
            (B, C, Z, Y, X) or (B, C, Y, X); see :func:`check_patch_input` with
            :attr:`reduction`.

        Returns
        -------
        list of Tensor
            ``n_scales`` patch maps, finest first; scale ``s`` has shape
            (B, 1, Z // 2**(n_layers + s) − shrink, …).
        """
        check_patch_input(tuple(x.shape[2:]), self.reduction, self.discriminators[0].shrink)
        outputs: list[Tensor] = []
        for scale, disc in enumerate(self.discriminators):
            if scale:
                x = self.downsample(x)
            outputs.append(disc(x))
        return outputs
