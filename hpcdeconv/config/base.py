"""Shared building blocks of the configuration models."""

from __future__ import annotations

from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
)

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Shape3D = tuple[PositiveInt, PositiveInt, PositiveInt]
Spacing3D = tuple[PositiveFloat, PositiveFloat, PositiveFloat]


class StrictModel(BaseModel):
    """Base of every configuration model: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)
