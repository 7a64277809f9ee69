"""Layer factories shared by the 2D and 3D networks.

Each factory maps ``spatial_dims`` (2 or 3) to the matching ``torch.nn`` class so that one
network definition serves both the 2D (COMI) and 3D (cycleGAN) methods.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from hpcdeconv.errors import ConfigError

Activation = Literal["relu", "leaky_relu"]

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
    """Convolution → instance normalisation (optional) → activation.

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
        ``"relu"`` or ``"leaky_relu"`` (slope 0.2).
    stride
        Stride of the convolution.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        norm: bool = True,
        act: Activation = "relu",
        stride: int = 1,
    ) -> None:
        conv = conv_nd(spatial_dims)(
            in_ch,
            out_ch,
            kernel_size=kernel_size,
            stride=stride,
            padding=(kernel_size - 1) // 2,
            bias=not norm,
        )
        layers: list[nn.Module] = [conv]
        if norm:
            layers.append(instance_norm_nd(spatial_dims)(out_ch, affine=True))
        layers.append(activation(act))
        super().__init__(*layers)
