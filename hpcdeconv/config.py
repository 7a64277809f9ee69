"""Typed configuration: pydantic models loaded from YAML with ``--set a.b=c`` overrides.

Every model forbids unknown keys; a misspelled key is reported with its dotted path and
the closest valid name. Models are frozen: a run's configuration never changes after it
has been loaded, and the resolved form is written next to the run's outputs.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from hpcdeconv.errors import ConfigError

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Shape3D = tuple[PositiveInt, PositiveInt, PositiveInt]
Spacing3D = tuple[PositiveFloat, PositiveFloat, PositiveFloat]


class StrictModel(BaseModel):
    """Base of every configuration model: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------
# Point-spread functions. Lengths are in micrometres; shapes and spacings are (Z, Y, X).
# --------------------------------------------------------------------------------------


class _Optics(StrictModel):
    """Objective and sampling shared by the 3D widefield PSF models."""

    shape: Shape3D = (31, 31, 31)
    voxel_size: Spacing3D = (0.1, 0.1, 0.1)
    na: PositiveFloat = 1.4
    n_immersion: PositiveFloat = 1.5
    wavelength: PositiveFloat = 0.5

    @model_validator(mode="after")
    def _na_below_index(self) -> _Optics:
        if self.na >= self.n_immersion:
            raise ValueError(f"na={self.na} must be smaller than n_immersion={self.n_immersion}")
        return self


class BornWolfPSF(_Optics):
    """Scalar Born & Wolf PSF; ``paraxial`` selects the seed paper's quadratic defocus."""

    model: Literal["born_wolf"] = "born_wolf"
    paraxial: bool = True


class RichardsWolfPSF(_Optics):
    """Vectorial Richards & Wolf PSF, unpolarised light, aplanatic apodisation."""

    model: Literal["richards_wolf"] = "richards_wolf"


class GibsonLanniPSF(_Optics):
    """Gibson & Lanni PSF with a refractive-index mismatch between immersion and sample."""

    model: Literal["gibson_lanni"] = "gibson_lanni"
    n_immersion: PositiveFloat = 1.515
    n_sample: PositiveFloat = 1.33
    n_coverslip: PositiveFloat = 1.515
    n_coverslip_design: PositiveFloat = 1.515
    n_immersion_design: PositiveFloat = 1.515
    coverslip_thickness: PositiveFloat = 170.0
    coverslip_thickness_design: PositiveFloat = 170.0
    working_distance_design: PositiveFloat = 150.0
    particle_depth: Annotated[float, Field(ge=0)] = 0.0


class GaussianPSF(StrictModel):
    """Anisotropic Gaussian PSF; ``sigma`` in voxels, one per axis (2 or 3 axes)."""

    model: Literal["gaussian"] = "gaussian"
    shape: tuple[PositiveInt, ...] = (31, 31, 31)
    voxel_size: tuple[PositiveFloat, ...] = (0.1, 0.1, 0.1)
    sigma: tuple[PositiveFloat, ...] = (2.0, 1.0, 1.0)

    @model_validator(mode="after")
    def _same_rank(self) -> GaussianPSF:
        if not (len(self.shape) == len(self.voxel_size) == len(self.sigma)) or len(
            self.shape
        ) not in (2, 3):
            raise ValueError("shape, voxel_size and sigma must all have 2 or all have 3 entries")
        return self


class ZernikePSF(StrictModel):
    """2D PSF of a Zernike-expanded pupil, e.g. at one defocus plane.

    ``coefficients`` maps Noll indices to amplitudes in waves (RMS-normalised Zernikes).
    ``cylinder_power`` and ``axis_angle`` (degrees) add astigmatism in the form used by
    the PSF-regression paper; ``defocus`` is an axial offset in micrometres.
    """

    model: Literal["zernike"] = "zernike"
    shape: tuple[PositiveInt, PositiveInt] = (64, 64)
    pixel_size: PositiveFloat = 0.1
    na: PositiveFloat = 1.4
    n_immersion: PositiveFloat = 1.5
    wavelength: PositiveFloat = 0.5
    defocus: float = 0.0
    cylinder_power: float = 0.0
    axis_angle: float = 0.0
    coefficients: dict[Annotated[int, Field(ge=1)], float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _na_below_index(self) -> ZernikePSF:
        if self.na >= self.n_immersion:
            raise ValueError(f"na={self.na} must be smaller than n_immersion={self.n_immersion}")
        return self


def _psf_tag(value: Any) -> str:
    """Tag of a PSF config; a mapping without ``model`` is a Born & Wolf PSF."""
    if isinstance(value, Mapping):
        return str(value.get("model", "born_wolf"))
    return str(getattr(value, "model", "born_wolf"))


PSFConfig = Annotated[
    Annotated[BornWolfPSF, Tag("born_wolf")]
    | Annotated[RichardsWolfPSF, Tag("richards_wolf")]
    | Annotated[GibsonLanniPSF, Tag("gibson_lanni")]
    | Annotated[GaussianPSF, Tag("gaussian")]
    | Annotated[ZernikePSF, Tag("zernike")],
    Discriminator(_psf_tag),
]


class PSFFileConfig(StrictModel):
    """Top level of a ``hpcdeconv psf`` configuration file."""

    psf: PSFConfig = Field(default_factory=BornWolfPSF)


# --------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------


class PhantomConfig(StrictModel):
    """Synthetic 3D microtubule network (random smooth tubular filaments)."""

    kind: Literal["microtubules"] = "microtubules"
    filaments_per_mvoxel: PositiveFloat = 60.0
    radius: PositiveFloat = 1.2
    intensity_range: tuple[PositiveFloat, PositiveFloat] = (0.4, 1.0)
    stiffness: PositiveFloat = 0.9


class NoiseConfig(StrictModel):
    """Poisson + Gaussian noise at a requested average SNR (dB), seed paper's definition."""

    snr_db: float | None = 20.0
    poisson_weight: Annotated[float, Field(ge=0, le=1)] = 0.5


class CodecConfig(StrictModel):
    """Blosc compression of zarr chunks."""

    cname: Literal["zstd", "lz4", "lz4hc", "zlib", "blosclz"] = "zstd"
    clevel: Annotated[int, Field(ge=0, le=9)] = 3
    shuffle: Literal["shuffle", "bitshuffle", "noshuffle"] = "bitshuffle"


class StorageConfig(StrictModel):
    """How volumes are laid out on disk."""

    chunks: Shape3D = (64, 64, 64)
    codec: CodecConfig = Field(default_factory=CodecConfig)


class SplitConfig(StrictModel):
    """Number of volumes per split."""

    train: Annotated[int, Field(ge=0)] = 4
    val: Annotated[int, Field(ge=0)] = 1
    test: Annotated[int, Field(ge=0)] = 1


class SimulateConfig(StrictModel):
    """Top level of a ``hpcdeconv simulate`` configuration file."""

    shape: Shape3D = (64, 128, 128)
    split: SplitConfig = Field(default_factory=SplitConfig)
    psf: PSFConfig = Field(default_factory=BornWolfPSF)
    phantom: PhantomConfig = Field(default_factory=PhantomConfig)
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    seed: int = 0

    @model_validator(mode="after")
    def _psf_fits(self) -> SimulateConfig:
        if self.split.train + self.split.val + self.split.test == 0:
            raise ValueError("split must hold at least one volume")
        if len(self.psf.shape) != 3:
            raise ValueError("simulation needs a 3D PSF")
        if any(p > s for p, s in zip(self.psf.shape, self.shape, strict=True)):
            raise ValueError(f"psf.shape {self.psf.shape} is larger than the volume {self.shape}")
        return self


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Turn ``["a.b=3", "c=[1, 2]"]`` into a nested dict; values are parsed as YAML scalars.

    Parameters
    ----------
    items
        Strings of the form ``dotted.key=value``.

    Returns
    -------
    dict
        Nested mapping, e.g. ``{"a": {"b": 3}, "c": [1, 2]}``.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base``; mappings merge, the rest replaces."""
    merged: dict[str, Any] = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _walk(
    model: type[BaseModel], data: Mapping[str, Any], loc: Sequence[Any]
) -> tuple[list[str], list[str]]:
    """Follow a pydantic error location through ``model``.

    Returns the valid field names of the (sub)model reached and the location as the
    user wrote it (union tags that pydantic inserts are dropped).
    """
    current: Any = model
    node: Any = data
    shown: list[str] = []
    for part in loc:
        if isinstance(part, int):
            node = node[part] if isinstance(node, list | tuple) and part < len(node) else None
            shown.append(str(part))
            continue
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            tagged = [c for c in _union_members(current) if _tag_of(c) == part]
            if tagged:
                current = tagged[0]
                continue
            shown.append(str(part))
            return [], shown
        shown.append(part)
        current = fields[part].annotation
        node = node.get(part) if isinstance(node, Mapping) else None
    return list(getattr(current, "model_fields", {})), shown


def _union_members(annotation: Any) -> list[type[BaseModel]]:
    """Model classes inside a (possibly ``Annotated``, possibly tagged) union annotation."""
    found: list[type[BaseModel]] = []
    stack = [annotation]
    while stack:
        item = stack.pop()
        if isinstance(item, type) and issubclass(item, BaseModel):
            found.append(item)
        elif get_origin(item) is not None:
            stack.extend(a for a in get_args(item) if not isinstance(a, Tag | Discriminator))
    return found


def _tag_of(model: type[BaseModel]) -> Any:
    """The discriminating literal of a union member: its ``model`` or ``name`` default."""
    for key in ("model", "name"):
        field = model.model_fields.get(key)
        if field is not None:
            return field.default
    return None


def _format_error(model: type[BaseModel], data: Mapping[str, Any], exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = list(err["loc"])
    valid, shown = _walk(model, data, loc[:-1] if err["type"] == "extra_forbidden" else loc)
    path = ".".join([*shown, str(loc[-1])] if err["type"] == "extra_forbidden" else shown)
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
        return f"unknown configuration key '{path}'{hint}"
    msg = err["msg"].removeprefix("Value error, ")
    if not path:  # a rule across several keys: the message names them
        return f"invalid configuration: {msg}"
    return f"invalid configuration value at '{path}': {msg}"


def build_config(model: type[M], data: Mapping[str, Any] | None = None) -> M:
    """Validate ``data`` against ``model``; errors become one-line :class:`ConfigError`."""
    data = dict(data or {})
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(model, data, exc)) from None


def load_config(model: type[M], path: str | Path | None = None, overrides: Sequence[str] = ()) -> M:
    """Load a YAML file (optional), apply ``--set`` overrides and validate.

    Parameters
    ----------
    model
        The pydantic model of the top level, e.g. :class:`SimulateConfig`.
    path
        YAML file; ``None`` starts from the model's defaults.
    overrides
        ``dotted.key=value`` strings applied after the file.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"configuration file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
        if loaded is not None and not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = dict(loaded or {})
    data = deep_merge(data, parse_overrides(overrides))
    return build_config(model, data)


def dump_config(config: BaseModel, path: str | Path) -> None:
    """Write the fully resolved configuration as YAML (tuples become lists)."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


# --------------------------------------------------------------------------------------
# Training: data, networks, methods, optimisation, strategy
# --------------------------------------------------------------------------------------


class DataConfig(StrictModel):
    """Where training patches come from and how they are drawn."""

    path: Path = Path("data.zarr")
    patch: Shape3D = (64, 64, 64)
    batch_size: PositiveInt = 1
    num_workers: Annotated[int, Field(ge=0)] = 0
    augment: bool = True
    val_volumes: Annotated[int, Field(ge=0)] = 1


class UNetConfig(StrictModel):
    """3D U-Net of the seed paper (two 3x3x3 conv-IN-ReLU per level, skip per level)."""

    channels: PositiveInt = 16
    depth: PositiveInt = 3
    final_activation: Literal["sigmoid", "none"] = "sigmoid"
    # "data": the untrained output starts at the training data's mean of the domain it
    # maps into (UNet.start_at); "default": PyTorch's initialisation, where a sigmoid head
    # starts at 0.5 whatever the data. Only a fresh run's start changes; resuming loads
    # the weights over it.
    head_init: Literal["data", "default"] = "data"
    # Instance norm (the paper's choice) makes outputs depend on the whole tile;
    # "none" gives a strictly local network whose tiled inference is exact.
    norm: Literal["instance", "none"] = "instance"


class KernelConfig(StrictModel):
    """The learnable (blind) or fixed (non-blind) linear blur path ``h``."""

    size: Shape3D = (31, 31, 31)
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


class DiscriminatorConfig(StrictModel):
    """Multi-scale 3D PatchGAN: independent discriminators at 1, 1/2, 1/4 resolution."""

    channels: PositiveInt = 16
    n_layers: PositiveInt = 3
    n_scales: PositiveInt = 3


class GANLossConfig(StrictModel):
    """Adversarial and cycle terms: ``L = L_adv + gamma * L_cycle (+ lambda Q(h))``."""

    adversarial: Literal["lsgan", "wgan-gp"] = "lsgan"
    gp_eta: PositiveFloat = 10.0
    cycle_weight: Annotated[float, Field(ge=0)] = 10.0
    pool_size: Annotated[int, Field(ge=0)] = 50


class BlindCycleGANConfig(StrictModel):
    """cycleGAN with a learnable linear blur kernel (seed paper eq. 13)."""

    name: Literal["blind_cyclegan"] = "blind_cyclegan"
    generator: UNetConfig = Field(default_factory=UNetConfig)
    kernel: KernelConfig = Field(default_factory=KernelConfig)
    discriminator: DiscriminatorConfig = Field(default_factory=DiscriminatorConfig)
    loss: GANLossConfig = Field(default_factory=GANLossConfig)


class NonBlindCycleGANConfig(StrictModel):
    """cycleGAN with the known PSF as a fixed blur path (seed paper eqs. 15-18)."""

    name: Literal["nonblind_cyclegan"] = "nonblind_cyclegan"
    generator: UNetConfig = Field(default_factory=UNetConfig)
    kernel: KnownKernelConfig = Field(default_factory=KnownKernelConfig)
    discriminator: DiscriminatorConfig = Field(default_factory=DiscriminatorConfig)
    loss: GANLossConfig = Field(default_factory=GANLossConfig)


class CycleGANConfig(StrictModel):
    """Conventional cycleGAN: a second deep generator for the blurring direction."""

    name: Literal["cyclegan"] = "cyclegan"
    generator: UNetConfig = Field(default_factory=UNetConfig)
    blur_generator: UNetConfig = Field(default_factory=UNetConfig)
    discriminator: DiscriminatorConfig = Field(default_factory=DiscriminatorConfig)
    loss: GANLossConfig = Field(default_factory=GANLossConfig)


class SupervisedConfig(StrictModel):
    """U-Net on paired data: MSE, plus an LSGAN term if ``adversarial_weight`` > 0."""

    name: Literal["supervised"] = "supervised"
    generator: UNetConfig = Field(default_factory=UNetConfig)
    discriminator: DiscriminatorConfig = Field(default_factory=DiscriminatorConfig)
    adversarial_weight: Annotated[float, Field(ge=0)] = 0.0


def _method_tag(value: Any) -> str:
    if isinstance(value, Mapping):
        return str(value.get("name", "blind_cyclegan"))
    return str(getattr(value, "name", "blind_cyclegan"))


MethodConfig = Annotated[
    Annotated[BlindCycleGANConfig, Tag("blind_cyclegan")]
    | Annotated[NonBlindCycleGANConfig, Tag("nonblind_cyclegan")]
    | Annotated[CycleGANConfig, Tag("cyclegan")]
    | Annotated[SupervisedConfig, Tag("supervised")],
    Discriminator(_method_tag),
]


class OptimConfig(StrictModel):
    """Adam per network; linear decay to zero from ``decay_start`` (a step) if set."""

    #: Finite and below float32's largest value: optimiser states are float32 tensors.
    lr: Annotated[float, Field(gt=0, lt=3.4e38, allow_inf_nan=False)] = 1e-4
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (
        0.5,
        0.999,
    )
    decay_start: Annotated[int, Field(ge=0)] | None = None


class TrainConfig(StrictModel):
    """The loop: budget, precision, cadence of validation/checkpoints/logs."""

    steps: PositiveInt = 200
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_checkpointing: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    deterministic: bool = False
    log_every: PositiveInt = 10
    val_every: PositiveInt = 100
    ckpt_every: PositiveInt = 100
    keep_checkpoints: PositiveInt = 2
    image_every: PositiveInt = 100
    val_tile: Shape3D = (64, 64, 64)
    val_overlap: Annotated[int, Field(ge=0)] = 16
    #: Validation metric that selects the ``best`` checkpoint (higher is better);
    #: ``"none"`` keeps no best checkpoint.
    best_metric: Literal["psnr", "ssim", "none"] = "psnr"
    #: Decay of an exponential moving average of G_Θ's weights, kept, validated and saved
    #: beside the trained weights (e.g. 0.999); ``None`` keeps none.
    ema_decay: Annotated[float, Field(gt=0, lt=1)] | None = None
    #: Fixed centred (Z, Y, X) crop of every validation volume (clamped to the volume), so
    #: each evaluation scores the same voxels at a fraction of the cost; ``None``: whole volumes.
    val_crop: Shape3D | None = None

    @model_validator(mode="after")
    def _val_crop_fits_ssim(self) -> TrainConfig:
        # SSIM's Gaussian window (sigma 1.5 voxels) spans 11 voxels per axis.
        if self.val_crop is not None and min(self.val_crop) < 11:
            raise ValueError(
                f"val_crop {list(self.val_crop)} must be at least 11 voxels along every axis "
                "(the SSIM window)"
            )
        return self


class DeepSpeedConfig(StrictModel):
    """DeepSpeed engine settings; precision comes from ``train.precision`` only."""

    zero_stage: Annotated[int, Field(ge=0, le=3)] = 1
    #: Extra DeepSpeed JSON keys (e.g. ``zero_optimization.overlap_comm``); keys that
    #: contradict the YAML (precision, batch size, optimizer) are rejected.
    extra: dict[str, Any] = Field(default_factory=dict)


class StrategyConfig(StrictModel):
    """How the method's networks are distributed (the method is unaware of it)."""

    name: Literal["single", "ddp", "deepspeed"] = "single"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: PositiveFloat = 120.0
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _unets(method: BaseModel) -> list[tuple[str, UNetConfig]]:
    """``(key, config)`` of every U-Net a method trains on ``data.patch``."""
    nets = [("method.generator", method.generator)]  # type: ignore[attr-defined]
    if isinstance(method, CycleGANConfig):
        nets.append(("method.blur_generator", method.blur_generator))
    return nets


def _check_patch_for_unet(patch: tuple[int, ...], key: str, net: UNetConfig) -> None:
    """A U-Net of depth ``d`` halves a patch ``d`` times: every side a multiple of ``2**d``,
    and instance normalisation needs more than one voxel at the bottleneck."""
    multiple = 2**net.depth
    if any(p % multiple for p in patch):
        nearest = [_round_up(p, multiple) for p in patch]
        raise ValueError(
            f"data.patch {list(patch)} must be a multiple of {multiple} along every axis "
            f"({key}.depth={net.depth} halves it {net.depth} times), e.g. {nearest}"
        )
    bottleneck = [p // multiple for p in patch]
    if net.norm == "instance" and bottleneck.count(1) == len(patch):
        raise ValueError(
            f"data.patch {list(patch)} leaves one voxel at the bottleneck of {key} "
            f"(depth {net.depth}), too few for instance normalisation; use a patch with "
            f"one side >= {2 * multiple}"
        )


def _check_patch_for_discriminator(patch: tuple[int, ...], disc: DiscriminatorConfig) -> None:
    """Same rule as :func:`hpcdeconv.models.discriminators.check_patch_input` at the
    coarsest scale: at least one score per axis and two in all."""
    reduction = 2**disc.n_layers * 2 ** (disc.n_scales - 1)
    scores = [p // reduction for p in patch]
    if min(scores) < 1 or math.prod(scores) < 2:
        raise ValueError(
            f"data.patch {list(patch)} is too small for method.discriminator "
            f"(n_layers={disc.n_layers}, n_scales={disc.n_scales} reduce it {reduction}x): "
            f"every side must be >= {reduction} and one >= {2 * reduction}"
        )


class ExperimentConfig(StrictModel):
    """Top level of ``hpcdeconv train``.

    Sizes the networks constrain (``data.patch``, ``train.val_overlap``) are checked here,
    so a run that cannot take its first step is refused before anything is created.
    """

    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=BlindCycleGANConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    output: Path = Path("runs/blind")

    @model_validator(mode="after")
    def _sizes_fit_networks(self) -> ExperimentConfig:
        patch = self.data.patch
        for key, net in _unets(self.method):
            _check_patch_for_unet(patch, key, net)
        uses_discriminator = not isinstance(self.method, SupervisedConfig) or (
            self.method.adversarial_weight > 0
        )
        if uses_discriminator:
            _check_patch_for_discriminator(patch, self.method.discriminator)
        if (
            self.train.ema_decay is not None
            and self.strategy.name == "deepspeed"
            and self.strategy.deepspeed.zero_stage == 3
        ):
            raise ValueError(
                "train.ema_decay needs whole weights on every rank; ZeRO stage 3 partitions "
                "them: use strategy.deepspeed.zero_stage 0-2 or no EMA"
            )
        # Validation tiles are rounded up to the deblurring U-Net's multiple (inference
        # pads them), so only the overlap can make validation fail.
        multiple = 2**self.method.generator.depth
        tile = [_round_up(t, multiple) for t in self.train.val_tile]
        if self.train.val_overlap >= min(tile):
            raise ValueError(
                f"train.val_overlap {self.train.val_overlap} must be smaller than every side "
                f"of train.val_tile {list(self.train.val_tile)} (rounded up to multiples of "
                f"{multiple}: {tile})"
            )
        return self


class ClusterConfig(StrictModel):
    """Where the dask workers of ``hpcdeconv deconvolve`` / ``rl`` come from."""

    kind: Literal["local", "slurm", "mpi", "scheduler"] = "local"
    scheduler: str | None = None
    workers: Annotated[int, Field(ge=1)] | None = None
    threads_per_worker: PositiveInt = 1
    memory_per_worker: str = "4GiB"
    #: dask-jobqueue SLURMCluster settings (partition, walltime, GPUs per worker job).
    partition: str | None = None
    walltime: str = "01:00:00"
    gpus_per_worker: Annotated[int, Field(ge=0)] = 0
    dashboard: bool = True

    @field_validator("memory_per_worker")
    @classmethod
    def _size(cls, value: str) -> str:
        # Read here so that a typo fails when the configuration loads, not in dask.
        from dask.utils import parse_bytes

        if value.strip().lower() != "auto":
            try:
                parse_bytes(value)
            except ValueError:
                raise ValueError(f"{value!r} is not a size such as 4GiB or 'auto'") from None
        return value

    @model_validator(mode="after")
    def _scheduler_given(self) -> ClusterConfig:
        if self.kind == "scheduler" and not self.scheduler:
            raise ValueError("cluster.kind scheduler needs cluster.scheduler (tcp://host:port)")
        return self


class DeconvolveConfig(StrictModel):
    """Block-wise, dask-distributed deconvolution of whole volumes into zarr."""

    block: Shape3D = (128, 128, 128)
    halo: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    tile: Shape3D = (64, 64, 64)
    overlap: Annotated[int, Field(ge=0)] = 16
    blend: Literal["constant", "linear", "gaussian"] = "linear"
    batch_size: PositiveInt = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    #: On the CPU in fp32, run G_Θ through a frozen, optimised TorchScript trace per tile
    #: shape (hpcdeconv.inference.frozen): same output to ~1e-6, ~1.7x faster.
    freeze: bool = True
    chunks: Shape3D = (64, 64, 64)
    retries: Annotated[int, Field(ge=0)] = 2
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)


class RLConfig(StrictModel):
    """Top level of ``hpcdeconv rl``: the PSF, the iterations and the decomposition.

    ``halo: auto`` reads ``rl_halo(psf.shape)`` voxels beyond each block side (three PSF
    widths), which keeps blocks within 1e-3 of whole-volume RL for 10-40 iterations.
    ``boundary`` is how RL treats the volume's border: ``reflect`` (the scene continues as
    its mirror image; a uniform field stays uniform) or ``truncated`` (dark outside the
    field of view, as scikit-image; the estimate overshoots within half a PSF of the
    border). See :mod:`hpcdeconv.classical.rl`.
    """

    psf: PSFConfig = Field(default_factory=BornWolfPSF)
    iterations: PositiveInt = 20
    tv: Annotated[float, Field(ge=0)] = 0.0
    boundary: Literal["reflect", "truncated"] = "reflect"
    block: Shape3D = (256, 256, 256)
    halo: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    chunks: Shape3D = (64, 64, 64)
    retries: Annotated[int, Field(ge=0)] = 2
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)


class PredictConfig(StrictModel):
    """In-memory tiled prediction of one volume."""

    tile: Shape3D = (64, 64, 64)
    overlap: Annotated[int, Field(ge=0)] = 16
    blend: Literal["constant", "linear", "gaussian"] = "linear"
    batch_size: PositiveInt = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    #: On the CPU in fp32, run G_Θ through a frozen, optimised TorchScript trace per tile
    #: shape (hpcdeconv.inference.frozen): same output to ~1e-6, ~1.7x faster.
    freeze: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
