"""U-Net deblurring generator G_Θ of the blind/non-blind 3D cycleGAN."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hpcdeconv.errors import ConfigError
from hpcdeconv.models.blocks import ConvNormAct, conv_nd, conv_transpose_nd, max_pool_nd

log = logging.getLogger(__name__)

#: Factor on the head's centred weights, by final activation, when the head starts at the
#: data's mean (:meth:`UNet.start_at`). The larger, the faster the head learns; the smaller,
#: the closer the start. A sigmoid at a dark mean already damps the features' spread by its
#: slope (≈ the mean), so its weights keep their size: its start is within 10 % of the mean
#: for the demo's 16-channel U-Net (within 34 % for 4 channels), and the blind CPU demo
#: passes the input's PSNR within 25 steps (scale 0.5: 50 steps; 0.1: not in 100). A linear
#: head passes the spread on: 0.1 keeps its start within 15 % (0.5: 75 %).
HEAD_WEIGHT_SCALE: dict[str, float] = {"sigmoid": 1.0, "none": 0.1}
#: A sigmoid head's start is clamped into [ε, 1 − ε]: within 1e-3 of any mean in [0, 1],
#: while the sigmoid's slope there (≈ ε) still lets the bias learn.
SIGMOID_START_EPS = 1e-3


class _DoubleConv(nn.Sequential):
    """Two 3×3(×3) ConvNormAct layers: one U-Net level between pooling/skip points."""

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, norm: bool) -> None:
        super().__init__(
            ConvNormAct(spatial_dims, in_ch, out_ch, norm=norm),
            ConvNormAct(spatial_dims, out_ch, out_ch, norm=norm),
        )


class _UpStage(nn.Module):
    """Transposed-conv ×2 upsampling, concatenation with the skip, then two convolutions."""

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, norm: bool) -> None:
        super().__init__()
        # No bias before normalisation: a per-channel constant is removed by the next norm.
        self.up = conv_transpose_nd(spatial_dims)(
            in_ch, out_ch, kernel_size=2, stride=2, bias=not norm
        )
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
    path upsamples with a 2×2×2 stride-2 transposed convolution (non-overlapping, so it adds
    no checkerboard overlap and keeps the receptive field analysis exact), concatenates the
    skip and applies two convolutions. A 1×1×1 convolution maps to ``out_channels``.

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
        ``"sigmoid"`` for intensities in (0, 1), or ``"none"``.
    checkpointing
        Recompute each stage in the backward pass (activation checkpointing) while training.
    norm
        Instance normalisation after each convolution; ``False`` gives a strictly local
        network whose output depends only on the receptive field.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: int = 32,
        depth: int = 3,
        final_activation: Literal["sigmoid", "none"] = "sigmoid",
        checkpointing: bool = False,
        norm: bool = True,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ConfigError(f"UNet depth must be at least 1, got {depth}")
        if final_activation not in ("sigmoid", "none"):
            raise ConfigError(
                f"final_activation must be 'sigmoid' or 'none', got {final_activation!r}"
            )
        self.spatial_dims = spatial_dims
        self.depth = depth
        self.checkpointing = checkpointing
        widths = [channels * 2**level for level in range(depth + 1)]
        self.encoders = nn.ModuleList(
            _DoubleConv(spatial_dims, c_in, c_out, norm)
            for c_in, c_out in zip([in_channels, *widths[:-2]], widths[:-1], strict=True)
        )
        self.pool = max_pool_nd(spatial_dims)(kernel_size=2, stride=2)
        self.bottleneck = _DoubleConv(spatial_dims, widths[-2], widths[-1], norm)
        self.decoders = nn.ModuleList(
            _UpStage(spatial_dims, widths[level + 1], widths[level], norm)
            for level in reversed(range(depth))
        )
        self.head = conv_nd(spatial_dims)(widths[0], out_channels, kernel_size=1)
        self.final_activation = final_activation
        self.final = nn.Sigmoid() if final_activation == "sigmoid" else nn.Identity()

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
        2. ``w`` is scaled by ``weight_scale`` (:data:`HEAD_WEIGHT_SCALE`: 1 for a
           sigmoid, 0.1 for a linear head) so the remaining spatial variation of
           ``w · f`` is small and ``mean(final(w · f + b)) ≈ final(b)``;
        3. ``b = final⁻¹(mean)``: ``logit(mean)`` (clamped into [ε, 1 − ε],
           ε = :data:`SIGMOID_START_EPS`) for a sigmoid head, ``mean`` for a linear one.

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
            :data:`HEAD_WEIGHT_SCALE` of the head's activation.

        Raises
        ------
        ValueError
            If ``mean`` is not finite or ``weight_scale`` is not in (0, 1].
        """
        if not math.isfinite(mean):
            raise ValueError(f"the head's start mean must be finite, got {mean}")
        if weight_scale is None:
            weight_scale = HEAD_WEIGHT_SCALE[self.final_activation]
        if not 0 < weight_scale <= 1:
            raise ValueError(f"weight_scale must be in (0, 1], got {weight_scale}")
        weight = self.head.weight
        weight.sub_(weight.mean(dim=1, keepdim=True)).mul_(weight_scale)
        if self.final_activation == "sigmoid":
            start = min(max(mean, SIGMOID_START_EPS), 1 - SIGMOID_START_EPS)
            if not 0 < mean < 1:
                # Data outside (0, 1) cannot be matched by a sigmoid at all.
                log.warning(
                    "the data's mean %.3g is outside the sigmoid head's range (0, 1); "
                    "the head starts at %.3g",
                    mean,
                    start,
                )
            bias = math.log(start / (1 - start))
        else:
            bias = mean
        assert self.head.bias is not None
        self.head.bias.fill_(bias)

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
        ``R_l = 2 R_{l+1} + 5``. The returned width ``2 R_0 + 1`` is symmetric, so a halo of
        ``receptive_field() // 2`` voxels suffices for every output position.

        Returns
        -------
        int
            ``2 R_0 + 1``: 19, 47, 103, 215 for depth 1, 2, 3, 4.
        """
        reach = 2
        for _ in range(self.depth):
            reach = 2 * reach + 5
        return 2 * reach + 1

    def _stage(self, module: Callable[..., Tensor], *args: Tensor) -> Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"UNet expects a (B, C, {self._axes()}) tensor, got shape {tuple(x.shape)}"
            )
        spatial = tuple(x.shape[2:])
        if any(s % self.size_multiple for s in spatial):
            raise ValueError(
                f"UNet input spatial shape {spatial} is not divisible by "
                f"size_multiple={self.size_multiple} (2**depth); pad the input first"
            )

    def _axes(self) -> str:
        return "Z, Y, X" if self.spatial_dims == 3 else "Y, X"

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
        self._check_input(x)
        skips: list[Tensor] = []
        for encoder in self.encoders:
            x = self._stage(encoder, x)
            skips.append(x)
            x = self.pool(x)
        x = self._stage(self.bottleneck, x)
        for decoder, skip in zip(self.decoders, reversed(skips), strict=True):
            x = self._stage(decoder, x, skip)
        return self.final(self.head(x))
