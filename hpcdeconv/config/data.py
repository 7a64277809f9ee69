"""Training data configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import (
    Field,
)

from hpcdeconv.config.base import PositiveInt, Shape3D, StrictModel


class DataConfig(StrictModel):
    """Where training patches come from and how they are drawn."""

    path: Path = Path("data.zarr")
    patch: Shape3D = (64, 64, 64)
    batch_size: PositiveInt = 1
    num_workers: Annotated[int, Field(ge=0)] = 0
    augment: bool = True
    val_volumes: Annotated[int, Field(ge=0)] = 1
