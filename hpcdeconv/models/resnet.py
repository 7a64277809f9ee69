"""ResNet image-to-image generator (Johnson et al. 2016) as used by cycleGAN and COMI."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hpcdeconv.errors import ConfigError
from hpcdeconv.models.blocks import (
    ConvNormAct,
    FinalActivation,
    Upsample,
    check_generator_input,
    check_upsample,
    conv_nd,
    final_activation_module,
    instance_norm_nd,
    start_head_at,
    upsampling,
)

#: One-sided reach, in voxels of their level, that the stem and the head (7 wide) add.
_STEM_REACH = 3


class _ResidualBlock(nn.Module):
    """``x + IN(conv(ReLU(IN(conv(x)))))``, 3-wide convolutions with reflection padding."""

    def __init__(self, spatial_dims: int, width: int, norm: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvNormAct(spatial_dims, width, width, norm=norm, padding_mode="reflect"),
            ConvNormAct(spatial_dims, width, width, norm=norm, act=None, padding_mode="reflect"),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, *S) → (B, C, *S)."""
        return x + self.body(x)


def _up_stage(
    spatial_dims: int, in_ch: int, out_ch: int, norm: bool, upsample: Upsample
) -> nn.Sequential:
    """×2 upsampling to ``out_ch`` channels, then normalisation and ReLU."""
    # cycleGAN's choice of transposed convolution: kernel 3, stride 2, output padding 1.
    layers: list[nn.Module] = [
        upsampling(spatial_dims, in_ch, out_ch, upsample, bias=not norm, transpose_kernel=3)
    ]
    if norm:
        layers.append(instance_norm_nd(spatial_dims)(out_ch, affine=True))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ResNetGenerator(nn.Module):
    """Residual image-to-image generator of Johnson, Alahi & Fei-Fei, "Perceptual losses
    for real-time style transfer and super-resolution", ECCV 2016, in the form Zhu et al.
    use in cycleGAN ("Unpaired image-to-image translation using cycle-consistent adversarial
    networks", ICCV 2017) and Zhang et al. in COMI ("Correction of out-of-focus microscopic
    images by deep learning", Comput. Struct. Biotechnol. J. 20, 2022), in 2D or 3D.

    A 7-wide stem to ``channels`` (c7s1-k), ``n_downsampling`` stride-2 3-wide convolutions
    doubling the channels each time, ``n_blocks`` residual blocks at the coarsest level,
    ``n_downsampling`` ×2 upsamplings halving the channels, and a 7-wide head to
    ``out_channels`` (c7s1-out) followed by ``final_activation``. Every convolution but the
    head is followed by instance normalisation (optional) and ReLU, except the second of a
    residual block (normalisation only). The stem, the residual blocks and the head pad by
    reflection, the stride-2 convolutions by zeros.

    Upsampling is cycleGAN's transposed convolution (kernel 3, stride 2: its taps overlap
    unevenly, the origin of checkerboard artefacts) or resize-convolution
    (:class:`~hpcdeconv.models.blocks.ResizeConv`, as COMI's code does). With
    ``global_residual`` the input is added to the output (COMI): the network learns the
    correction of its input, and in- and output channels must agree.

    Parameters
    ----------
    spatial_dims
        2 or 3.
    in_channels, out_channels
        Channels of input and output.
    channels
        Channels of the stem (cycleGAN and COMI: 64).
    n_downsampling
        Number of stride-2 convolutions (≥ 0; both papers: 2); spatial input sizes must be
        multiples of ``2**n_downsampling`` (:attr:`size_multiple`).
    n_blocks
        Number of residual blocks (≥ 1; cycleGAN at 256²: 9, COMI: 9).
    final_activation
        ``"tanh"`` (both papers, data in (−1, 1)), ``"sigmoid"`` or ``"none"``.
    global_residual
        Add the input to the output.
    upsample
        ``"transpose"`` or ``"resize"``.
    norm
        Instance normalisation; ``False`` gives a strictly local network.

    Raises
    ------
    ConfigError
        Negative ``n_downsampling``, no residual block, an unknown ``upsample`` or final
        activation, or a global residual between different channel counts.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: int = 64,
        n_downsampling: int = 2,
        n_blocks: int = 9,
        final_activation: FinalActivation = "tanh",
        global_residual: bool = False,
        upsample: Upsample = "transpose",
        norm: bool = True,
    ) -> None:
        super().__init__()
        if n_downsampling < 0 or n_blocks < 1:
            raise ConfigError(
                f"ResNet generator needs n_downsampling >= 0 and n_blocks >= 1, got "
                f"{n_downsampling} and {n_blocks}"
            )
        check_upsample(upsample)
        if global_residual and in_channels != out_channels:
            raise ConfigError(
                f"a global residual adds the input to the output: in_channels "
                f"({in_channels}) must equal out_channels ({out_channels})"
            )
        self.final = final_activation_module(final_activation)
        self.spatial_dims = spatial_dims
        self.n_downsampling = n_downsampling
        self.n_blocks = n_blocks
        self.upsample = upsample
        self.final_activation = final_activation
        self.global_residual = global_residual
        widths = [channels * 2**i for i in range(n_downsampling + 1)]
        self.stem = ConvNormAct(
            spatial_dims, in_channels, channels, kernel_size=7, norm=norm, padding_mode="reflect"
        )
        self.down = nn.ModuleList(
            ConvNormAct(spatial_dims, widths[i], widths[i + 1], stride=2, norm=norm)
            for i in range(n_downsampling)
        )
        self.blocks = nn.ModuleList(
            _ResidualBlock(spatial_dims, widths[-1], norm) for _ in range(n_blocks)
        )
        self.up = nn.ModuleList(
            _up_stage(spatial_dims, widths[i + 1], widths[i], norm, upsample)
            for i in reversed(range(n_downsampling))
        )
        self.head = conv_nd(spatial_dims)(
            channels, out_channels, kernel_size=7, padding=_STEM_REACH, padding_mode="reflect"
        )

    @torch.no_grad()
    def start_at(self, mean: float, weight_scale: float | None = None) -> None:
        """Start the untrained output near a target instead of PyTorch's random offset.

        Without a global residual the head starts at the data's ``mean`` exactly as the
        U-Net's does (:meth:`hpcdeconv.models.unet.UNet.start_at`: centred, scaled head
        weights and ``b = final⁻¹(mean)``).

        With a global residual the output is ``x + final(head(f))``: the head's weights are
        zeroed and its bias set to ``final⁻¹(0)``, so the untrained network is the identity
        (the zero-initialised residual branch of Goyal et al. 2017 and Fixup). For
        deblurring that is the best start available without training: the input is the
        closest estimate of its own sharp image, and it already has the right mean
        intensity (a PSF sums to one, so blurring keeps the mean), whereas adding ``mean``
        would double it. The first step then trains the head, and through it the rest.
        ``mean`` is only checked to be finite, and ``weight_scale`` is not used.

        Parameters
        ----------
        mean
            Target mean intensity of the output (the training data's mean of the domain
            the network maps into), in the data's units.
        weight_scale
            Factor on the centred head weights, in (0, 1]; ``None``:
            :data:`~hpcdeconv.models.blocks.HEAD_WEIGHT_SCALE` of the head's activation.

        Raises
        ------
        ValueError
            If ``mean`` is not finite or ``weight_scale`` is not in (0, 1].
        """
        if self.global_residual:
            if not math.isfinite(mean):
                raise ValueError(f"the head's start mean must be finite, got {mean}")
            self.head.weight.zero_()
            start_head_at(self.head, self.final_activation, 0.0, 1.0)
            return
        start_head_at(self.head, self.final_activation, mean, weight_scale)

    @property
    def size_multiple(self) -> int:
        """Every spatial input size must be a multiple of this (``2**n_downsampling``)."""
        return 2**self.n_downsampling

    @property
    def min_size(self) -> int:
        """Smallest spatial input size per axis: reflection padding needs more voxels than
        it pads (3 at the stem, 1 in the residual blocks at the coarsest level)."""
        return max(_STEM_REACH + 1, 2 * self.size_multiple)

    def reaches(self) -> tuple[int, int]:
        """Largest distance (below, above), in input voxels per axis, between an output
        voxel and an input voxel it depends on.

        Let ``(L_l, U_l)`` be the reaches, in level-``l`` voxels, of the sub-network from
        the input of level ``l``'s stride-2 convolution to the output of the upsampling
        back to level ``l``. The residual blocks give ``L = U = 2 n_blocks`` at the
        coarsest level. A coarse voxel ``c`` reads fine voxels ``2c − 1 … 2c + 1``. A
        transposed convolution (kernel 3, stride 2, padding 1) writes fine ``q`` from coarse
        ``q/2`` (``q`` even) or ``(q ± 1)/2`` (odd), so ``L_l = 2 L_{l+1} + 2`` and
        ``U_l = 2 U_{l+1} + 2``. Resize-convolution reads coarse ``⌊(q − 1)/2⌋ …
        ⌊(q + 1)/2⌋``: ``L_l = 2 L_{l+1} + 3`` and ``U_l = 2 U_{l+1} + 2``. The stem and
        the head add 3 each.

        Returns
        -------
        tuple of int
            ``(below, above)``.
        """
        below = above = 2 * self.n_blocks
        extra = 2 if self.upsample == "transpose" else 3
        for _ in range(self.n_downsampling):
            below, above = 2 * below + extra, 2 * above + 2
        return below + 2 * _STEM_REACH, above + 2 * _STEM_REACH

    def receptive_field(self) -> int:
        """Symmetric width in voxels, per axis, of the input window an output voxel can
        depend on: ``2 max(reaches()) + 1``, so a halo of ``receptive_field() // 2``
        voxels suffices for every output position. Instance normalisation makes every
        output depend on the whole tile; this describes the convolutional support only."""
        return 2 * max(self.reaches()) + 1

    def checkpoint_stages(self) -> list[str]:
        """Names of the submodules activation checkpointing may recompute: the stem, every
        stride-2 convolution, every residual block and every upsampling."""
        return [
            "stem",
            *(f"down.{i}" for i in range(len(self.down))),
            *(f"blocks.{i}" for i in range(len(self.blocks))),
            *(f"up.{i}" for i in range(len(self.up))),
        ]

    def forward(self, x: Tensor) -> Tensor:
        """Translate a batch.

        Parameters
        ----------
        x
            (B, in_channels, Z, Y, X) in 3D or (B, in_channels, Y, X) in 2D; every spatial
            size a multiple of :attr:`size_multiple` and at least :attr:`min_size`.

        Returns
        -------
        Tensor
            (B, out_channels, Z, Y, X) or (B, out_channels, Y, X), same spatial size.
        """
        check_generator_input(
            x,
            name="ResNetGenerator",
            spatial_dims=self.spatial_dims,
            size_multiple=self.size_multiple,
            rule="2**n_downsampling",
            min_size=self.min_size,
        )
        y = self.stem(x)
        for stage in (*self.down, *self.blocks, *self.up):
            y = stage(y)
        y = self.final(self.head(y))
        return x + y if self.global_residual else y
