"""Network configurations: generators (a tagged union on ``kind``) and discriminators.

Each generator configuration knows the patch sizes its network accepts
(:meth:`size_multiple`, :meth:`check_patch`), so the experiment checks a patch against
any generator without knowing which one it is.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Field, Tag

from hpcdeconv.config.base import PositiveInt, StrictModel, tagged_by

FinalActivation = Literal["sigmoid", "tanh", "none"]
Upsample = Literal["transpose", "resize"]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _check_multiple(
    patch: tuple[int, ...], key: str, multiple: int, field: str, halvings: int
) -> None:
    if any(p % multiple for p in patch):
        nearest = [_round_up(p, multiple) for p in patch]
        raise ValueError(
            f"data.patch {list(patch)} must be a multiple of {multiple} along every axis "
            f"({key}.{field}={halvings} halves it {halvings} times), e.g. {nearest}"
        )


class _GeneratorSettings(StrictModel):
    """The settings every generator has (:func:`hpcdeconv.models.factory.build_generator`
    passes them alike)."""

    kind: str
    # "data": the untrained output starts at the training data's mean of the domain it
    # maps into (each network's start_at; a ResNet with a global residual starts as the
    # identity instead); "default": PyTorch's initialisation, where a sigmoid head starts
    # at 0.5 whatever the data. Only a fresh run's start changes; resuming loads the
    # weights over it.
    head_init: Literal["data", "default"] = "data"
    # Instance norm (the papers' choice) makes outputs depend on the whole tile;
    # "none" gives a strictly local network whose tiled inference is exact.
    norm: Literal["instance", "none"] = "instance"
    # "transpose": a stride-2 transposed convolution (the papers'); "resize":
    # nearest-neighbour doubling then a 3-wide convolution (no checkerboard grid).
    upsample: Upsample = "transpose"


class UNetConfig(_GeneratorSettings):
    """U-Net of the seed paper (two 3x3x3 conv-IN-ReLU per level, skip per level)."""

    kind: Literal["unet"] = "unet"
    channels: PositiveInt = 16
    depth: PositiveInt = 3
    final_activation: FinalActivation = "sigmoid"

    def size_multiple(self) -> int:
        """Every side of an input must be a multiple of this (``2**depth``)."""
        return 2**self.depth

    def check_patch(self, patch: tuple[int, ...], key: str) -> None:
        """Raise ValueError unless the U-Net can train on ``patch``.

        A U-Net of depth ``d`` halves a patch ``d`` times: every side a multiple of
        ``2**d``, and instance normalisation needs more than one voxel at the bottleneck.

        Parameters
        ----------
        patch
            (Y, X) or (Z, Y, X) in voxels.
        key
            Where this configuration sits (``"method.generator"``), for the message.
        """
        multiple = self.size_multiple()
        _check_multiple(patch, key, multiple, "depth", self.depth)
        bottleneck = [p // multiple for p in patch]
        if self.norm == "instance" and bottleneck.count(1) == len(patch):
            raise ValueError(
                f"data.patch {list(patch)} leaves one voxel at the bottleneck of {key} "
                f"(depth {self.depth}), too few for instance normalisation; use a patch with "
                f"one side >= {2 * multiple}"
            )


class ResNetConfig(_GeneratorSettings):
    """ResNet generator of Johnson et al. 2016 as cycleGAN and COMI use it: c7s1-k stem,
    stride-2 down-sampling, residual blocks (reflection padding, instance norm), ×2
    up-sampling and a c7s1 head."""

    kind: Literal["resnet"] = "resnet"
    channels: PositiveInt = 64
    n_downsampling: Annotated[int, Field(ge=0)] = 2
    n_blocks: PositiveInt = 9
    # tanh for data in (-1, 1), as in cycleGAN and COMI.
    final_activation: FinalActivation = "tanh"
    # COMI adds the input to the output: the network learns the correction.
    global_residual: bool = False

    def size_multiple(self) -> int:
        """Every side of an input must be a multiple of this (``2**n_downsampling``)."""
        return 2**self.n_downsampling

    def min_size(self) -> int:
        """Smallest side: reflection padding needs more voxels than it pads (3 at the
        stem, 1 in the residual blocks at the coarsest level)."""
        return max(4, 2 * self.size_multiple())

    def check_patch(self, patch: tuple[int, ...], key: str) -> None:
        """Raise ValueError unless the ResNet generator can train on ``patch``.

        Every side must be a multiple of ``2**n_downsampling`` and at least
        :meth:`min_size` (which also leaves instance normalisation more than one voxel).

        Parameters
        ----------
        patch
            (Y, X) or (Z, Y, X) in voxels.
        key
            Where this configuration sits (``"method.generator"``), for the message.
        """
        _check_multiple(patch, key, self.size_multiple(), "n_downsampling", self.n_downsampling)
        if min(patch) < self.min_size():
            raise ValueError(
                f"data.patch {list(patch)} is too small for {key} (n_downsampling="
                f"{self.n_downsampling}): reflection padding needs every side >= "
                f"{self.min_size()}"
            )


#: Any generator: ``kind: unet`` (the default when ``kind`` is absent) or ``kind: resnet``.
GeneratorConfig = Annotated[
    Annotated[UNetConfig, Tag("unet")] | Annotated[ResNetConfig, Tag("resnet")],
    tagged_by("kind", "unet"),
]


class DiscriminatorConfig(StrictModel):
    """Multi-scale PatchGAN: independent discriminators at 1, 1/2, 1/4 resolution.

    ``head_kernel`` is the kernel of the two last (stride-1) convolutions: 3 (default) or
    4, Isola et al.'s, with which ``n_layers: 3, n_scales: 1`` is their 70×70 PatchGAN
    (see :class:`hpcdeconv.models.discriminators.PatchGAN`).
    """

    channels: PositiveInt = 16
    n_layers: PositiveInt = 3
    n_scales: PositiveInt = 3
    head_kernel: Literal[3, 4] = 3

    def reduction(self) -> int:
        """Factor by which the coarsest patch map is smaller than the input per axis."""
        return 2**self.n_layers * 2 ** (self.n_scales - 1)

    def check_patch(self, patch: tuple[int, ...], key: str) -> None:
        """Raise ValueError unless every scale gives at least one score per axis and the
        coarsest two in all (the rule of
        :func:`hpcdeconv.models.discriminators.check_patch_input`).

        Parameters
        ----------
        patch
            (Y, X) or (Z, Y, X) in voxels.
        key
            Where this configuration sits (``"method.discriminator"``), for the message.
        """
        reduction = self.reduction()
        shrink = 2 * (self.head_kernel - 3)
        scores = [p // reduction - shrink for p in patch]
        if min(scores) < 1 or math.prod(scores) < 2:
            smallest = reduction * (1 + shrink)
            raise ValueError(
                f"data.patch {list(patch)} is too small for {key} "
                f"(n_layers={self.n_layers}, n_scales={self.n_scales}"
                f"{', head_kernel=4' if shrink else ''} reduce it {reduction}x): every side "
                f"must be >= {smallest} and one >= {smallest + reduction}"
            )


class RegressorConfig(StrictModel):
    """Image-to-vector CNN of PSF-parameter regression (Shajkofci & Liebling 2020, Sec. III-B).

    ``kind``: ResNet-34 (He et al. 2016: basic blocks ``[3, 4, 6, 3]``) or ResNeXt-50
    (Xie et al. 2017: bottleneck blocks ``[3, 4, 6, 3]``, ``cardinality`` groups of
    ``group_width`` channels at ``width`` 64). ``width`` is the stem's channels and the
    first stage's width (64 in the papers; e.g. 16 for CPU runs); each later stage doubles
    it. See :class:`hpcdeconv.models.regressor.Regressor`.
    """

    kind: Literal["resnet34", "resnext50"] = "resnet34"
    width: PositiveInt = 64
    cardinality: PositiveInt = 32
    group_width: PositiveInt = 4
