"""Run logging: ``metrics.jsonl``, TensorBoard scalars and image summaries (rank 0 only)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _xy_view(image: torch.Tensor, spatial_dims: int) -> np.ndarray:
    """(Y, X) or, for 3 channels, (Y, X, 3) view of a ``(*S)`` or ``(C, *S)`` image.

    Volumes are shown as their XY maximum-intensity projection, 2D images as they are; of
    other channel counts than 3 (RGB) the first channel is shown.
    """
    data = image.detach().float().cpu()
    if data.ndim == spatial_dims + 1:
        data = data.movedim(0, -1) if data.shape[0] == 3 else data[0]
    if spatial_dims == 3:
        data = data.amax(dim=0)
    return data.numpy()


def mip_strip(volumes: Mapping[str, torch.Tensor], spatial_dims: int | None = None) -> np.ndarray:
    """Side-by-side XY views of images, each min-max scaled to [0, 1].

    Parameters
    ----------
    volumes
        Images by name, each ``(*S)`` or ``(C, *S)`` with ``S`` = ``(Z, Y, X)`` (shown as
        the XY maximum-intensity projection) or ``(Y, X)`` (shown as it is).
    spatial_dims
        Number of spatial axes; ``None``: 3 for 3- and 4-axis images, 2 for 2-axis ones.

    Returns
    -------
    numpy.ndarray
        ``(H, W)``, or ``(H, W, 3)`` when an image has 3 channels (shown as RGB; the others
        are then repeated as grey).
    """
    tiles = []
    for vol in volumes.values():
        dims = spatial_dims or (2 if vol.ndim == 2 else 3)
        view = _xy_view(vol, dims)
        lo, hi = float(view.min()), float(view.max())
        tiles.append((view - lo) / (hi - lo) if hi > lo else np.zeros_like(view))
    if any(t.ndim == 3 for t in tiles):
        tiles = [t if t.ndim == 3 else np.repeat(t[..., None], 3, axis=-1) for t in tiles]
    height = max(t.shape[0] for t in tiles)
    pad = ((0, 0),) * (tiles[0].ndim - 2)
    padded = [np.pad(t, ((0, height - t.shape[0]), (0, 2), *pad)) for t in tiles]
    return np.concatenate(padded, axis=1)


class RunLogger:
    """Appends JSON lines and mirrors scalars and images to TensorBoard.

    Created on every rank; only the main rank writes anything.
    """

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._tb: Any = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def scalars(self, step: int, kind: str, values: Mapping[str, float]) -> None:
        """Write one record ``{"step", "kind", **values}``."""
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, **{k: float(v) for k, v in values.items()}}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(f"{kind}/{key}", float(value), step)

    def truncate_after(self, step: int) -> int:
        """Drop the records of steps after ``step`` (a resumed run logs them again).

        A run killed after its last checkpoint logged steps the resumed run repeats; without
        this they would appear twice. Returns the number of records dropped.
        """
        if not self.enabled or not self.path.is_file():
            return 0
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        if len(kept) < len(lines):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)
        return len(lines) - len(kept)

    def images(
        self, step: int, volumes: Mapping[str, torch.Tensor], spatial_dims: int | None = None
    ) -> None:
        """XY views of input / output / target (and the PSF), see :func:`mip_strip`."""
        if not self.enabled or self._tb is None or not volumes:
            return
        strip = mip_strip(volumes, spatial_dims)
        formats = "HWC" if strip.ndim == 3 else "HW"
        self._tb.add_image("mip/" + "|".join(volumes), strip, step, dataformats=formats)

    def close(self) -> None:
        """Flush TensorBoard."""
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Records of ``metrics.jsonl``, optionally only those of one ``kind``."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r["kind"] == kind]
