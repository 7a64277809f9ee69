"""Depth from astigmatism (Shajkofci & Liebling, IEEE TIP 2020, eq. 14) and its calibration.

With astigmatic optics a region above focus and one below focus blur along perpendicular
axes. From a Zernike-3 PSF map (parameters ``a1`` = focus in waves, ``a2`` = cylinder,
``a3`` = axis in rad) eq. 14 gives a depth index at each node ``s``::

    z(s) = a1(s) · (2 · a3(s) / π − 1)

Sign convention. The model keeps ``focus ≥ 0``: a defocus of ``−f`` with astigmatism
along φ has the same PSF as ``+f`` along ``φ + π/2`` (:mod:`hpcdeconv.psfnet.psf_models`),
so the axis carries the side of focus. With the optics' astigmatism along π/4, a
region defocused by ``+f`` waves is read as ``(f, ·, π/4)`` and gets ``z = −f/2``; one at
``−f`` is read as ``(f, ·, 3π/4)`` and gets ``z = +f/2``. Eq. 14 thus separates the two
sides of focus when the astigmatism axis is near π/4 (and, mirrored, near 3π/4); axes
near 0 and π describe the same PSF but give ``z = −f`` and ``+f``, so optics whose axis
lies there need the axis rotated first. The index is in waves of defocus, not in µm,
and its sign depends on the optics: an affine calibration ``z_true ≈ α z + β`` fixes
scale, sign and offset. It is fitted by least squares on images of a known tilted plane
``z_true = z0 + gy · y + gx · x`` (µm, with ``y``, ``x`` the node centres in µm from the
image's top-left corner, so ``gy`` and ``gx`` are slopes in µm per µm), using only the
nodes whose PSF was estimated (not filled).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hpcdeconv.errors import InputError
from hpcdeconv.psfnet.psf_map import PSFMap

#: ``kind`` of a calibration file.
CALIBRATION_KIND = "depth_calibration"


def depth_index(m: PSFMap, where: str = "the PSF map") -> np.ndarray:
    """Eq. 14 at every node of a Zernike-3 map.

    Parameters
    ----------
    m
        A map of the ``zernike3`` model.
    where
        The map, for messages.

    Returns
    -------
    np.ndarray
        ``(Gy, Gx)`` float32 depth index (waves of defocus, signed; module docstring).

    Raises
    ------
    InputError
        The map is of another PSF model.
    """
    if m.model.name != "zernike3":
        raise InputError(
            f"{where}: depth from astigmatism needs a zernike3 PSF map (focus, cylinder, "
            f"axis), got {m.model.name}"
        )
    focus = m.params[m.model.names.index("focus")].astype(np.float64)
    axis = m.params[m.model.names.index("axis")].astype(np.float64)
    return (focus * (2.0 * axis / math.pi - 1.0)).astype(np.float32)


def tilt_depth(m: PSFMap, z0: float, gy: float, gx: float) -> np.ndarray:
    """``(Gy, Gx)`` float64 true depth ``z0 + gy · y + gx · x`` (µm) at the node centres.

    ``y`` and ``x`` are the centres in µm (pixels × the map's voxel size).
    """
    cy, cx = m.centres
    y = cy * m.voxel_size[0]
    x = cx * m.voxel_size[1]
    return z0 + gy * y[:, None] + gx * x[None, :]


@dataclass(frozen=True)
class DepthCalibration:
    """``z_true = alpha · z + beta`` (µm) from the eq. 14 index ``z``.

    Attributes
    ----------
    alpha
        Scale, µm per wave of index (its sign fixes the side of focus).
    beta
        Offset, µm.
    nodes
        Estimated nodes the fit used.
    rms_um
        Root-mean-square residual of the fit, µm.
    """

    alpha: float
    beta: float
    nodes: int
    rms_um: float

    def apply(self, z: np.ndarray) -> np.ndarray:
        """Calibrated depth (µm), same shape as ``z``, float32."""
        return (self.alpha * np.asarray(z, np.float64) + self.beta).astype(np.float32)

    def write(self, path: str | Path) -> None:
        """Save as JSON (``kind``, ``format``, ``alpha``, ``beta``, ``nodes``, ``rms_um``)."""
        record = {"kind": CALIBRATION_KIND, "format": 1, "unit": "um", **asdict(self)}
        Path(path).write_text(json.dumps(record, indent=2) + "\n")


def read_calibration(path: str | Path) -> DepthCalibration:
    """Read a calibration saved by :meth:`DepthCalibration.write`.

    Raises
    ------
    InputError
        Missing, not JSON, or not a depth calibration.
    """
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such calibration file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not a JSON calibration ({str(err).splitlines()[0]})") from None
    if not isinstance(record, dict) or record.get("kind") != CALIBRATION_KIND:
        raise InputError(f"{path}: not a depth calibration (kind != '{CALIBRATION_KIND}')")
    try:
        cal = DepthCalibration(
            float(record["alpha"]), float(record["beta"]), int(record["nodes"]),
            float(record["rms_um"]),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{path}: malformed depth calibration ({err})") from None
    if not (math.isfinite(cal.alpha) and math.isfinite(cal.beta)):
        raise InputError(f"{path}: the calibration's alpha and beta must be finite")
    return cal


def fit_calibration(
    maps: Sequence[PSFMap], tilts: Sequence[tuple[float, float, float]]
) -> DepthCalibration:
    """Least-squares ``alpha``, ``beta`` from maps of images of known tilt.

    Parameters
    ----------
    maps
        Zernike-3 maps.
    tilts
        ``(z0, gy, gx)`` of each map's plane (module docstring), one per map.

    Returns
    -------
    DepthCalibration

    Raises
    ------
    InputError
        A map of another model, fewer than 2 estimated nodes in all, or an index or a known
        depth that is constant over them (no scale can be fitted).
    """
    if len(maps) != len(tilts):
        raise ValueError(f"{len(maps)} maps but {len(tilts)} tilts")
    z_parts, true_parts = [], []
    for i, (m, (z0, gy, gx)) in enumerate(zip(maps, tilts, strict=True)):
        z_parts.append(depth_index(m, f"map {i + 1}")[m.estimated].astype(np.float64))
        true_parts.append(tilt_depth(m, z0, gy, gx)[m.estimated])
    z = np.concatenate(z_parts)
    true = np.concatenate(true_parts)
    if z.size < 2:
        raise InputError(
            f"a depth calibration needs at least 2 estimated nodes, the maps have {z.size}"
        )
    if np.ptp(z) <= 1e-6 * max(1.0, float(np.abs(z).max())):
        raise InputError(
            "the depth index is the same at every estimated node: no scale can be fitted "
            "(is the calibration sample tilted, and the optics astigmatic?)"
        )
    if np.ptp(true) <= 1e-9:
        # Every node at one known depth: least squares answers alpha = 0, a calibration that
        # maps every index to that depth.
        raise InputError(
            f"the known depth is {float(true[0]):.6g} um at every estimated node: no scale can "
            "be fitted (give tilted planes, or planes at several z0)"
        )
    design = np.stack([z, np.ones_like(z)], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(design, true, rcond=None)
    rms = float(np.sqrt(np.mean((alpha * z + beta - true) ** 2)))
    return DepthCalibration(float(alpha), float(beta), int(z.size), rms)
