"""Shared building blocks of the configuration models."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
)

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Shape3D = tuple[PositiveInt, PositiveInt, PositiveInt]
#: A 2D ``(Y, X)`` or 3D ``(Z, Y, X)`` size in voxels; its length must match the
#: dimensionality of the data it applies to (checked where both are known).
Shape = Annotated[tuple[PositiveInt, ...], Field(min_length=2, max_length=3)]
Spacing3D = tuple[PositiveFloat, PositiveFloat, PositiveFloat]


class StrictModel(BaseModel):
    """Base of every configuration model: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def tagged_by(key: str, default: str) -> Discriminator:
    """The discriminator of a tagged union whose members differ by the field ``key``.

    A YAML block (a mapping) or a model without ``key`` is the member tagged ``default``,
    so blocks written before the union existed keep their meaning.
    """

    def tag(value: Any) -> str:
        if isinstance(value, Mapping):
            return str(value.get(key, default))
        return str(getattr(value, key, default))

    function: Callable[[Any], str] = tag
    return Discriminator(function)
