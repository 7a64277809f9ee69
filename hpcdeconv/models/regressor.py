"""ResNet-34 and ResNeXt-50 regressors of PSF parameters from one 2D image patch.

The networks of Shajkofci & Liebling, IEEE TIP 29 (2020), Sec. III-B: a residual CNN maps a
1-channel patch (128 × 128 in the paper) to ``P + 1`` linear outputs, the ``P`` parameters
of a PSF model and the invalidity ``â0`` of the patch (eq. 11). Written here with torch
only (no torchvision, no MONAI) after He et al., "Deep residual learning for image
recognition", CVPR 2016 (ResNet-34: basic blocks ``[3, 4, 6, 3]``) and Xie et al.,
"Aggregated residual transformations for deep neural networks", CVPR 2017 (ResNeXt-50,
32×4d: grouped bottleneck blocks ``[3, 4, 6, 3]``).
"""

from __future__ import annotations

from torch import Tensor, nn

from hpcdeconv.config import RegressorConfig
from hpcdeconv.errors import ConfigError

#: Blocks per stage of ResNet-34 and ResNeXt-50.
_DEPTHS = (3, 4, 6, 3)
#: Smallest patch side: the stem and three stride-2 stages leave 1 pixel at 32.
MIN_SIZE = 32
#: Added to a patch's standard deviation before dividing by it.
_EPS = 1e-6


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    )


class _Shortcut(nn.Module):
    """Identity, or a strided 1×1 convolution + BN where shape or width change."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.proj = _conv_bn(in_ch, out_ch, 1, stride) if stride != 1 or in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        return x if self.proj is None else self.proj(x)


class BasicBlock(nn.Module):
    """``ReLU(x + BN(conv3(ReLU(BN(conv3(x))))))`` (ResNet-18/34)."""

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        self.out_channels = width
        self.body = nn.Sequential(
            _conv_bn(in_ch, width, 3, stride), nn.ReLU(inplace=True), _conv_bn(width, width, 3)
        )
        self.shortcut = _Shortcut(in_ch, width, stride)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, Y, X) → (B, width, Y / stride, X / stride)."""
        return self.act(self.body(x) + self.shortcut(x))


class BottleneckBlock(nn.Module):
    """1×1 reduce, grouped 3×3, 1×1 expand to ``4 · width``, residual (ResNeXt)."""

    def __init__(self, in_ch: int, width: int, stride: int, inner: int, groups: int) -> None:
        super().__init__()
        self.out_channels = 4 * width
        self.body = nn.Sequential(
            _conv_bn(in_ch, inner, 1),
            nn.ReLU(inplace=True),
            _conv_bn(inner, inner, 3, stride, groups),
            nn.ReLU(inplace=True),
            _conv_bn(inner, self.out_channels, 1),
        )
        self.shortcut = _Shortcut(in_ch, self.out_channels, stride)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, Y, X) → (B, 4 width, Y / stride, X / stride)."""
        return self.act(self.body(x) + self.shortcut(x))


class Regressor(nn.Module):
    """ResNet-34 / ResNeXt-50 with ``outputs`` linear outputs for 1-channel 2D patches.

    Stem: 7×7 stride-2 convolution to ``width`` channels, BN, ReLU, 3×3 stride-2 max
    pooling; four stages of ``[3, 4, 6, 3]`` blocks of widths ``width · (1, 2, 4, 8)``, the
    first block of stages 2-4 with stride 2; global average pooling; one linear layer.
    Every patch is standardised first (its mean subtracted, divided by its standard
    deviation + 1e-6), so callers pass raw intensities and the output does not depend on
    the patch's brightness; a flat patch becomes zeros. The last BN of every residual
    branch starts at zero (each block starts as the identity; Goyal et al. 2017).

    Parameters
    ----------
    cfg
        Kind (``resnet34`` or ``resnext50``), ``width``, ResNeXt ``cardinality`` and
        ``group_width`` (the grouped convolution of a stage of width ``w`` has
        ``cardinality · group_width · w / 64`` channels, at least ``cardinality``).
    outputs
        Number of outputs, ``P + 1`` for a PSF model of ``P`` parameters.

    Raises
    ------
    ConfigError
        ``outputs < 1``.
    """

    def __init__(self, cfg: RegressorConfig, outputs: int) -> None:
        super().__init__()
        if outputs < 1:
            raise ConfigError(f"a regressor needs at least one output, got {outputs}")
        self.kind = cfg.kind
        self.stem = nn.Sequential(
            _conv_bn(1, cfg.width, 7, 2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        channels = cfg.width
        for index, depth in enumerate(_DEPTHS):
            width = cfg.width * 2**index
            blocks: list[nn.Module] = []
            for b in range(depth):
                stride = 2 if b == 0 and index > 0 else 1
                block = self._block(cfg, channels, width, stride)
                blocks.append(block)
                channels = block.out_channels
            setattr(self, f"layer{index + 1}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, outputs)
        self._init_weights()

    @staticmethod
    def _block(cfg: RegressorConfig, in_ch: int, width: int, stride: int) -> nn.Module:
        if cfg.kind == "resnet34":
            return BasicBlock(in_ch, width, stride)
        per_group = max(1, cfg.group_width * width // 64)
        return BottleneckBlock(in_ch, width, stride, per_group * cfg.cardinality, cfg.cardinality)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, BasicBlock | BottleneckBlock):
                last = module.body[-1]
                nn.init.zeros_(last[1].weight)

    def checkpoint_stages(self) -> list[str]:
        """The four residual stages (for :mod:`hpcdeconv.models.checkpointing`)."""
        return ["layer1", "layer2", "layer3", "layer4"]

    def forward(self, x: Tensor) -> Tensor:
        """(B, 1, Y, X) raw patches, ``Y, X >= 32`` → (B, outputs).

        Raises
        ------
        ValueError
            Not ``(B, 1, Y, X)``, or a side below 32 pixels.
        """
        if x.ndim != 4 or x.shape[1] != 1 or min(x.shape[2:]) < MIN_SIZE:
            raise ValueError(
                f"the regressor takes (B, 1, Y, X) patches with Y, X >= {MIN_SIZE}, "
                f"got {tuple(x.shape)}"
            )
        flat = x.flatten(1)
        mean = flat.mean(dim=1)[:, None, None, None]
        std = flat.std(dim=1, correction=0)[:, None, None, None]
        x = (x - mean) / (std + _EPS)
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.head(self.pool(x).flatten(1))


def build_regressor(cfg: RegressorConfig, outputs: int, checkpointing: bool = False) -> Regressor:
    """The configured regressor; its stages recomputed in the backward pass if
    ``checkpointing`` (activation checkpointing, :mod:`hpcdeconv.models.checkpointing`)."""
    net = Regressor(cfg, outputs)
    if checkpointing:
        from hpcdeconv.models.checkpointing import apply_checkpointing

        apply_checkpointing(net)
    return net
