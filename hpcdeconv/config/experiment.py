"""Top level of ``hpcdeconv train``: sizes checked across data and networks.

The training's ``spatial_dims`` is ``len(data.patch)`` (2: ``(Y, X)``, 3: ``(Z, Y, X)``).
Every other shape of the experiment (``train.val_tile``, ``train.val_crop``,
``method.kernel.size``) must have that many axes; a 3D default the user did not set is
cut to its last two axes for 2D data, so a 2D configuration need not restate it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    Field,
    model_validator,
)

from hpcdeconv.config.base import StrictModel
from hpcdeconv.config.data import DataConfig, ImageDomainsData
from hpcdeconv.config.methods import (
    METHOD_CONFIGS,
    BlindCycleGANConfig,
    COMIConfig,
    CycleGANConfig,
    MethodConfig,
    SupervisedConfig,
)
from hpcdeconv.config.networks import GeneratorConfig
from hpcdeconv.config.run import OptimConfig, StrategyConfig, TrainConfig

#: Shapes that follow the data's spatial_dims: key -> (path of the owning model in the
#: experiment, field name).
_SPATIAL_SHAPES = {
    "train.val_tile": (("train",), "val_tile"),
    "train.val_crop": (("train",), "val_crop"),
    "method.kernel.size": (("method", "kernel"), "size"),
}


def _patch_of(data: Any) -> tuple[int, ...] | None:
    """``data.patch`` of raw or validated data settings; None where the kind has none."""
    patch = data.get("patch") if isinstance(data, Mapping) else getattr(data, "patch", None)
    if patch is None or isinstance(patch, str):
        return None
    try:
        return tuple(patch)
    except TypeError:
        return None


def _adapt_default(node: Any, model: type[BaseModel] | None, field: str) -> Any:
    """``node`` (raw mapping or validated model) with ``field``'s 3D default cut to its last
    two axes; unchanged where the user set the field (a key of the mapping, or in the
    model's ``model_fields_set``). ``model`` is the class a mapping will be validated as."""
    if isinstance(node, BaseModel):
        if field not in type(node).model_fields or field in node.model_fields_set:
            return node
        value = getattr(node, field)
        if value is None or len(value) != 3:
            return node
        return node.model_copy(update={field: tuple(value)[-2:]})
    if not isinstance(node, Mapping) or field in node or model is None:
        return node
    if field not in model.model_fields:
        return node
    default = model.model_fields[field].get_default(call_default_factory=True)
    if default is None or len(default) != 3:
        return node
    return {**node, field: tuple(default)[-2:]}


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _generators(method: BaseModel) -> list[tuple[str, GeneratorConfig]]:
    """``(key, config)`` of every generator a method trains on ``data.patch``."""
    nets = [("method.generator", method.generator)]  # type: ignore[attr-defined]
    if isinstance(method, CycleGANConfig | COMIConfig):
        nets.append(("method.blur_generator", method.blur_generator))
    return nets


class ExperimentConfig(StrictModel):
    """Top level of ``hpcdeconv train``.

    Sizes the networks constrain (``data.patch``, ``train.val_overlap``) are checked here,
    so a run that cannot take its first step is refused before anything is created.
    """

    data: DataConfig = Field(default_factory=ImageDomainsData)
    method: MethodConfig = Field(default_factory=BlindCycleGANConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    output: Path = Path("runs/blind")

    @model_validator(mode="before")
    @classmethod
    def _data_kind_from_method(cls, value: Any) -> Any:
        """A ``data`` block without ``kind`` takes the kind its method trains on."""
        if not isinstance(value, Mapping):
            return value
        data, method = value.get("data", {}), value.get("method", {})
        if not isinstance(data, Mapping) or "kind" in data:
            return value
        name = method.get("name", "blind_cyclegan") if isinstance(method, Mapping) else None
        model = METHOD_CONFIGS.get(str(name)) if name is not None else type(method)
        if model is None or not hasattr(model, "data_kind"):
            return value  # the method's own error is clearer
        return {**value, "data": {**data, "kind": model.data_kind}}

    @model_validator(mode="before")
    @classmethod
    def _2d_defaults(cls, value: Any) -> Any:
        """For 2D data, cut the 3D defaults of unset shapes (val_tile, kernel size) to 2D."""
        if not isinstance(value, Mapping):
            return value
        patch = _patch_of(value.get("data", {}))
        if patch is None or len(patch) != 2:
            return value
        value = dict(value)
        train = value.get("train", {})
        value["train"] = _adapt_default(train, TrainConfig, "val_tile")
        method = value.get("method", {})
        if isinstance(method, Mapping):
            name = str(method.get("name", "blind_cyclegan"))
            model = METHOD_CONFIGS.get(name)
            kernel_field = None if model is None else model.model_fields.get("kernel")
            if kernel_field is not None:
                kernel_model = kernel_field.annotation
                kernel = _adapt_default(method.get("kernel", {}), kernel_model, "size")
                value["method"] = {**method, "kernel": kernel}
        elif isinstance(getattr(method, "kernel", None), BaseModel):
            kernel = _adapt_default(method.kernel, None, "size")
            value["method"] = method.model_copy(update={"kernel": kernel})
        return value

    @model_validator(mode="after")
    def _shapes_have_the_data_dims(self) -> ExperimentConfig:
        patch = _patch_of(self.data)
        if patch is None:
            return self
        for key, (owner, field) in _SPATIAL_SHAPES.items():
            node: Any = self
            for part in owner:
                node = getattr(node, part, None)
            shape = getattr(node, field, None)
            if shape is not None and len(shape) != len(patch):
                raise ValueError(
                    f"{key} {list(shape)} has {len(shape)} axes but data.patch {list(patch)} "
                    f"has {len(patch)}: every shape of a "
                    f"{len(patch)}D training needs {len(patch)} axes"
                )
        return self

    @model_validator(mode="after")
    def _data_kind_fits_method(self) -> ExperimentConfig:
        method = type(self.method)
        kinds = (method.data_kind, *getattr(method, "also_data_kinds", ()))
        if self.data.kind not in kinds:
            allowed = " or ".join(repr(k) for k in kinds)
            raise ValueError(
                f"method {self.method.name} trains on data.kind {allowed}, not {self.data.kind!r}"
            )
        return self

    @model_validator(mode="after")
    def _sizes_fit_networks(self) -> ExperimentConfig:
        if not isinstance(self.data, ImageDomainsData):
            return self
        patch = self.data.patch
        for key, net in _generators(self.method):
            net.check_patch(patch, key)
        uses_discriminator = not isinstance(self.method, SupervisedConfig) or (
            self.method.adversarial_weight > 0
        )
        if uses_discriminator:
            self.method.discriminator.check_patch(patch, "method.discriminator")
        if (
            self.train.ema_decay is not None
            and self.strategy.name == "deepspeed"
            and self.strategy.deepspeed.zero_stage == 3
        ):
            raise ValueError(
                "train.ema_decay needs whole weights on every rank; ZeRO stage 3 partitions "
                "them: use strategy.deepspeed.zero_stage 0-2 or no EMA"
            )
        # Validation tiles are rounded up to the deblurring generator's multiple (inference
        # pads them), so only the overlap can make validation fail.
        multiple = self.method.generator.size_multiple()
        tile = [_round_up(t, multiple) for t in self.train.val_tile]
        if self.train.val_overlap >= min(tile):
            raise ValueError(
                f"train.val_overlap {self.train.val_overlap} must be smaller than every side "
                f"of train.val_tile {list(self.train.val_tile)} (rounded up to multiples of "
                f"{multiple}: {tile})"
            )
        return self
