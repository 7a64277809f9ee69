"""Layer factories shared by the 2D and 3D networks.

Each factory maps ``spatial_dims`` (2 or 3) to the matching ``torch.nn`` class so that one
network definition serves both the 2D (COMI) and 3D (cycleGAN) methods.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from torch import nn

from hpcdeconv.errors import ConfigError

log = logging.getLogger(__name__)

Activation = Literal["relu", "leaky_relu"]
FinalActivation = Literal["sigmoid", "tanh", "none"]
PaddingMode = Literal["zeros", "reflect"]
Upsample = Literal["transpose", "resize"]

#: Factor on a head's centred weights, by final activation, when the head starts at a
#: target value (:func:`start_head_at`). The larger, the faster the head learns; the
#: smaller, the closer the start. A sigmoid at a dark mean already damps the features'
#: spread by its slope (≈ the mean), so its weights keep their size: its start is within
#: 10 % of the mean for the demo's 16-channel U-Net (within 34 % for 4 channels), and the
#: blind CPU demo passes the input's PSNR within 25 steps (scale 0.5: 50 steps; 0.1: not in
#: 100). A linear head passes the spread on: 0.1 keeps its start within 15 % (0.5: 75 %).
#: A tanh near 0 has slope ≈ 1, so it passes the spread on like a linear head.
HEAD_WEIGHT_SCALE: dict[str, float] = {"sigmoid": 1.0, "tanh": 0.1, "none": 0.1}
#: A bounded head's start is clamped this far inside its range ([ε, 1 − ε] for a sigmoid,
#: [−1 + ε, 1 − ε] for a tanh): within 1e-3 of any target in the range, while the slope
#: there (≈ ε) still lets the bias learn.
SIGMOID_START_EPS = 1e-3

_CONV: dict[int, type[nn.Module]] = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T: dict[int, type[nn.Module]] = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_INSTANCE_NORM: dict[int, type[nn.Module]] = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_MAX_POOL: dict[int, type[nn.Module]] = {2: nn.MaxPool2d, 3: nn.MaxPool3d}


def _pick(table: dict[int, type[nn.Module]], spatial_dims: int) -> type[nn.Module]:
    if spatial_dims not in table:
        raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return table[spatial_dims]


def conv_nd(spatial_dims: int) -> type[nn.Module]:
    """``nn.Conv2d`` or ``nn.Conv3d``."""
    return _pick(_CONV, spatial_dims)


def conv_transpose_nd(spatial_dims: int) -> type[nn.Module]:
    """``nn.ConvTranspose2d`` or ``nn.ConvTranspose3d``."""
    return _pick(_CONV_T, spatial_dims)


def instance_norm_nd(spatial_dims: int) -> type[nn.Module]:
    """``nn.InstanceNorm2d`` or ``nn.InstanceNorm3d``."""
    return _pick(_INSTANCE_NORM, spatial_dims)


def max_pool_nd(spatial_dims: int) -> type[nn.Module]:
    """``nn.MaxPool2d`` or ``nn.MaxPool3d``."""
    return _pick(_MAX_POOL, spatial_dims)


def final_activation_module(name: FinalActivation) -> nn.Module:
    """The output nonlinearity of a generator: sigmoid (0, 1), tanh (−1, 1) or none.

    Raises
    ------
    ConfigError
        If ``name`` is none of the three.
    """
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "tanh":
        return nn.Tanh()
    if name == "none":
        return nn.Identity()
    raise ConfigError(f"final_activation must be 'sigmoid', 'tanh' or 'none', got {name!r}")


@torch.no_grad()
def start_head_at(
    head: nn.Module, final_activation: FinalActivation, target: float, weight_scale: float | None
) -> None:
    """Make ``final(head(f))`` start near ``target`` whatever the features ``f``.

    Three deterministic changes to the head convolution ``w · f + b``, no random numbers
    drawn: ``w`` is centred over its input channels (``Σ_c w_c = 0``, removing the
    common-mode term ``mean(f) · Σ_c w_c`` of features that all have about the same
    positive mean), scaled by ``weight_scale`` so the remaining spatial variation of
    ``w · f`` is small, and ``b = final⁻¹(target)`` (clamped :data:`SIGMOID_START_EPS`
    inside a bounded activation's range).

    Parameters
    ----------
    head
        A convolution with a bias.
    final_activation
        The activation applied to the head's output.
    target
        The value the output should start at, in the data's units.
    weight_scale
        Factor on the centred weights, in (0, 1]; ``None``: :data:`HEAD_WEIGHT_SCALE`.

    Raises
    ------
    ValueError
        If ``target`` is not finite or ``weight_scale`` is not in (0, 1].
    """
    if not math.isfinite(target):
        raise ValueError(f"the head's start mean must be finite, got {target}")
    if weight_scale is None:
        weight_scale = HEAD_WEIGHT_SCALE[final_activation]
    if not 0 < weight_scale <= 1:
        raise ValueError(f"weight_scale must be in (0, 1], got {weight_scale}")
    weight, bias = head.weight, head.bias
    assert isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor)
    weight.sub_(weight.mean(dim=1, keepdim=True)).mul_(weight_scale)
    eps = SIGMOID_START_EPS
    if final_activation == "none":
        bias.fill_(target)
        return
    low, high = (eps, 1 - eps) if final_activation == "sigmoid" else (eps - 1, 1 - eps)
    start = min(max(target, low), high)
    if not low <= target <= high:
        # Data outside the activation's range cannot be matched by it at all.
        log.warning(
            "the start value %.3g is outside the %s head's range; the head starts at %.3g",
            target,
            final_activation,
            start,
        )
    inverse = math.log(start / (1 - start)) if final_activation == "sigmoid" else math.atanh(start)
    bias.fill_(inverse)


class DoubleByRepeat(nn.Module):
    """Double every spatial axis by repeating each voxel 2×2(×2) times.

    The same values as ``nn.Upsample(scale_factor=2, mode="nearest")``, computed as a
    broadcast and a reshape: its backward is a plain sum, deterministic on every device,
    whatever ``torch.use_deterministic_algorithms`` demands of the interpolation kernels.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) → (B, C, *(2 S))."""
        spatial = x.shape[2:]
        index = (..., *(s for _ in spatial for s in (slice(None), None)))
        doubled = [d for n in spatial for d in (n, 2)]
        return (
            x[index].expand(*x.shape[:2], *doubled).reshape(*x.shape[:2], *(2 * n for n in spatial))
        )


class ResizeConv(nn.Sequential):
    """Resize-convolution ×2 up-sampling: nearest-neighbour doubling, then a 3-wide
    convolution (Odena, Dumoulin & Olah, "Deconvolution and checkerboard artifacts",
    Distill 2016).

    Every output voxel gets its value from the same number of kernel taps, so unlike a
    transposed convolution whose kernel size is not a multiple of its stride (or whose
    taps learn unequal sums) it cannot leave a period-2 grid in the output.

    Parameters
    ----------
    spatial_dims
        2 or 3.
    in_ch, out_ch
        Channels of input and output.
    bias
        Bias of the convolution (``False`` before a normalisation, which removes it).
    """

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, bias: bool) -> None:
        conv = conv_nd(spatial_dims)(in_ch, out_ch, kernel_size=3, padding=1, bias=bias)
        super().__init__(DoubleByRepeat(), conv)


class HalveByMean(nn.Module):
    """Halve every spatial axis by averaging non-overlapping 2×2(×2) blocks.

    The same values as ``nn.AvgPool{2,3}d(kernel_size=2, stride=2)`` (a trailing odd voxel
    is dropped), computed as a reshape and a mean: its backward is deterministic on CUDA,
    where ``avg_pool3d``'s backward has no deterministic kernel and so stops any run with
    ``train.deterministic: true``.

    Parameters
    ----------
    spatial_dims
        2 or 3.
    """

    def __init__(self, spatial_dims: int) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        self.spatial_dims = spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) → (B, C, *(S // 2))."""
        half = [n // 2 for n in x.shape[2:]]
        x = x[(..., *(slice(0, 2 * h) for h in half))]
        split = [d for h in half for d in (h, 2)]
        pairs = tuple(3 + 2 * i for i in range(self.spatial_dims))
        return x.reshape(*x.shape[:2], *split).mean(dim=pairs)


def activation(name: Activation) -> nn.Module:
    """ReLU, or LeakyReLU with slope 0.2 (the PatchGAN convention)."""
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "leaky_relu":
        return nn.LeakyReLU(0.2, inplace=True)
    raise ConfigError(f"activation must be 'relu' or 'leaky_relu', got {name!r}")


class ConvNormAct(nn.Sequential):
    """Convolution → instance normalisation (optional) → activation (optional).

    Padding is ``(kernel_size - 1) // 2``: a stride-1 convolution keeps the size for odd
    kernels, and a kernel-4 stride-2 convolution halves an even size exactly. The
    convolution has no bias when it is followed by instance normalisation, whose mean
    subtraction would cancel it; the normalisation carries a learnable scale and shift.

    Parameters
    ----------
    spatial_dims
        2 or 3.
    in_ch, out_ch
        Channels of the input and output.
    kernel_size
        Side of the cubic (square) kernel.
    norm
        Whether to apply instance normalisation.
    act
        ``"relu"``, ``"leaky_relu"`` (slope 0.2) or ``None`` (no activation).
    stride
        Stride of the convolution.
    padding_mode
        ``"zeros"`` or ``"reflect"`` (mirror the border, as the ResNet generator does).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        norm: bool = True,
        act: Activation | None = "relu",
        stride: int = 1,
        padding_mode: PaddingMode = "zeros",
    ) -> None:
        conv = conv_nd(spatial_dims)(
            in_ch,
            out_ch,
            kernel_size=kernel_size,
            stride=stride,
            padding=(kernel_size - 1) // 2,
            bias=not norm,
            padding_mode=padding_mode,
        )
        layers: list[nn.Module] = [conv]
        if norm:
            layers.append(instance_norm_nd(spatial_dims)(out_ch, affine=True))
        if act is not None:
            layers.append(activation(act))
        super().__init__(*layers)


def check_upsample(upsample: str) -> None:
    """Refuse an unknown up-sampling mode.

    Raises
    ------
    ConfigError
        ``upsample`` is not ``"transpose"`` or ``"resize"``.
    """
    if upsample not in ("transpose", "resize"):
        raise ConfigError(f"upsample must be 'transpose' or 'resize', got {upsample!r}")


def upsampling(
    spatial_dims: int,
    in_ch: int,
    out_ch: int,
    upsample: Upsample,
    *,
    bias: bool,
    transpose_kernel: int = 2,
) -> nn.Module:
    """×2 up-sampling from ``in_ch`` to ``out_ch`` channels: (B, in_ch, *S) → (B, out_ch, *2S).

    Parameters
    ----------
    spatial_dims
        2 or 3.
    in_ch, out_ch
        Channels of input and output.
    upsample
        ``"transpose"``: a stride-2 transposed convolution of width ``transpose_kernel``
        (2: the U-Net's; 3 with padding and output padding 1: cycleGAN's ResNet), padded so
        it exactly doubles; ``"resize"``: :class:`ResizeConv`.
    bias
        Bias of the convolution (``False`` before a normalisation, which removes it).
    transpose_kernel
        Width of the transposed convolution's kernel (2 or 3).
    """
    if upsample == "resize":
        return ResizeConv(spatial_dims, in_ch, out_ch, bias=bias)
    padding = (transpose_kernel - 1) // 2
    return conv_transpose_nd(spatial_dims)(
        in_ch,
        out_ch,
        kernel_size=transpose_kernel,
        stride=2,
        padding=padding,
        output_padding=2 + 2 * padding - transpose_kernel,
        bias=bias,
    )


def check_generator_input(
    x: torch.Tensor,
    *,
    name: str,
    spatial_dims: int,
    size_multiple: int,
    rule: str,
    min_size: int = 1,
) -> None:
    """Refuse a batch a generator cannot take: wrong rank or spatial sizes.

    Parameters
    ----------
    x
        The batch, expected (B, C, Z, Y, X) in 3D or (B, C, Y, X) in 2D.
    name
        The network, for messages.
    spatial_dims
        2 or 3.
    size_multiple
        Every spatial size must be a multiple of this.
    rule
        Where ``size_multiple`` comes from (e.g. ``"2**depth"``), for messages.
    min_size
        Smallest spatial size per axis.

    Raises
    ------
    ValueError
        ``x`` has not ``spatial_dims + 2`` axes, or a spatial size is not a multiple of
        ``size_multiple`` or is below ``min_size``.
    """
    axes = "Z, Y, X" if spatial_dims == 3 else "Y, X"
    if x.ndim != spatial_dims + 2:
        raise ValueError(f"{name} expects a (B, C, {axes}) tensor, got shape {tuple(x.shape)}")
    spatial = tuple(x.shape[2:])
    if any(s % size_multiple for s in spatial) or min(spatial) < min_size:
        least = f" and at least {min_size} along every axis" if min_size > 1 else ""
        raise ValueError(
            f"{name} input spatial shape {spatial} must be a multiple of "
            f"size_multiple={size_multiple} ({rule}){least}; pad the input first"
        )
