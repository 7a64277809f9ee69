"""U-Net deblurring generator G_Θ of the blind/non-blind 3D cycleGAN."""

from __future__ import annotations

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
    max_pool_nd,
    start_head_at,
    upsampling,
)


class _DoubleConv(nn.Sequential):
    """Two 3×3(×3) ConvNormAct layers: one U-Net level between pooling/skip points."""

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, norm: bool) -> None:
        super().__init__(
            ConvNormAct(spatial_dims, in_ch, out_ch, norm=norm),
            ConvNormAct(spatial_dims, out_ch, out_ch, norm=norm),
        )


class _UpStage(nn.Module):
    """×2 upsampling, concatenation with the skip, then two convolutions."""

    def __init__(
        self, spatial_dims: int, in_ch: int, out_ch: int, norm: bool, upsample: Upsample
    ) -> None:
        super().__init__()
        # No bias before normalisation: a per-channel constant is removed by the next norm.
        self.up = upsampling(spatial_dims, in_ch, out_ch, upsample, bias=not norm)
        self.convs = _DoubleConv(spatial_dims, 2 * out_ch, out_ch, norm)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        """``x`` (B, 2C, *S/2), ``skip`` (B, C, *S) → (B, C, *S)."""
        return self.convs(torch.cat([self.up(x), skip], dim=1))


class UNet(nn.Module):
    """Deblurring generator of Lim et al., "CycleGAN with a blur kernel for deconvolution
    microscopy: optimal transport geometry", IEEE Trans. Comput. Imaging 6 (2020).

    Contracting and expanding paths of 3×3×3 convolution → instance normalisation → ReLU,
    with a pooling step (2× max pooling) and a skip connection after every other
    convolution, i.e. two convolutions per level. Channels double at each level
    (``channels · 2**level``) down to a bottleneck of ``channels · 2**depth``; the expanding
    path upsamples 2×, concatenates the skip and applies two convolutions. A 1×1×1
    convolution maps to ``out_channels``. Upsampling is the paper's 2×2×2 stride-2
    transposed convolution (non-overlapping, but each of the 8 output phases has its own
    taps, which can leave a period-2 grid when they learn unequal sums), or resize-convolution
    (nearest-neighbour doubling then a 3×3×3 convolution, :class:`ResizeConv`), which
    cannot.

    Parameter counts in 3D with one input and output channel (``norm=True``):

    ========  =====  ==========
    channels  depth  parameters
    ========  =====  ==========
    16        4      5.6 M
    32        3      5.6 M
    64        2      5.4 M
    40        3      8.8 M
    32        4      22.6 M
    ========  =====  ==========

    The count grows as ``channels**2`` and ×4 per extra level. The default
    ``channels=32, depth=3`` (5.6 M) is the closest power-of-two width to the ~7 M
    generator parameters attributed to the paper's setting; that figure and the paper's
    exact level/width table could not be verified from its text.

    Instance normalisation makes every output voxel depend (through the tile statistics) on
    the whole input; :meth:`receptive_field` describes the convolutional support only.

    Parameters
    ----------
    spatial_dims
        2 or 3.
    in_channels, out_channels
        Channels of input and output.
    channels
        Channels of the first level.
    depth
        Number of pooling steps (≥ 1); spatial input sizes must be multiples of
        ``2**depth`` (see :attr:`size_multiple`).
    final_activation
        ``"sigmoid"`` for intensities in (0, 1), ``"tanh"`` for (−1, 1), or ``"none"``.
    norm
        Instance normalisation after each convolution; ``False`` gives a strictly local
        network whose output depends only on the receptive field.
    upsample
        ``"transpose"`` (the paper's) or ``"resize"`` (resize-convolution).

    Activation checkpointing is applied from outside to the stages
    :meth:`checkpoint_stages` names (:mod:`hpcdeconv.models.checkpointing`).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: int = 32,
        depth: int = 3,
        final_activation: FinalActivation = "sigmoid",
        norm: bool = True,
        upsample: Upsample = "transpose",
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ConfigError(f"UNet depth must be at least 1, got {depth}")
        check_upsample(upsample)
        self.final = final_activation_module(final_activation)
        self.spatial_dims = spatial_dims
        self.depth = depth
        self.upsample = upsample
        widths = [channels * 2**level for level in range(depth + 1)]
        self.encoders = nn.ModuleList(
            _DoubleConv(spatial_dims, c_in, c_out, norm)
            for c_in, c_out in zip([in_channels, *widths[:-2]], widths[:-1], strict=True)
        )
        self.pool = max_pool_nd(spatial_dims)(kernel_size=2, stride=2)
        self.bottleneck = _DoubleConv(spatial_dims, widths[-2], widths[-1], norm)
        self.decoders = nn.ModuleList(
            _UpStage(spatial_dims, widths[level + 1], widths[level], norm, upsample)
            for level in reversed(range(depth))
        )
        self.head = conv_nd(spatial_dims)(widths[0], out_channels, kernel_size=1)
        self.final_activation = final_activation

    @torch.no_grad()
    def start_at(self, mean: float, weight_scale: float | None = None) -> None:
        """Start the untrained output at ``mean``, not at 0.5 (sigmoid) or ±0.3 (linear).

        The head is ``final(w · f + b)`` over the last decoder features ``f`` (ReLU of
        instance-normalised activations: every channel has about the same positive mean).
        Three deterministic changes, no random numbers drawn (every rank, and every run
        with the same data, gets the same start; the global RNG stream is untouched):

        1. ``w`` is centred over the input channels (``Σ_c w_c = 0``), removing the
           common-mode term ``mean(f) · Σ_c w_c``, a per-initialisation offset of about
           ±0.3 in logits that would move a sigmoid's start by ±40 %;
        2. ``w`` is scaled by ``weight_scale``
           (:data:`~hpcdeconv.models.blocks.HEAD_WEIGHT_SCALE`: 1 for a sigmoid, 0.1 for a
           tanh or linear head) so the remaining spatial variation of ``w · f`` is small
           and ``mean(final(w · f + b)) ≈ final(b)``;
        3. ``b = final⁻¹(mean)``: ``logit(mean)`` for a sigmoid head and ``atanh(mean)``
           for a tanh head, clamped ε = :data:`~hpcdeconv.models.blocks.SIGMOID_START_EPS`
           inside the range, ``mean`` for a linear one
           (:func:`~hpcdeconv.models.blocks.start_head_at`).

        Measured over 8 initialisations of a 4-channel depth-2 sigmoid U-Net on sparse
        data (mean 0.0067): the output's mean is 0.91-1.89 × ``mean`` with step 3 alone,
        1.01-1.34 × with steps 1 and 3 (1.01-1.10 × with 16 channels), 1.003-1.05 × with
        a scale of 0.5 and 1.000-1.002 × with 0.1. Loading a checkpoint afterwards replaces
        all of it.

        Parameters
        ----------
        mean
            Target mean intensity of the output (e.g. the training data's mean of the
            domain the network maps into), in the data's units.
        weight_scale
            Factor on the centred head weights, in (0, 1]; ``None``:
            :data:`~hpcdeconv.models.blocks.HEAD_WEIGHT_SCALE` of the head's activation.

        Raises
        ------
        ValueError
            If ``mean`` is not finite or ``weight_scale`` is not in (0, 1].
        """
        start_head_at(self.head, self.final_activation, mean, weight_scale)

    @property
    def size_multiple(self) -> int:
        """Every spatial input size must be a multiple of this (``2**depth``)."""
        return 2**self.depth

    def receptive_field(self) -> int:
        """Width in voxels, per axis, of the input window an output voxel can depend on.

        Let ``R_l`` be the largest one-sided reach, in level-``l`` voxels, of the sub-network
        from the input of level ``l`` to its decoder output. The bottleneck's two 3-wide
        convolutions give ``R_depth = 2``. At a level above, an output voxel sees ±2 voxels
        through the decoder convolutions; 2× upsampling maps them to coarse voxels whose
        inputs lie within ``R_{l+1}`` coarse voxels, i.e. ``2 R_{l+1}`` fine voxels plus up
        to one more from the pooling alignment (which side depends on the parity of the
        output position), and the encoder convolutions add 2. Hence
        ``R_l = 2 R_{l+1} + 5``. Resize-convolution upsampling adds its 3-wide convolution
        at the fine level, one more voxel: ``R_l = 2 R_{l+1} + 6``. The returned width
        ``2 R_0 + 1`` is symmetric, so a halo of ``receptive_field() // 2`` voxels suffices
        for every output position.

        Returns
        -------
        int
            ``2 R_0 + 1``: 19, 47, 103, 215 for depth 1, 2, 3, 4 (transpose); 21, 53, 117,
            245 (resize).
        """
        step = 5 if self.upsample == "transpose" else 6
        reach = 2
        for _ in range(self.depth):
            reach = 2 * reach + step
        return 2 * reach + 1

    def checkpoint_stages(self) -> list[str]:
        """Names of the submodules activation checkpointing may recompute: every encoder
        level, the bottleneck and every decoder level (upsampling and its convolutions)."""
        return [
            *(f"encoders.{i}" for i in range(len(self.encoders))),
            "bottleneck",
            *(f"decoders.{i}" for i in range(len(self.decoders))),
        ]

    def forward(self, x: Tensor) -> Tensor:
        """Deblur a batch.

        Parameters
        ----------
        x
            (B, in_channels, Z, Y, X) in 3D or (B, in_channels, Y, X) in 2D; every spatial
            size a multiple of :attr:`size_multiple`.

        Returns
        -------
        Tensor
            (B, out_channels, Z, Y, X) or (B, out_channels, Y, X), same spatial size.
        """
        check_generator_input(
            x,
            name="UNet",
            spatial_dims=self.spatial_dims,
            size_multiple=self.size_multiple,
            rule="2**depth",
        )
        skips: list[Tensor] = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for decoder, skip in zip(self.decoders, reversed(skips), strict=True):
            x = decoder(x, skip)
        return self.final(self.head(x))
