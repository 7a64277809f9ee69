"""Spatially-variant PSF maps of large images on a dask cluster, one task per band.

The window rows of the sliding-window grid (:func:`~hpcdeconv.psfnet.estimate.grid`) are
split into bands (:func:`bands`); each band is one dask task that reads only the pixel
rows of its band and runs the network on them
(:func:`~hpcdeconv.psfnet.estimate.predict_rows`). Workers build the network from a
picklable recipe (:class:`PredictorFactory`), loading a trained checkpoint once per
process (:class:`CheckpointPredictor`). The raw outputs are gathered and the map is
assembled and filled here (:func:`~hpcdeconv.psfnet.estimate.assemble_map`), so the result
of :func:`estimate_on_client` equals the in-process
:func:`~hpcdeconv.psfnet.estimate.estimate_psf_map` window for window. The estimate, its
grid and its inverse-distance fill are described in :mod:`hpcdeconv.psfnet.estimate`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from hpcdeconv.errors import ConfigError
from hpcdeconv.psfnet.estimate import (
    FillSettings,
    Predict,
    RegionReader,
    assemble_map,
    grid,
    predict_rows,
)

if TYPE_CHECKING:
    from distributed import Client

    from hpcdeconv.psfnet.psf_map import PSFMap
    from hpcdeconv.psfnet.psf_models import PSFModel

#: The default fill of :func:`estimate_on_client` (that of
#: :func:`~hpcdeconv.psfnet.estimate.estimate_psf_map`).
DEFAULT_FILL = FillSettings()


class PredictorFactory(Protocol):
    """A picklable recipe for the network, called on a dask worker: returns its ``predict``
    (loaded once per process, as :class:`CheckpointPredictor` does)."""

    def __call__(self) -> Predict: ...  # pragma: no cover


@dataclass(frozen=True)
class CheckpointPredictor:
    """The :data:`~hpcdeconv.psfnet.estimate.Predict` of a trained regressor checkpoint,
    loaded once per process.

    Attributes
    ----------
    checkpoint
        Checkpoint file or run directory (:func:`~hpcdeconv.psfnet.regressor.load_regressor`).
    device
        ``"auto"`` (this process's GPU if any), ``"cpu"`` or ``"cuda"``.
    weights
        ``"auto"``, ``"raw"`` or ``"ema"``.
    """

    checkpoint: Path
    device: str = "auto"
    weights: str = "auto"

    def __call__(self) -> Predict:
        """The network's ``predict`` (cached per process and checkpoint version)."""
        stat = Path(self.checkpoint).stat()
        return _load(str(self.checkpoint), stat.st_mtime_ns, self.device, self.weights).predict


@functools.lru_cache(maxsize=2)
def _load(checkpoint: str, mtime_ns: int, device: str, weights: str) -> Any:
    from hpcdeconv.psfnet.regressor import load_regressor
    from hpcdeconv.training.strategy import resolve_device

    return load_regressor(Path(checkpoint), resolve_device(device), weights=weights)


def bands(rows: int, band_rows: int) -> list[range]:
    """Window-row indices ``0 … rows − 1`` in consecutive bands of ``band_rows``."""
    if band_rows < 1:
        raise ConfigError(f"band rows must be positive, got {band_rows}")
    return [range(i, min(i + band_rows, rows)) for i in range(0, rows, band_rows)]


def default_band_rows(columns: int, batch_size: int) -> int:
    """Window rows per dask task: enough for at least two full batches."""
    return max(1, math.ceil(2 * batch_size / columns))


def _band_task(
    reader: RegionReader,
    starts_y: list[int],
    starts_x: list[int],
    window: int,
    factory: PredictorFactory,
    batch_size: int,
    device: str,
) -> tuple[np.ndarray, np.ndarray]:
    """One dask task: the windows of one band (the network is loaded once per process).

    ``device`` is resolved on the worker (``"auto"``: its GPU if it has one).
    """
    from hpcdeconv.training.strategy import resolve_device

    where = resolve_device(device)
    return predict_rows(reader, starts_y, starts_x, window, factory(), batch_size, where)


def estimate_on_client(
    client: Client,
    reader: RegionReader,
    image_shape: tuple[int, int],
    factory: PredictorFactory,
    model: PSFModel,
    window: int,
    stride: int,
    *,
    voxel_size: tuple[float, float] | None = None,
    batch_size: int = 64,
    band_rows: int | None = None,
    fill: FillSettings = DEFAULT_FILL,
    device: str = "cpu",
    resources: dict[str, float] | None = None,
    retries: int = 2,
) -> PSFMap:
    """The PSF map of a 2D image computed on a dask cluster, one task per band of window rows.

    Same result as :func:`~hpcdeconv.psfnet.estimate.estimate_psf_map` (the fill runs here,
    on the gathered outputs).

    Parameters
    ----------
    client
        A connected client (:func:`hpcdeconv.inference.cluster.open_client`).
    reader
        Picklable reader of the image (a ``VolumeSource``): each task reads its band's rows.
    image_shape
        ``(Y, X)``.
    factory
        Gives the network's ``predict`` on the worker.
    band_rows
        Window rows per task (default :func:`default_band_rows`).
    device
        ``"auto"``, ``"cpu"`` or ``"cuda"``, resolved on each worker (``"auto"``: its GPU
        if it has one); the factory's network must be on the same device.
    resources
        dask resources each task asks for (e.g. ``{"GPU": 1}``).
    retries
        Times a failed task is retried (a worker lost, for instance).

    Other parameters are as :func:`~hpcdeconv.psfnet.estimate.estimate_psf_map`.
    """
    starts_y, starts_x = grid(image_shape, window, stride)
    rows = band_rows or default_band_rows(len(starts_x), batch_size)
    futures = [
        client.submit(
            _band_task,
            reader,
            [starts_y[i] for i in band],
            list(starts_x),
            window,
            factory,
            batch_size,
            device,
            resources=resources,
            retries=retries,
            pure=False,
        )
        for band in bands(len(starts_y), rows)
    ]
    results = client.gather(futures)
    raw = np.concatenate([r[0] for r in results], axis=0)
    invalid = np.concatenate([r[1] for r in results], axis=0)
    pixel = model.optics.pixel_size
    return assemble_map(
        model, raw, invalid, window, stride, (int(image_shape[0]), int(image_shape[1])),
        voxel_size or (pixel, pixel), fill,
    )  # fmt: skip
