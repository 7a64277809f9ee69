"""Fixed affine intensity mapping between raw camera values and a network's range.

A network with a ``tanh`` head (COMI, cycleGAN) needs its images in ``(-1, 1)``; raw
microscope images are 8- or 16-bit counts. A dataset written with a mapping stores
mapped images and records the mapping in its root attributes (key ``intensity``); a
trained network's checkpoint records it too, and inference maps raw inputs forward and
the outputs back. One mapping for a whole dataset (not per image or per tile) keeps
tiles, blocks and images of one acquisition on the same scale, so stitched output is
seam-free and intensities stay comparable across images.

The mapping is ``mapped = lo + (raw − low) · (hi − lo) / (high − low)`` with
``(lo, hi) = target``; ``low``/``high`` are raw values, usually percentiles of the
training images (:func:`fit_intensity_map`). Values outside ``[low, high]`` map outside
``target`` linearly (nothing is clipped: clipping would lose the bright structures the
correction must keep).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from hpcdeconv.errors import InputError

__all__ = ["INTENSITY_KEY", "IntensityMap", "fit_intensity_map"]

#: A numpy array or a torch tensor: the mapping is plain arithmetic on either.
ArrayOrTensor = TypeVar("ArrayOrTensor")

#: Key of the mapping in a dataset's root ``hpcdeconv`` attribute and in an artefact record.
INTENSITY_KEY = "intensity"


@dataclass(frozen=True)
class IntensityMap:
    """``raw ↦ lo + (raw − low)·(hi − lo)/(high − low)``, ``(lo, hi) = target``.

    Attributes
    ----------
    low, high
        Raw values (camera counts) mapped to ``target[0]`` and ``target[1]``; ``high > low``.
    target
        The network's range, e.g. ``(-1.0, 1.0)`` for a ``tanh`` head.
    """

    low: float
    high: float
    target: tuple[float, float] = (-1.0, 1.0)

    def __post_init__(self) -> None:
        values = (self.low, self.high, *self.target)
        if not all(math.isfinite(v) for v in values):
            raise InputError(f"intensity mapping has a non-finite value: {values}")
        if not self.high > self.low or not self.target[1] > self.target[0]:
            raise InputError(
                f"intensity mapping needs high > low and target[1] > target[0], got "
                f"low {self.low}, high {self.high}, target {list(self.target)}"
            )

    @property
    def scale(self) -> float:
        """Mapped units per raw unit."""
        return (self.target[1] - self.target[0]) / (self.high - self.low)

    def to_network(self, raw: ArrayOrTensor) -> ArrayOrTensor:
        """Raw values to the network's range, in the input's type (array or tensor)."""
        return (raw - self.low) * self.scale + self.target[0]

    def to_raw(self, mapped: ArrayOrTensor) -> ArrayOrTensor:
        """The network's range back to raw values, in the input's type."""
        return (mapped - self.target[0]) / self.scale + self.low

    def forward(self, raw: np.ndarray) -> np.ndarray:
        """Raw values to the network's range (float32 array)."""
        return self.to_network(np.asarray(raw, np.float32)).astype(np.float32, copy=False)

    def inverse(self, mapped: np.ndarray) -> np.ndarray:
        """The network's range back to raw values (float32 array)."""
        return self.to_raw(np.asarray(mapped, np.float32)).astype(np.float32, copy=False)

    def record(self) -> dict[str, Any]:
        """JSON-able form, stored under :data:`INTENSITY_KEY`."""
        return {"low": self.low, "high": self.high, "target": list(self.target)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> IntensityMap:
        """Inverse of :meth:`record`.

        Raises
        ------
        InputError
            A malformed record.
        """
        try:
            target = tuple(float(t) for t in record["target"])
            if len(target) != 2:
                raise ValueError
            return cls(float(record["low"]), float(record["high"]), (target[0], target[1]))
        except (KeyError, TypeError, ValueError):
            raise InputError(f"malformed intensity mapping record: {dict(record)}") from None


def fit_intensity_map(
    images: Iterable[np.ndarray],
    percentiles: tuple[float, float] = (0.1, 99.9),
    target: tuple[float, float] = (-1.0, 1.0),
    max_values: int = 1 << 22,
    seed: int = 0,
) -> IntensityMap:
    """The mapping that sends the ``percentiles`` of ``images``' values to ``target``.

    Parameters
    ----------
    images
        Raw images (any shapes; all values are pooled).
    percentiles
        Lower and upper percentile, in percent.
    target
        The network's range.
    max_values
        At most this many values are drawn (uniformly, without replacement, per image in
        proportion to its size) to estimate the percentiles of large sets.
    seed
        Seed of that draw.

    Raises
    ------
    InputError
        No values, or images whose percentiles coincide (a flat set cannot be scaled).
    """
    arrays = [np.asarray(a).ravel() for a in images]
    total = sum(a.size for a in arrays)
    if total == 0:
        raise InputError("cannot fit an intensity mapping to no image values")
    rng = np.random.default_rng(seed)
    if total > max_values:
        arrays = [
            rng.choice(a, size=max(1, round(a.size * max_values / total)), replace=False)
            for a in arrays
            if a.size
        ]
    values = np.concatenate(arrays).astype(np.float64)
    low, high = np.percentile(values, percentiles)
    if not high > low:
        raise InputError(
            f"the images' {percentiles[0]} and {percentiles[1]} percentiles are both {low}: "
            "flat images cannot be scaled to the network's range"
        )
    return IntensityMap(float(low), float(high), (float(target[0]), float(target[1])))
