"""Top level of ``hpcdeconv train``: sizes checked across data and networks."""

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
    CycleGANConfig,
    MethodConfig,
    SupervisedConfig,
)
from hpcdeconv.config.networks import GeneratorConfig
from hpcdeconv.config.run import OptimConfig, StrategyConfig, TrainConfig


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _generators(method: BaseModel) -> list[tuple[str, GeneratorConfig]]:
    """``(key, config)`` of every generator a method trains on ``data.patch``."""
    nets = [("method.generator", method.generator)]  # type: ignore[attr-defined]
    if isinstance(method, CycleGANConfig):
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

    @model_validator(mode="after")
    def _data_kind_fits_method(self) -> ExperimentConfig:
        needed = type(self.method).data_kind
        if self.data.kind != needed:
            raise ValueError(
                f"method {self.method.name} trains on data.kind {needed!r}, not {self.data.kind!r}"
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
