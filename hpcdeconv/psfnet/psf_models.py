"""The parametric PSF models of the PSF-regression CNN, rendered in batches with torch.

Shajkofci & Liebling, IEEE TIP 29 (2020), Table II:

=========  ==============================  ===========================================
model      parameters (units)              PSF
=========  ==============================  ===========================================
gaussian1  width (µm)                      isotropic Gaussian, σ = width
gaussian2  width_x, width_y (µm)           axis-aligned Gaussian, σ_x, σ_y
zernike1   focus (waves)                   pupil with defocus ``focus · Z4``
zernike2   cylinder (waves), axis (rad)    pupil with astigmatism of amplitude
                                           ``cylinder`` along ``axis`` (in ``[0, π/2]``)
zernike3   focus, cylinder, axis           both
=========  ==============================  ===========================================

Zernike amplitudes are RMS-normalised, in waves (Noll 4: defocus; Noll 5 and 6:
astigmatism, ``cylinder · (sin 2φ Z5 + cos 2φ Z6)``, see
:func:`hpcdeconv.physics.zernike.astigmatism_coefficients`). The axis angle φ is in
radians in ``[0, π]`` (``[0, π/2]`` for zernike2, whose axis is defined modulo π/2),
counter-clockwise from X towards Y. A Zernike PSF is
``|IFFT(P)|²`` of the pupil ``P = A exp(2πi W)`` on the frequency grid of the PSF, with
``A`` the aperture ``|k| ≤ NA / λ``: the same computation as
:func:`hpcdeconv.physics.zernike.zernike_psf`, batched.

Because the PSF of ``−W`` is the PSF of ``W`` rotated by 180° and both aberrations are
even, a defocus of ``−f`` with astigmatism along φ gives the same PSF as ``+f`` along
``φ + π/2``: ``focus ≥ 0`` and the axis angle together carry the sign of the defocus,
which depth from astigmatism (eq. 14) uses.

Every PSF is ``(K, K)``, ``K = optics.psf_size``, centre at ``K // 2``, unit sum, float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hpcdeconv.config.psfnet import PSFModelConfig, PSFModelName, PSFOptics
from hpcdeconv.errors import ConfigError
from hpcdeconv.physics.psf_grid import check_optics
from hpcdeconv.physics.zernike import zernike

#: Below this cylinder amplitude (waves) a PSF is too round for its axis to be defined.
AXIS_DEFINED_FROM = 0.05


@dataclass(frozen=True)
class Parameter:
    """One parameter of a PSF model.

    Attributes
    ----------
    name, unit
        Its name and unit (``"um"``, ``"waves"`` or ``"rad"``).
    low, high
        The range samples are drawn from (uniformly) and the network's outputs are scaled to.
    lowest, highest
        The limits of its meaning (e.g. a width is positive); ``low`` and ``high`` must lie
        within them.
    """

    name: str
    unit: str
    low: float
    high: float
    lowest: float
    highest: float = math.inf


# Default ranges: widths of 0.5-5 pixels at the default 0.325 µm pixel; defocus and
# astigmatism up to about the depth of field of NA 0.45.
_DEFAULTS: dict[str, Parameter] = {
    "width": Parameter("width", "um", 0.15, 1.5, 0.0),
    "width_x": Parameter("width_x", "um", 0.15, 1.5, 0.0),
    "width_y": Parameter("width_y", "um", 0.15, 1.5, 0.0),
    "focus": Parameter("focus", "waves", 0.0, 1.5, 0.0),
    "cylinder": Parameter("cylinder", "waves", 0.0, 1.0, 0.0),
    "axis": Parameter("axis", "rad", 0.0, math.pi, 0.0, math.pi),
}

#: Per-model departures from the defaults. Without defocus, astigmatism along φ + π/2 is
#: astigmatism of the opposite sign along φ, and the PSF of ``−W`` is that of ``W`` turned by
#: 180°: zernike2's axis is defined modulo π/2 only, so it lives in ``[0, π/2]``.
_MODEL_DEFAULTS: dict[str, dict[str, Parameter]] = {
    "zernike2": {"axis": Parameter("axis", "rad", 0.0, math.pi / 2, 0.0, math.pi / 2)},
}

#: Parameter names of each model, in the order of the parameter vector.
MODEL_PARAMETERS: dict[str, tuple[str, ...]] = {
    "gaussian1": ("width",),
    "gaussian2": ("width_x", "width_y"),
    "zernike1": ("focus",),
    "zernike2": ("cylinder", "axis"),
    "zernike3": ("focus", "cylinder", "axis"),
}


def _default(model: str, name: str) -> Parameter:
    """The default range and meaning of parameter ``name`` of ``model``."""
    return _MODEL_DEFAULTS.get(model, {}).get(name, _DEFAULTS[name])


def _checked(model: str, name: str, bounds: Sequence[float]) -> Parameter:
    default = _default(model, name)
    low, high = float(bounds[0]), float(bounds[1])
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ConfigError(
            f"{model}: range of {name} must be finite with low < high, got {[low, high]}"
        )
    strict_low = default.lowest == 0.0 and default.unit == "um"
    if low < default.lowest or (strict_low and low <= 0) or high > default.highest:
        meaning = (
            f"> 0 {default.unit}"
            if strict_low
            else f"within [{default.lowest:g}, {default.highest:g}] {default.unit}"
        )
        raise ConfigError(
            f"{model}: range {[low, high]} of {name} is outside its meaning ({meaning})"
        )
    return Parameter(name, default.unit, low, high, default.lowest, default.highest)


class PSFModel:
    """A parametric PSF model: its parameters, their scaling and batched rendering.

    Parameters
    ----------
    name
        Model name (Table II).
    optics
        Optics the PSFs are computed for.
    ranges
        ``name -> (low, high)`` overrides of the default ranges.

    Raises
    ------
    ConfigError
        Unknown model or parameter, a range with ``low >= high`` or outside the
        parameter's meaning (e.g. a width ``<= 0``), or impossible optics (NA ≥ n).
    """

    def __init__(
        self,
        name: PSFModelName,
        optics: PSFOptics,
        ranges: Mapping[str, tuple[float, float]] | None = None,
    ) -> None:
        if name not in MODEL_PARAMETERS:
            raise ConfigError(f"unknown PSF model {name!r}; choose from {sorted(MODEL_PARAMETERS)}")
        names = MODEL_PARAMETERS[name]
        ranges = dict(ranges or {})
        unknown = sorted(set(ranges) - set(names))
        if unknown:
            raise ConfigError(
                f"PSF model {name} has no parameter(s) {unknown}; it has {list(names)}"
            )
        check_optics(optics.na, optics.n_immersion, optics.wavelength)
        if optics.psf_size % 2 == 0:
            raise ConfigError(
                f"optics.psf_size must be odd (centre on a pixel), got {optics.psf_size}"
            )
        self.name = name
        self.optics = optics
        self.parameters = tuple(
            _checked(name, n, ranges.get(n, (_default(name, n).low, _default(name, n).high)))
            for n in names
        )

    @property
    def names(self) -> tuple[str, ...]:
        """Parameter names, in the order of the parameter vector (``P`` of them)."""
        return tuple(p.name for p in self.parameters)

    @property
    def units(self) -> tuple[str, ...]:
        """Parameter units, ``P`` of them."""
        return tuple(p.unit for p in self.parameters)

    @property
    def is_zernike(self) -> bool:
        """Whether the PSF comes from a Zernike pupil (else a Gaussian)."""
        return self.name.startswith("zernike")

    def record(self) -> dict[str, Any]:
        """JSON-able description (model, optics, ranges) that :func:`model_from_record` reads."""
        return {
            "model": self.name,
            "optics": self.optics.model_dump(mode="json"),
            "ranges": {p.name: [p.low, p.high] for p in self.parameters},
        }

    def _bounds(self, like: Tensor | np.ndarray) -> tuple[Any, Any]:
        low = np.array([p.low for p in self.parameters], np.float32)
        span = np.array([p.high - p.low for p in self.parameters], np.float32)
        if isinstance(like, Tensor):
            return (
                torch.as_tensor(low, device=like.device, dtype=like.dtype),
                torch.as_tensor(span, device=like.device, dtype=like.dtype),
            )
        return low, span

    def to_unit(self, params: Tensor | np.ndarray) -> Tensor | np.ndarray:
        """Physical parameters ``(..., P)`` to ``[0, 1]`` over each range (the network's scale)."""
        low, span = self._bounds(params)
        return (params - low) / span

    def from_unit(self, unit: Tensor | np.ndarray) -> Tensor | np.ndarray:
        """Inverse of :meth:`to_unit`: ``(..., P)`` in range units to physical units."""
        low, span = self._bounds(unit)
        return unit * span + low

    def sample(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """``(count, P)`` float32 parameters drawn uniformly from the ranges."""
        low = np.array([p.low for p in self.parameters])
        high = np.array([p.high for p in self.parameters])
        return rng.uniform(low, high, size=(count, len(low))).astype(np.float32)

    def defined(self, params: Tensor | np.ndarray) -> Tensor | np.ndarray:
        """``(..., P)`` bool: whether each parameter is defined by its PSF.

        Every parameter is defined except the axis angle of a PSF whose cylinder amplitude
        is below :data:`AXIS_DEFINED_FROM` waves (a round spot has no axis).
        """
        out = params == params  # all True, same type and device (NaN stays undefined)
        if "axis" in self.names:
            cylinder = params[..., self.names.index("cylinder")]
            out[..., self.names.index("axis")] = cylinder >= AXIS_DEFINED_FROM
        return out

    def render(self, params: Tensor) -> Tensor:
        """PSFs of a batch of parameter vectors.

        Parameters
        ----------
        params
            ``(B, P)`` physical parameters; the PSFs are computed on its device in float32
            (Zernike pupils in complex64).

        Returns
        -------
        torch.Tensor
            ``(B, K, K)`` float32, each summing to 1, centre at ``K // 2``.

        Raises
        ------
        ValueError
            ``params`` is not ``(B, P)`` for this model's ``P``.
        """
        if params.ndim != 2 or params.shape[1] != len(self.parameters):
            raise ValueError(
                f"{self.name} renders (B, {len(self.parameters)}) parameters, "
                f"got {tuple(params.shape)}"
            )
        params = params.to(torch.float32)
        psf = self._zernike(params) if self.is_zernike else self._gaussian(params)
        return psf / psf.sum(dim=(-2, -1), keepdim=True)

    def _column(self, params: Tensor, name: str) -> Tensor:
        """``(B, 1, 1)`` column ``name`` of ``params``, or zeros if the model lacks it."""
        if name in self.names:
            return params[:, self.names.index(name), None, None]
        return params.new_zeros(params.shape[0], 1, 1)

    def _gaussian(self, params: Tensor) -> Tensor:
        k, step = self.optics.psf_size, self.optics.pixel_size
        coords = (torch.arange(k, device=params.device, dtype=torch.float32) - k // 2) * step
        if self.name == "gaussian1":
            sx = sy = self._column(params, "width")
        else:
            sx, sy = self._column(params, "width_x"), self._column(params, "width_y")
        y, x = coords[None, :, None], coords[None, None, :]
        return torch.exp(-0.5 * ((x / sx) ** 2 + (y / sy) ** 2))

    def _zernike(self, params: Tensor) -> Tensor:
        aperture, z4, z5, z6 = _pupil_basis(self.optics, params.device)
        focus = self._column(params, "focus")
        cylinder = self._column(params, "cylinder")
        axis = self._column(params, "axis")
        waves = focus * z4 + cylinder * (torch.sin(2 * axis) * z5 + torch.cos(2 * axis) * z6)
        pupil = aperture * torch.polar(torch.ones_like(waves), 2 * math.pi * waves)
        field = torch.fft.ifft2(pupil)
        return torch.fft.fftshift(field.abs().square(), dim=(-2, -1))


def _pupil_basis(optics: PSFOptics, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Aperture and Noll 4, 5, 6 on the PSF's frequency grid, each ``(K, K)`` float32."""
    k, step = optics.psf_size, optics.pixel_size
    freq = np.fft.fftfreq(k, step)
    ky, kx = freq[:, None], freq[None, :]
    kr = np.hypot(ky, kx)
    rho = kr * optics.wavelength / optics.na
    theta = np.arctan2(ky, kx)
    arrays = [(kr <= optics.na / optics.wavelength).astype(np.float64)]
    arrays += [zernike(j, rho, theta) for j in (4, 5, 6)]
    a, z4, z5, z6 = (torch.as_tensor(x, dtype=torch.float32, device=device) for x in arrays)
    return a, z4, z5, z6


def build_psf_model(cfg: PSFModelConfig) -> PSFModel:
    """The PSF model of a configuration (checked: see :class:`PSFModel`)."""
    return PSFModel(cfg.model, cfg.optics, cfg.ranges)


def model_from_record(record: Mapping[str, Any]) -> PSFModel:
    """Rebuild a model from :meth:`PSFModel.record` (stored in samples, checkpoints, maps).

    Raises
    ------
    ConfigError
        The record is not a valid model description.
    """
    try:
        cfg = PSFModelConfig(
            model=record["model"],
            optics=PSFOptics(**record["optics"]),
            ranges={k: (float(v[0]), float(v[1])) for k, v in record["ranges"].items()},
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"not a PSF model description: {str(err).splitlines()[0]}") from None
    return build_psf_model(cfg)
