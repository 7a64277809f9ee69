"""Run logging: ``metrics.jsonl``, TensorBoard scalars and image summaries (rank 0 only)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch


def mip_strip(volumes: Mapping[str, torch.Tensor]) -> np.ndarray:
    """Side-by-side XY maximum-intensity projections, each min-max scaled, (H, W) in [0, 1]."""
    tiles = []
    for vol in volumes.values():
        mip = vol.detach().float().cpu().amax(dim=0).numpy()
        lo, hi = float(mip.min()), float(mip.max())
        tiles.append((mip - lo) / (hi - lo) if hi > lo else np.zeros_like(mip))
    height = max(t.shape[0] for t in tiles)
    padded = [np.pad(t, ((0, height - t.shape[0]), (0, 2))) for t in tiles]
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

    def images(self, step: int, volumes: Mapping[str, torch.Tensor]) -> None:
        """Maximum-intensity projections of input / output / target (and the PSF)."""
        if not self.enabled or self._tb is None or not volumes:
            return
        self._tb.add_image("mip/" + "|".join(volumes), mip_strip(volumes), step, dataformats="HW")

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
