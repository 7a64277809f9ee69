"""Spatially-variant PSF maps from a PSF-regression network (Shajkofci & Liebling, Sec. III-C).

A ``window × window`` window slides over a 2D image every ``stride`` pixels (grid:
:func:`~hpcdeconv.psfnet.psf_map.window_starts`); each window's patch goes through the
network, in batches, giving the PSF parameters ``a_1 … a_P`` (physical units) and the
invalidity ``a0`` (1: the patch has no texture) of its node. A node is *estimated* where
``a0 < threshold`` (0.5); every other node is filled by the paper's KNN regression:
the inverse-distance-weighted average of the ``k`` nearest estimated nodes,

    a(s) = Σ_i w_i a(s_i) / Σ_i w_i,    w_i = 1 / |s − s_i|^power,

with distances in pixels between node centres, ``k = 4`` and ``power = 1`` by default
(``power = 1`` is scikit-learn's ``KNeighborsRegressor(weights="distance")``, the
regressor of the paper; ``power = 2`` is Shepard's classic choice). Among nodes at the
same distance the first in row-major order is taken. Every parameter is averaged
linearly, the axis angle included, as in the paper: axes near 0 and near π describe the
same PSF, so the fill suits optics whose astigmatism axis stays away from 0/π (the
depth-from-astigmatism setting, axis near π/4 and 3π/4).

The network is any ``predict`` callable (:data:`Predict`), so the map can be computed with
a trained :class:`~hpcdeconv.psfnet.regressor.LoadedRegressor` or an analytic stand-in.
This module computes the map in one process (:func:`estimate_psf_map`) and holds the
steps it shares with the dask version: the grid (:func:`grid`), the network on rows of
windows (:func:`predict_rows`) and the fill (:func:`assemble_map`). Large images go
through dask in :mod:`hpcdeconv.psfnet.estimate_cluster`
(:func:`~hpcdeconv.psfnet.estimate_cluster.estimate_on_client`), one task per band of
window rows, with the same result window for window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from hpcdeconv.errors import ConfigError, InputError
from hpcdeconv.psfnet.psf_map import PSFMap, window_centres, window_starts
from hpcdeconv.psfnet.psf_models import PSFModel

#: ``predict(patches (B, 1, W, W) float32) -> (params (B, P) physical units, a0 (B,) in [0, 1])``.
Predict = Callable[[Tensor], tuple[Tensor, Tensor]]

#: A window whose standard deviation is at most this fraction of its largest magnitude is
#: flat (no texture) and invalid.
FLAT_STD = 1e-6
#: Nodes whose invalidity ``a0`` is below this are estimated; the others are filled.
THRESHOLD = 0.5


class RegionReader(Protocol):
    """Reads ``image[region]`` of a 2D image as float32 (e.g. a
    :class:`~hpcdeconv.inference.sources.VolumeSource` of a ``(Y, X)`` image)."""

    def read(self, region: tuple[slice, ...]) -> np.ndarray: ...  # pragma: no cover


@dataclass(frozen=True)
class ArrayReader:
    """A :class:`RegionReader` over an image in memory, ``(Y, X)``."""

    image: np.ndarray

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        """``image[region]`` as float32."""
        return np.asarray(self.image[region], dtype=np.float32)


@dataclass(frozen=True)
class FillSettings:
    """How nodes are classified and filled.

    Attributes
    ----------
    threshold
        A node is estimated where ``a0 < threshold``.
    neighbours
        ``k``: estimated nodes averaged per filled node (fewer if fewer exist).
    power
        Exponent of the inverse-distance weights (1 or 2).
    """

    threshold: float = THRESHOLD
    neighbours: int = 4
    power: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.neighbours < 1:
            raise ConfigError(f"the number of neighbours must be positive, got {self.neighbours}")
        if self.power not in (1, 2):
            raise ConfigError(f"the inverse-distance power must be 1 or 2, got {self.power}")


def grid(image_shape: Sequence[int], window: int, stride: int) -> tuple[list[int], list[int]]:
    """Window starts along Y and X of a ``(Y, X)`` image.

    Raises
    ------
    InputError
        The image is not 2D, or smaller than one window along an axis.
    ConfigError
        ``stride`` is not in ``[1, size]`` along an axis.
    """
    if len(image_shape) != 2:
        raise InputError(f"a PSF map needs a 2D (Y, X) image, got shape {list(image_shape)}")
    # The image before the stride: a too small image is the problem, not the stride.
    if min(image_shape) < window:
        raise InputError(
            f"the image {list(image_shape)} is smaller than one {window}x{window} window"
        )
    return (
        window_starts(int(image_shape[0]), window, stride),
        window_starts(int(image_shape[1]), window, stride),
    )


def predict_rows(
    reader: RegionReader,
    starts_y: Sequence[int],
    starts_x: Sequence[int],
    window: int,
    predict: Predict,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Run the network on the windows of some window rows, reading only their pixel rows.

    Parameters
    ----------
    reader
        The image, read once over rows ``[min(starts_y), max(starts_y) + window)``.
    starts_y, starts_x
        Window starts (pixels) of the rows and columns to compute.
    window
        Window side (pixels).
    predict
        The network (:data:`Predict`).
    batch_size
        Windows per call of ``predict``.
    device
        Where the patches are sent.

    Returns
    -------
    params : np.ndarray
        ``(Ny, Nx, P)`` float32 parameters, physical units.
    invalid : np.ndarray
        ``(Ny, Nx)`` float32 ``a0``.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    top = min(starts_y)
    rows = reader.read((slice(top, max(starts_y) + window), slice(None)))
    corners = [(y - top, x) for y in starts_y for x in starts_x]
    params: list[np.ndarray] = []
    invalid: list[np.ndarray] = []
    with torch.inference_mode():
        for first in range(0, len(corners), batch_size):
            patches = np.stack(
                [
                    rows[y : y + window, x : x + window]
                    for y, x in corners[first : first + batch_size]
                ]
            )
            batch = torch.from_numpy(patches[:, None]).to(device)
            p, a0 = predict(batch)
            params.append(p.detach().float().cpu().numpy())
            a0 = a0.detach().float().cpu().numpy().reshape(-1)
            # A window without any variation (black, saturated, constant) standardises to
            # all zeros, an input the network never saw (training flats carry noise): it
            # has no texture to read, so it is invalid whatever the network says.
            flat = patches.reshape(len(patches), -1).std(axis=1) <= FLAT_STD * (
                np.abs(patches).reshape(len(patches), -1).max(axis=1) + 1e-30
            )
            invalid.append(np.where(flat, 1.0, a0).astype(np.float32))
    shape = (len(starts_y), len(starts_x))
    p_all = np.concatenate(params).astype(np.float32)
    return p_all.reshape(*shape, p_all.shape[-1]), np.concatenate(invalid).reshape(shape)


def idw_fill(
    params: np.ndarray,
    estimated: np.ndarray,
    centres_y: np.ndarray,
    centres_x: np.ndarray,
    neighbours: int = 4,
    power: int = 1,
) -> np.ndarray:
    """Fill the nodes that are not estimated by inverse-distance weighting (module docstring).

    Parameters
    ----------
    params
        ``(P, Gy, Gx)`` parameters; values at nodes not estimated are ignored.
    estimated
        ``(Gy, Gx)`` bool, the nodes whose own values are kept.
    centres_y, centres_x
        ``(Gy,)`` and ``(Gx,)`` node positions (pixels).
    neighbours, power
        ``k`` and the weight exponent.

    Returns
    -------
    np.ndarray
        ``(P, Gy, Gx)`` float32, equal to ``params`` at estimated nodes.

    Raises
    ------
    InputError
        No node is estimated (every window invalid: nothing to fill from).
    """
    if not estimated.any():
        raise InputError(
            "every window of the image is invalid (no texture the network can read): "
            "no PSF can be estimated or filled"
        )
    yy, xx = np.meshgrid(centres_y, centres_x, indexing="ij")
    nodes = np.stack([yy.ravel(), xx.ravel()], axis=1)
    valid = np.flatnonzero(estimated.ravel())
    empty = np.flatnonzero(~estimated.ravel())
    flat = params.reshape(params.shape[0], -1).astype(np.float64)
    out = flat.copy()
    if empty.size:
        dist = np.linalg.norm(nodes[empty, None, :] - nodes[None, valid, :], axis=-1)
        k = min(neighbours, valid.size)
        nearest = np.argsort(dist, axis=1, kind="stable")[:, :k]
        d = np.take_along_axis(dist, nearest, axis=1)
        weights = 1.0 / d**power
        weights /= weights.sum(axis=1, keepdims=True)
        out[:, empty] = np.einsum("ek,pek->pe", weights, flat[:, valid][:, nearest])
    return out.reshape(params.shape).astype(np.float32)


def assemble_map(
    model: PSFModel,
    raw: np.ndarray,
    invalid: np.ndarray,
    window: int,
    stride: int,
    image_shape: tuple[int, int],
    voxel_size: tuple[float, float],
    fill: FillSettings,
) -> PSFMap:
    """The :class:`PSFMap` of the network's raw outputs ``(Gy, Gx, P)`` and ``a0 (Gy, Gx)``.

    Raises
    ------
    InputError
        Every window is invalid, or the network gave NaN/Inf at an estimated node.
    """
    estimated = invalid < fill.threshold
    params = np.moveaxis(np.asarray(raw, np.float32), -1, 0)
    if not np.isfinite(params[:, estimated]).all():
        raise InputError("the network gave NaN or Inf parameters; check the checkpoint")
    centres_y = window_centres(image_shape[0], window, stride)
    centres_x = window_centres(image_shape[1], window, stride)
    filled = idw_fill(params, estimated, centres_y, centres_x, fill.neighbours, fill.power)
    return PSFMap(
        model=model,
        params=filled,
        invalid=np.asarray(invalid, np.float32),
        estimated=estimated,
        window=window,
        stride=stride,
        image_shape=(int(image_shape[0]), int(image_shape[1])),
        voxel_size=(float(voxel_size[0]), float(voxel_size[1])),
    )


def estimate_psf_map(
    image: np.ndarray | RegionReader,
    predict: Predict,
    model: PSFModel,
    window: int,
    stride: int,
    *,
    image_shape: tuple[int, int] | None = None,
    voxel_size: tuple[float, float] | None = None,
    batch_size: int = 64,
    fill: FillSettings = FillSettings(),
    device: torch.device | str = "cpu",
) -> PSFMap:
    """The PSF map of a 2D image, computed in this process.

    Parameters
    ----------
    image
        ``(Y, X)`` image (raw intensities; the network standardises each patch), or a
        :class:`RegionReader` with ``image_shape`` given.
    predict
        The network (:data:`Predict`), giving parameters of ``model``.
    model
        The PSF model of the parameters.
    window, stride
        Window side and stride (pixels).
    image_shape
        ``(Y, X)``, needed when ``image`` is a reader.
    voxel_size
        ``(dy, dx)`` in µm; default the model's pixel size.
    batch_size
        Windows per network call.
    fill
        Threshold and inverse-distance fill.
    device
        Where the patches are sent (the network's device).

    Returns
    -------
    PSFMap
        Parameters at every node (filled where not estimated), ``a0`` and ``estimated``.

    Raises
    ------
    InputError
        Not 2D, smaller than one window, or every window invalid.
    ConfigError
        Stride 0 or larger than the image, or bad fill settings.
    """
    if isinstance(image, np.ndarray):
        shape = tuple(image.shape)
        reader: RegionReader = ArrayReader(image)
    else:
        if image_shape is None:
            raise ValueError("image_shape is needed with a reader")
        shape, reader = tuple(image_shape), image
    starts_y, starts_x = grid(shape, window, stride)
    raw, invalid = predict_rows(reader, starts_y, starts_x, window, predict, batch_size, device)
    pixel = model.optics.pixel_size
    return assemble_map(
        model, raw, invalid, window, stride, (shape[0], shape[1]),
        voxel_size or (pixel, pixel), fill,
    )  # fmt: skip
