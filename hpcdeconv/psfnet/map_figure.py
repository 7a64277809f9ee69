"""Figures of PSF maps and depth maps drawn over their image (PNG).

Each node of a map is drawn as the cell of the image it stands for: cell edges lie
halfway between neighbouring node centres and at the image border, so the last, narrower
spacing of a window grid (:mod:`hpcdeconv.psfnet.psf_map`) is drawn as it is. Cells are
semi-transparent over the image in grey; nodes whose PSF was filled from neighbours (not
estimated) are hatched. Uses matplotlib's object API with the Agg canvas (as
:mod:`hpcdeconv.viz`), never pyplot.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from hpcdeconv.data.safety import SOFTWARE
from hpcdeconv.psfnet.psf_map import PSFMap

#: Opacity of the map over the image.
ALPHA = 0.65


def cell_edges(centres: np.ndarray, size: int) -> np.ndarray:
    """``(G + 1,)`` cell edges (pixels): 0, the midpoints between centres, ``size``."""
    mid = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[0.0], mid, [float(size)]])


def _panel(
    ax: Axes,
    image: np.ndarray | None,
    m: PSFMap,
    values: np.ndarray,
    title: str,
    cmap: str,
    limits: tuple[float, float] | None = None,
) -> None:
    fig = ax.get_figure()
    assert fig is not None
    (cy, cx), (ny, nx) = m.centres, m.image_shape
    sy, sx = m.voxel_size
    ey, ex = cell_edges(cy, ny) * sy, cell_edges(cx, nx) * sx
    if image is not None:
        ax.imshow(image, cmap="gray", extent=(0, nx * sx, ny * sy, 0), interpolation="nearest")
    vmin, vmax = limits if limits is not None else (None, None)
    mesh = ax.pcolormesh(ex, ey, values, cmap=cmap, alpha=ALPHA, vmin=vmin, vmax=vmax)
    for i, j in zip(*np.nonzero(~m.estimated), strict=True):
        corner, width, height = (ex[j], ey[i]), ex[j + 1] - ex[j], ey[i + 1] - ey[i]
        ax.add_patch(Rectangle(corner, width, height, fill=False, hatch="//", linewidth=0))
    ax.set_xlim(0, nx * sx)
    ax.set_ylim(ny * sy, 0)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("x (µm)", fontsize=8)
    ax.set_ylabel("y (µm)", fontsize=8)
    ax.tick_params(labelsize=7)
    fig.colorbar(mesh, ax=ax, shrink=0.8)


def _thumbnail(image: np.ndarray | None) -> np.ndarray | None:
    """The image (any subsampling of the map's image), or None if absent or mismatched."""
    if image is None:
        return None
    image = np.asarray(image, np.float32)
    return image if image.ndim == 2 else None


def save_map_figure(
    path: str | Path,
    m: PSFMap,
    image: np.ndarray | None = None,
    extra: Sequence[tuple[str, np.ndarray, str]] = (),
    parameters: bool = True,
) -> None:
    """Write a PNG with one panel per parameter of ``m`` and one of its invalidity ``a0``.

    Parameters
    ----------
    path
        ``.png`` file.
    m
        The map.
    image
        ``(y, x)`` image drawn beneath (the map's image, possibly subsampled: it is
        stretched over the image's extent), or None.
    extra
        More panels ``(title, (Gy, Gx) values, colormap)``, e.g. a depth map.
    parameters
        Whether to draw the parameter and ``a0`` panels (False: only ``extra``).
    """
    panels: list[tuple[str, np.ndarray, str, tuple[float, float] | None]] = []
    if parameters:
        for name, unit, values in zip(m.model.names, m.model.units, m.params, strict=True):
            panels.append((f"{name} ({unit})", values, "viridis", None))
        panels.append(("a0 (invalid; hatched: filled)", m.invalid, "Reds", (0.0, 1.0)))
    panels += [(title, values, cmap, None) for title, values, cmap in extra]
    background = _thumbnail(image)
    cols = min(len(panels), 3)
    rows = -(-len(panels) // cols)
    ratio = m.image_shape[0] * m.voxel_size[0] / (m.image_shape[1] * m.voxel_size[1])
    fig = Figure(figsize=(4.2 * cols, 3.6 * rows * max(0.4, min(ratio, 2.5))))
    FigureCanvasAgg(fig)
    for i, (title, values, cmap, limits) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        _panel(ax, background, m, np.asarray(values, np.float64), title, cmap, limits)
    fig.tight_layout()
    # The Software text chunk marks the figure as ours for --overwrite.
    fig.savefig(Path(path), dpi=120, metadata={"Software": SOFTWARE})
