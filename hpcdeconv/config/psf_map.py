"""Configuration of ``hpcdeconv estimate-psf``: the window grid, the fill and where it runs."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from hpcdeconv.config.base import PositiveInt, StrictModel
from hpcdeconv.config.infer import ClusterConfig


class PSFMapConfig(StrictModel):
    """A spatially-variant PSF map (Shajkofci & Liebling, IEEE TIP 2020, Sec. III-C).

    Attributes
    ----------
    stride
        Pixels between window starts (the window side is the checkpoint's patch side).
    batch_size
        Windows per network call.
    threshold
        A window is estimated where the network's invalidity ``a0`` is below this.
    neighbours
        ``k`` of the inverse-distance fill of the other windows.
    power
        Exponent of the inverse-distance weights (1: scikit-learn's ``weights="distance"``).
    device
        ``auto`` (a GPU if any), ``cpu`` or ``cuda``; on a dask cluster, each worker's.
    distributed
        Run on the dask cluster ``cluster`` (one task per band of window rows) rather
        than in this process.
    band_rows
        Window rows per dask task (default: enough for two batches).
    retries
        Times a failed dask task is retried.
    cluster
        Where the dask workers come from when ``distributed``.
    """

    stride: PositiveInt = 64
    batch_size: PositiveInt = 64
    threshold: Annotated[float, Field(gt=0, le=1)] = 0.5
    neighbours: PositiveInt = 4
    power: Literal[1, 2] = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    distributed: bool = False
    band_rows: PositiveInt | None = None
    retries: Annotated[int, Field(ge=0)] = 2
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
