"""Spatially-variant PSF maps: the window grid and the map store.

A PSF map holds one parameter vector per window of a sliding-window grid over a 2D image
(Shajkofci & Liebling, IEEE TIP 2020, Sec. III-C): windows of ``window × window`` pixels
every ``stride`` pixels. Along each axis the window starts are ``0, t, 2t, …`` and, when
the last of these does not reach the image's end, one more window flush with the end, so
every pixel lies in a window. The map's nodes sit at the window centres
``start + window / 2`` in pixel coordinates (pixel ``i`` covers ``[i, i + 1)``, so window
``[s, s + w)`` has its centre at ``s + w / 2``); the grid is rectilinear (the last spacing
may be shorter).

A map store is a zarr v3 group::

    <root>/zarr.json   attribute "hpcdeconv": {"format": 1, "kind": "psf_map",
                       "psf_model": PSFModel.record(), "window": w, "stride": t,
                       "image_shape": [Y, X], "voxel_size": [dy, dx] (µm),
                       "parameters": [{"name": ..., "unit": ...}, ...]}
    <root>/params      (P, Gy, Gx) float32: parameter p at node (i, j), physical units;
                       every node filled (estimated or filled from its neighbours)
    <root>/invalid     (Gy, Gx) float32: the network's a0 (1: no texture) at the node
    <root>/estimated   (Gy, Gx) bool: True where the node's own estimate is used, False
                       where it was filled from valid neighbours
    <root>/centres_y   (Gy,) float64 and <root>/centres_x (Gx,) float64: node positions
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from hpcdeconv.data.zarr_io import ROOT_KEY, create_dataset, open_dataset, update_root_attrs
from hpcdeconv.errors import ConfigError, InputError
from hpcdeconv.psfnet.psf_models import PSFModel, model_from_record

KIND = "psf_map"


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start of every window along an axis of ``size`` pixels (see the module docstring).

    Raises
    ------
    InputError
        The axis is shorter than one window.
    ConfigError
        ``stride`` is not in ``[1, size]`` or ``window`` is not positive.
    """
    if window < 1:
        raise ConfigError(f"window must be positive, got {window}")
    if stride < 1 or stride > size:
        raise ConfigError(f"stride must be between 1 and the image size {size}, got {stride}")
    if size < window:
        raise InputError(
            f"an image axis of {size} pixels is smaller than one {window}-pixel window"
        )
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] + window < size:
        starts.append(size - window)
    return starts


def window_centres(size: int, window: int, stride: int) -> np.ndarray:
    """``(G,)`` float64 node positions ``start + window / 2`` along an axis."""
    return np.asarray(window_starts(size, window, stride), np.float64) + window / 2


@dataclass(frozen=True)
class PSFMap:
    """A PSF map in memory (layout and meaning: module docstring).

    Attributes
    ----------
    model
        The PSF model the parameters belong to.
    params
        ``(P, Gy, Gx)`` float32, physical units.
    invalid
        ``(Gy, Gx)`` float32 in ``[0, 1]``.
    estimated
        ``(Gy, Gx)`` bool.
    window, stride
        Window side and stride in pixels.
    image_shape
        ``(Y, X)`` of the image the map was estimated on.
    voxel_size
        ``(dy, dx)`` pixel size in µm.
    """

    model: PSFModel
    params: np.ndarray
    invalid: np.ndarray
    estimated: np.ndarray
    window: int
    stride: int
    image_shape: tuple[int, int]
    voxel_size: tuple[float, float]

    @property
    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Node positions ``(Gy,)`` and ``(Gx,)`` in pixels."""
        return (
            window_centres(self.image_shape[0], self.window, self.stride),
            window_centres(self.image_shape[1], self.window, self.stride),
        )

    def psfs(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``(Gy, Gx, K, K)`` float32 PSF of every node, rendered by the model."""
        p, gy, gx = self.params.shape
        flat = torch.as_tensor(self.params.reshape(p, -1).T.copy(), device=device)
        rendered = self.model.render(flat)
        return rendered.reshape(gy, gx, *rendered.shape[1:])

    def check_image(self, shape: Sequence[int], what: str = "image") -> None:
        """Raise one InputError line unless the map was made for an image of ``shape``."""
        if tuple(int(s) for s in shape) != tuple(self.image_shape):
            raise InputError(
                f"the PSF map was estimated on a {list(self.image_shape)} image, "
                f"but the {what} is {list(shape)}"
            )


def _check(m: PSFMap, where: str) -> None:
    gy = len(window_starts(m.image_shape[0], m.window, m.stride))
    gx = len(window_starts(m.image_shape[1], m.window, m.stride))
    p = len(m.model.parameters)
    shapes = {"params": (p, gy, gx), "invalid": (gy, gx), "estimated": (gy, gx)}
    for name, want in shapes.items():
        got = tuple(getattr(m, name).shape)
        if got != want:
            raise InputError(
                f"{where}: {name} is {list(got)}, but a {list(m.image_shape)} image with "
                f"window {m.window} and stride {m.stride} has a grid of {list(want)}"
            )
    if not np.isfinite(m.params).all():
        raise InputError(f"{where}: the map holds NaN or Inf parameters")


def write_psf_map(path: str | Path, m: PSFMap, overwrite: bool = False) -> zarr.Group:
    """Write ``m`` as a map store at ``path`` (see :func:`~hpcdeconv.data.zarr_io.create_dataset`).

    Raises
    ------
    InputError
        The arrays do not match the window grid, or a parameter is not finite.
    OutputExistsError
        ``path`` exists and may not be replaced.
    """
    _check(m, str(path))
    group = create_dataset(path, overwrite=overwrite)
    group.create_array("params", data=np.asarray(m.params, np.float32))
    group.create_array("invalid", data=np.asarray(m.invalid, np.float32))
    group.create_array("estimated", data=np.asarray(m.estimated, bool))
    centres_y, centres_x = m.centres
    group.create_array("centres_y", data=centres_y)
    group.create_array("centres_x", data=centres_x)
    update_root_attrs(group, **_attrs(m))
    return group


def _attrs(m: PSFMap) -> dict[str, Any]:
    return {
        "kind": KIND,
        "psf_model": m.model.record(),
        "window": int(m.window),
        "stride": int(m.stride),
        "image_shape": [int(s) for s in m.image_shape],
        "voxel_size": [float(v) for v in m.voxel_size],
        "parameters": [
            {"name": n, "unit": u} for n, u in zip(m.model.names, m.model.units, strict=True)
        ],
    }


def read_psf_map(path: str | Path) -> PSFMap:
    """Read a map store.

    Raises
    ------
    InputError
        Missing, not a PSF map, or arrays that do not match its window grid.
    """
    group = open_dataset(path)
    root = group.attrs.asdict().get(ROOT_KEY, {})
    if not isinstance(root, dict) or root.get("kind") != KIND:
        raise InputError(f"{path}: not a PSF map (root attribute kind != '{KIND}')")
    try:
        model = model_from_record(root["psf_model"])
        arrays = {name: np.asarray(group[name][...]) for name in ("params", "invalid", "estimated")}
        m = PSFMap(
            model=model,
            params=arrays["params"].astype(np.float32),
            invalid=arrays["invalid"].astype(np.float32),
            estimated=arrays["estimated"].astype(bool),
            window=int(root["window"]),
            stride=int(root["stride"]),
            image_shape=(int(root["image_shape"][0]), int(root["image_shape"][1])),
            voxel_size=(float(root["voxel_size"][0]), float(root["voxel_size"][1])),
        )
    except (KeyError, TypeError, ValueError, IndexError, ConfigError) as err:
        raise InputError(f"{path}: malformed PSF map ({str(err).splitlines()[0]})") from None
    _check(m, str(path))
    return m
