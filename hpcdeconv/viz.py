"""Orthogonal-view figures (XY, XZ, YZ) of volumes and PSFs.

Uses matplotlib's object API with the Agg canvas directly, so importing this module or
drawing a figure never touches pyplot's global state or the user's backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from hpcdeconv.data.safety import SOFTWARE


def _views(volume: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """XY, XZ and YZ views of a (Z, Y, X) volume: central slices or maximum projections."""
    if mode == "mip":
        return volume.max(axis=0), volume.max(axis=1), volume.max(axis=2).T
    z, y, x = (s // 2 for s in volume.shape)
    return volume[z], volume[:, y, :], volume[:, :, x].T


def orthoview_figure(
    panels: Sequence[tuple[str, np.ndarray]],
    voxel_size: Sequence[float],
    *,
    log: bool = False,
    mode: str = "slice",
    shared_range: bool = False,
) -> Figure:
    """One row per panel with its XY, XZ and YZ views, drawn to physical aspect.

    Parameters
    ----------
    panels
        ``(title, volume)`` pairs, each volume ``(Z, Y, X)``.
    voxel_size
        ``(dz, dy, dx)`` in micrometres, used for the aspect ratio and the axis labels.
    log
        Logarithmic colour scale (PSFs), clipped four decades below the maximum.
    mode
        ``"slice"`` for central slices or ``"mip"`` for maximum-intensity projections.
    shared_range
        Use one intensity range for all panels (input / output / truth comparisons).
    """
    dz, dy, dx = (float(v) for v in voxel_size)
    fig = Figure(figsize=(10, 3.2 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 3, squeeze=False)
    stack = [np.asarray(v, dtype=np.float32) for _, v in panels]
    lo = min(float(v.min()) for v in stack) if shared_range else None
    hi = max(float(v.max()) for v in stack) if shared_range else None
    for row, ((title, _), vol) in enumerate(zip(panels, stack, strict=True)):
        vmax = hi if hi is not None else float(vol.max())
        if log:
            norm: Normalize = LogNorm(vmin=max(vmax, 1e-12) * 1e-4, vmax=max(vmax, 1e-12))
        else:
            norm = Normalize(vmin=lo if lo is not None else float(vol.min()), vmax=vmax)
        nz, ny, nx = vol.shape
        extents = {
            "XY": (0, nx * dx, ny * dy, 0),
            "XZ": (0, nx * dx, nz * dz, 0),
            "YZ": (0, nz * dz, ny * dy, 0),
        }
        for ax, (name, view) in zip(
            axes[row], zip(extents, _views(vol, mode), strict=True), strict=True
        ):
            shown = np.clip(view, norm.vmin, None) if log else view
            ax.imshow(shown, cmap="magma" if log else "gray", norm=norm, extent=extents[name])
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
