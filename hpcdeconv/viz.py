"""Orthogonal-view figures (XY, XZ, YZ) of volumes and PSFs, and figures of 2D images.

Uses matplotlib's object API with the Agg canvas directly, so importing this module or
drawing a figure never touches pyplot's global state or the user's backend. Panels are
``(*S)`` or ``(C, *S)`` (channels first); 3 channels are drawn as RGB, of other channel
counts the first channel is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from hpcdeconv.data.safety import SOFTWARE


def _displayed(panel: np.ndarray, spatial_dims: int) -> tuple[np.ndarray, bool]:
    """The array drawn for a ``(*S)`` or ``(C, *S)`` panel (``(*S, 3)`` for RGB) and
    whether it is RGB."""
    data = np.asarray(panel, dtype=np.float32)
    if data.ndim == spatial_dims:
        return data, False
    if data.ndim != spatial_dims + 1:
        raise ValueError(
            f"panel of shape {data.shape} does not match {spatial_dims} voxel-size entries"
        )
    if data.shape[0] == 3:
        return np.moveaxis(data, 0, -1), True
    return data[0], False


def _views(volume: np.ndarray, mode: str, spatial_dims: int) -> tuple[np.ndarray, ...]:
    """XY, XZ and YZ views of a ``(Z, Y, X[, 3])`` volume (central slices or maximum
    projections); the image itself for a ``(Y, X[, 3])`` image."""
    if spatial_dims == 2:
        return (volume,)
    if mode == "mip":
        return volume.max(axis=0), volume.max(axis=1), np.swapaxes(volume.max(axis=2), 0, 1)
    z, y, x = (s // 2 for s in volume.shape[:3])
    return volume[z], volume[:, y, :], np.swapaxes(volume[:, :, x], 0, 1)


def orthoview_figure(
    panels: Sequence[tuple[str, np.ndarray]],
    voxel_size: Sequence[float],
    *,
    log: bool = False,
    mode: str = "slice",
    shared_range: bool = False,
) -> Figure:
    """One row per panel with its XY, XZ and YZ views (2D: the image), to physical aspect.

    Parameters
    ----------
    panels
        ``(title, image)`` pairs, each ``(*S)`` or ``(C, *S)`` with ``S`` = ``(Z, Y, X)``
        or ``(Y, X)``; 3 channels are drawn as RGB, otherwise the first channel.
    voxel_size
        ``(dz, dy, dx)`` or ``(dy, dx)`` in micrometres: gives ``S``, the aspect ratio and
        the axis labels.
    log
        Logarithmic colour scale (PSFs), clipped four decades below the maximum; RGB
        panels are drawn linearly.
    mode
        ``"slice"`` for central slices or ``"mip"`` for maximum-intensity projections
        (volumes only).
    shared_range
        Use one intensity range for all panels (input / output / truth comparisons).

    Raises
    ------
    ValueError
        A panel whose axes do not match ``voxel_size``.
    """
    spatial_dims = len(voxel_size)
    if spatial_dims not in (2, 3):
        raise ValueError(f"voxel_size {tuple(voxel_size)} must have 2 or 3 entries")
    sizes = dict(zip("zyx"[-spatial_dims:], (float(v) for v in voxel_size), strict=True))
    names = ("XY", "XZ", "YZ")[: 1 if spatial_dims == 2 else 3]
    width = 4.0 if spatial_dims == 2 else 10.0
    fig = Figure(figsize=(width, 3.2 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), len(names), squeeze=False)
    stack = [_displayed(v, spatial_dims) for _, v in panels]
    lo = min(float(v.min()) for v, _ in stack) if shared_range else None
    hi = max(float(v.max()) for v, _ in stack) if shared_range else None
    for row, ((title, _), (vol, rgb)) in enumerate(zip(panels, stack, strict=True)):
        vmax = hi if hi is not None else float(vol.max())
        vmin = lo if lo is not None else float(vol.min())
        if log and not rgb:
            norm: Normalize = LogNorm(vmin=max(vmax, 1e-12) * 1e-4, vmax=max(vmax, 1e-12))
        else:
            norm = Normalize(vmin=vmin, vmax=vmax)
        shape = dict(zip("zyx"[-spatial_dims:], vol.shape[:spatial_dims], strict=True))
        length = {a: shape[a] * sizes[a] for a in shape}
        extents = {
            "XY": (0, length["x"], length["y"], 0),
            "XZ": (0, length["x"], length.get("z", 0), 0),
            "YZ": (0, length.get("z", 0), length["y"], 0),
        }
        for ax, name, view in zip(axes[row], names, _views(vol, mode, spatial_dims), strict=True):
            if rgb:
                # imshow draws RGB floats as they are: scale them to [0, 1] here.
                shown = np.clip((view - norm.vmin) / ((norm.vmax - norm.vmin) or 1.0), 0, 1)
                ax.imshow(shown, extent=extents[name])
            else:
                shown = np.clip(view, norm.vmin, None) if log else view
                cmap = "magma" if log else "gray"
                ax.imshow(shown, cmap=cmap, norm=norm, extent=extents[name])
            ax.set_title(f"{title} — {name}", fontsize=9)
            ax.set_xlabel({"XY": "x", "XZ": "x", "YZ": "z"}[name] + " (µm)", fontsize=8)
            ax.set_ylabel({"XY": "y", "XZ": "z", "YZ": "y"}[name] + " (µm)", fontsize=8)
            ax.tick_params(labelsize=7)
    return fig


def save_orthoviews(
    path: str | Path,
    panels: Sequence[tuple[str, np.ndarray]],
    voxel_size: Sequence[float],
    *,
    log: bool = False,
    mode: str = "slice",
    shared_range: bool = False,
) -> None:
    """Draw :func:`orthoview_figure` and write it as PNG (150 dpi)."""
    fig = orthoview_figure(panels, voxel_size, log=log, mode=mode, shared_range=shared_range)
    # The Software text chunk marks the figure as ours for --overwrite.
    fig.savefig(Path(path), dpi=150, metadata={"Software": SOFTWARE})
