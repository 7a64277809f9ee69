"""Method configurations: a tagged union, one class per method."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import (
    Field,
    Tag,
    model_validator,
)

from hpcdeconv.config.base import PositiveFloat, Shape, StrictModel, tagged_by
from hpcdeconv.config.networks import (
    DiscriminatorConfig,
    GeneratorConfig,
    RegressorConfig,
    ResNetConfig,
    UNetConfig,
)
from hpcdeconv.config.perceptual import ContentLossConfig

#: Adversarial losses: the original log loss (``gan``, Goodfellow et al. 2014, as COMI),
#: least squares (``lsgan``) or Wasserstein with gradient penalty (``wgan-gp``).
AdversarialKind = Literal["gan", "lsgan", "wgan-gp"]


class KernelConfig(StrictModel):
    """The learnable (blind) or fixed (non-blind) linear blur path ``h``.

    ``size`` has one side per spatial axis of the training data: ``(Z, Y, X)`` for
    volumes, ``(Y, X)`` for 2D images (checked when the method is built).
    ``penalty_weight`` is λ of the generator loss term ``λ Q(h)``.
    """

    size: Shape = (31, 31, 31)
    init: Literal["delta", "gaussian", "file", "dataset"] = "gaussian"
    sigma: PositiveFloat = 2.0
    file: Path | None = None
    constraint: Literal["none", "simplex"] = "none"
    penalty: Literal["none", "l1", "tv"] = "none"
    penalty_weight: Annotated[float, Field(ge=0)] = 0.0

    @model_validator(mode="after")
    def _file_given(self) -> KernelConfig:
        if self.init == "file" and self.file is None:
            raise ValueError("init: file needs kernel.file")
        return self


class KnownKernelConfig(KernelConfig):
    """The fixed blur path of non-blind training: the dataset's PSF or a file."""

    init: Literal["file", "dataset"] = "dataset"


class GANLossConfig(StrictModel):
    """Generator loss ``L_adv + cycle_weight L_cycle + identity_weight L_identity`` (+ λ Q(h)).

    ``identity_weight`` weighs ``‖G(x) − x‖₁`` on sharp images (and ``‖F(y) − y‖₁`` for a
    deep blurring generator F); 0, the default, does not compute the term.
    ``pool_size`` is the number of past fakes kept per judged domain for the
    discriminator step.
    """

    adversarial: AdversarialKind = "lsgan"
    gp_eta: PositiveFloat = 10.0
    cycle_weight: Annotated[float, Field(ge=0)] = 10.0
    identity_weight: Annotated[float, Field(ge=0)] = 0.0
    pool_size: Annotated[int, Field(ge=0)] = 50


class _CycleFamilyConfig(StrictModel):
    """What every cycleGAN method configures: G_Θ, the discriminators of the judged
    domains and the GAN loss; the subclass adds its blurring path."""

    name: str
    #: Kind of training data (``data.kind``) the method trains on.
    data_kind: ClassVar[str] = "domains"
    generator: GeneratorConfig = Field(default_factory=UNetConfig)
    discriminator: DiscriminatorConfig = Field(default_factory=DiscriminatorConfig)
    loss: GANLossConfig = Field(default_factory=GANLossConfig)


class BlindCycleGANConfig(_CycleFamilyConfig):
    """cycleGAN with a learnable linear blur kernel (seed paper eq. 13)."""

    name: Literal["blind_cyclegan"] = "blind_cyclegan"
    kernel: KernelConfig = Field(default_factory=KernelConfig)


class NonBlindCycleGANConfig(_CycleFamilyConfig):
    """cycleGAN with the known PSF as a fixed blur path (seed paper eqs. 15-18)."""

    name: Literal["nonblind_cyclegan"] = "nonblind_cyclegan"
    kernel: KnownKernelConfig = Field(default_factory=KnownKernelConfig)


class CycleGANConfig(_CycleFamilyConfig):
    """Conventional cycleGAN: a second deep generator for the blurring direction."""

    name: Literal["cyclegan"] = "cyclegan"
    blur_generator: GeneratorConfig = Field(default_factory=UNetConfig)


def _comi_generator() -> ResNetConfig:
    # The authors' generator: tanh head with the input added (a learned correction).
    return ResNetConfig(final_activation="tanh", global_residual=True)


class COMILossConfig(GANLossConfig):
    """COMI's generator loss ``λ1·l_GAN + λ2·l_content + λ3·l_cycle`` (+ identity).

    Zhang et al., CSBJ 20, 2022: the log-loss GAN term, the L2 distance of VGG-19
    feature maps (``content``, see :class:`ContentLossConfig`) and the L1 cycle term,
    weighted ``(λ1, λ2, λ3) = (1, 1, 0.001)`` by default;
    ``identity_weight`` adds ``‖G(x) − x‖₁ + ‖F(y) − y‖₁``.
    """

    adversarial: AdversarialKind = "gan"
    adversarial_weight: Annotated[float, Field(ge=0)] = 1.0
    content_weight: Annotated[float, Field(ge=0)] = 1.0
    cycle_weight: Annotated[float, Field(ge=0)] = 0.001


class COMIConfig(_CycleFamilyConfig):
    """COMI: 2D cycleGAN correction of out-of-focus images (Zhang et al., CSBJ 2022).

    Generators G (out-of-focus → in-focus) and F (back) are ResNets (tanh head with a
    global residual), each domain is judged by a 70×70 PatchGAN, and the loss is
    :class:`COMILossConfig`. Trains on unpaired domains (``data.kind: domains``, the
    paper's cycleGAN) or on paired planes (``data.kind: paired``, as the published code).
    """

    name: Literal["comi"] = "comi"
    #: Data kinds besides :attr:`data_kind` the method trains on.
    also_data_kinds: ClassVar[tuple[str, ...]] = ("paired",)
    generator: GeneratorConfig = Field(default_factory=_comi_generator)
    blur_generator: GeneratorConfig = Field(default_factory=_comi_generator)
    discriminator: DiscriminatorConfig = Field(
        default_factory=lambda: DiscriminatorConfig(
            channels=64, n_layers=3, n_scales=1, head_kernel=4
        )
    )
    loss: COMILossConfig = Field(default_factory=COMILossConfig)
    content: ContentLossConfig = Field(default_factory=ContentLossConfig)


class SupervisedConfig(StrictModel):
    """Generator on paired data: MSE, plus an adversarial term if ``adversarial_weight`` > 0.

    ``adversarial`` (LSGAN or WGAN-GP with gradient-penalty weight ``gp_eta``) is the
    loss of that term and of its discriminator.
    """

    name: Literal["supervised"] = "supervised"
    #: Kind of training data (``data.kind``) the method trains on.
    data_kind: ClassVar[str] = "paired"
    generator: GeneratorConfig = Field(default_factory=UNetConfig)
    discriminator: DiscriminatorConfig = Field(default_factory=DiscriminatorConfig)
    adversarial_weight: Annotated[float, Field(ge=0)] = 0.0
    adversarial: AdversarialKind = "lsgan"
    gp_eta: PositiveFloat = 10.0


class PSFRegressionConfig(StrictModel):
    """CNN regression of PSF-model parameters from an image patch (Shajkofci & Liebling,
    IEEE TIP 29, 2020): network and the weight ``gamma`` (γ) of the validity term of
    eq. 11, ``γ(a0 − â0)² + (1 − a0)/(2N) Σ_n (a_n − â_n)²``."""

    name: Literal["psf_regression"] = "psf_regression"
    #: Kind of training data (``data.kind``) the method trains on.
    data_kind: ClassVar[str] = "psf_samples"
    network: RegressorConfig = Field(default_factory=RegressorConfig)
    gamma: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0


MethodConfig = Annotated[
    Annotated[BlindCycleGANConfig, Tag("blind_cyclegan")]
    | Annotated[NonBlindCycleGANConfig, Tag("nonblind_cyclegan")]
    | Annotated[CycleGANConfig, Tag("cyclegan")]
    | Annotated[COMIConfig, Tag("comi")]
    | Annotated[SupervisedConfig, Tag("supervised")]
    | Annotated[PSFRegressionConfig, Tag("psf_regression")],
    tagged_by("name", "blind_cyclegan"),
]


#: Method configuration class by ``method.name``.
METHOD_CONFIGS: dict[str, type[StrictModel]] = {
    "blind_cyclegan": BlindCycleGANConfig,
    "nonblind_cyclegan": NonBlindCycleGANConfig,
    "cyclegan": CycleGANConfig,
    "comi": COMIConfig,
    "supervised": SupervisedConfig,
    "psf_regression": PSFRegressionConfig,
}
