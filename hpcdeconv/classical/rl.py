"""Richardson-Lucy and total-variation regularised Richardson-Lucy deconvolution in torch.

The imaging model is ``y ~ Poisson(H x)`` with ``H`` the linear (zero-padded, cropped)
convolution of :mod:`hpcdeconv.physics.forward`: PSF centre at index ``k // 2``, dark
outside the field of view, OTF computed once on fast FFT sizes. Richardson-Lucy is the
EM algorithm for this likelihood (Richardson 1972, Lucy 1974; Shepp & Vardi 1982)::

    x <- x / N * H^T( y / H x ),        N = H^T 1   (``normalize=True``)
                                        N = 1       (``normalize=False``)

Because ``H`` is truncated to the field of view, ``H^T 1`` is the fraction of a voxel's
light that reaches the detector: 1 in the interior and down to about ``2^-d`` in the
corners of a ``d``-dimensional volume with a symmetric PSF. Dividing by it is the exact
MLEM update of the truncated operator and keeps ``sum(H x) -> sum(y)``; without it the
update is the textbook one (scikit-image, ``clip=False``), which under-weights voxels
within half a PSF of the border. The two updates are identical wherever the whole PSF fits
inside the field of view, but border differences spread inward over the iterations.

TV-regularised RL (Dey et al., Microsc. Res. Tech. 69:260, 2006) adds ``lambda * TV(x)``
to the negative log-likelihood and takes the one-step-late update::

    x <- x * H^T( y / H x ) / ( N * (1 - lambda * div( grad x / |grad x|_eps )) )

with forward differences for ``grad``, its negative adjoint for ``div`` and
``|g|_eps = sqrt(|g|^2 + eps^2)``. With ``N = 1`` this is Dey's update; with ``N = H^T 1``
it coincides with it wherever ``N = 1`` and stays positive at the borders. The field
``p = grad x / |grad x|_eps`` has ``|p| <= 1`` at every voxel, so
``|div p| = |sum_a (p_a[i] - p_a[i - e_a])| <= sqrt(d) + d`` and
``lambda < 1 / (d + sqrt(d))`` keeps the denominator positive.

Boundary. ``boundary="truncated"`` uses ``H`` as above: the scene is dark outside the
field of view, so a voxel within half a PSF of the border must explain light that in a
real sample came from its unseen neighbours. On a uniform field of value 100
(32 x 48 x 48, 15^3 Gaussian PSF with sigma (3, 2, 2) voxels, 20 iterations) the estimate
reaches about 1196 in the corners and 243 at the centres of the faces, undershoots to
about 58 a few voxels in from the corners and rings inward (96 at the centre): the rim.
``boundary="reflect"`` assumes that the scene continues past the border as its mirror
image (numpy ``mode="symmetric"``)::

    H = C E,    H^T = E^T C^T

with ``E`` the symmetric extension of the estimate by ``k // 2`` voxels per side, ``C``
the convolution cropped back to the field of view and ``E^T`` the adjoint of the
extension (it folds the light of the mirrored voxels back onto their originals). A
constant is then a fixed point of the update for a symmetric PSF (``H 1 = 1`` and
``H^T 1 = 1``), so a uniform field stays uniform and there is no rim. Each side of each
axis may be given its own treatment: block-wise runs apply the chosen one at the volume's
own border and reflect at a block's edges inside the volume (see
:class:`~hpcdeconv.inference.driver.RLProcessor`).

The initial estimate is the constant mean of the image. For any constant start the first
update gives ``x_1 = H^T(y / H 1) / N`` regardless of the constant, so this matches
scikit-image's start at 0.5 up to the ``eps`` floor; the mean keeps ``eps`` small relative
to the data's own scale.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np
import scipy.fft
import torch
from torch import Tensor

from hpcdeconv.errors import ConfigError, InputError
from hpcdeconv.physics.forward import FFTConvolver

__all__ = [
    "BOUNDARIES",
    "Boundaries",
    "Boundary",
    "richardson_lucy",
    "richardson_lucy_torch",
    "rl_halo",
    "tv_divergence",
]

#: How the operator treats the image border: mirror the scene, or assume darkness beyond it.
Boundary = Literal["reflect", "truncated"]
BOUNDARIES: tuple[str, ...] = get_args(Boundary)

logger = logging.getLogger(__name__)


def _check_parameters(iterations: int, tv: float, eps: float, ndim: int) -> None:
    """Raise ``ConfigError`` for an iteration count, TV weight or epsilon out of range."""
    if iterations < 0:
        raise ConfigError(f"iterations must be >= 0, got {iterations}")
    if not eps > 0.0:
        raise ConfigError(f"eps must be > 0, got {eps}")
    tv_max = 1.0 / (ndim + math.sqrt(ndim))
    if not 0.0 <= tv < tv_max:
        raise ConfigError(f"tv must lie in [0, {tv_max:.3f}) for {ndim}D data, got {tv}")


def _check_arrays(image: Tensor, psf: Tensor) -> None:
    """Raise ``InputError`` unless image and PSF are finite, non-empty and 2D/3D alike."""
    if image.ndim not in (2, 3):
        raise InputError(f"image must be 2D (Y, X) or 3D (Z, Y, X), got {image.ndim} axes")
    if psf.ndim != image.ndim:
        raise InputError(f"PSF has {psf.ndim} axes but the image has {image.ndim}; they must match")
    if image.numel() == 0 or psf.numel() == 0:
        raise InputError(f"empty input: image {tuple(image.shape)}, PSF {tuple(psf.shape)}")
    for name, array in (("image", image), ("PSF", psf)):
        if not bool(torch.isfinite(array).all()):
            raise InputError(f"{name} contains NaN or infinite values")


def _non_negative(array: Tensor, name: str) -> Tensor:
    """Copy of ``array`` with negative values (noise, background subtraction) set to 0."""
    negative = int((array < 0).sum())
    if negative:
        logger.debug("clipping %d negative %s values to 0", negative, name)
    return array.clamp_min(0.0)


def _unit_psf(psf: Tensor) -> Tensor:
    """Non-negative PSF scaled to unit sum, so that ``H`` conserves light."""
    psf = _non_negative(psf, "PSF")
    total = psf.sum()
    if not total > 0:
        raise InputError("PSF has no positive values")
    return psf / total


def _compute_dtype(image: Tensor) -> torch.dtype:
    """float64 stays float64; every other dtype (integers, halves) runs in float32."""
    return torch.float64 if image.dtype == torch.float64 else torch.float32


def tv_divergence(x: Tensor, eps: float) -> Tensor:
    """Curvature term ``div( grad x / sqrt(|grad x|^2 + eps^2) )`` of TV regularisation.

    ``grad`` is the forward difference with a zero last difference (Neumann boundary) and
    ``div`` is its negative adjoint, so ``<grad u, p> = -<u, div p>`` for all ``u``, ``p``.

    Parameters
    ----------
    x
        Estimate, shape ``(*spatial)``; every axis is differentiated.
    eps
        Smoothing of the gradient magnitude, in the units of ``x``.

    Returns
    -------
    torch.Tensor
        Shape and dtype of ``x``; bounded by ``x.ndim + sqrt(x.ndim)`` in magnitude.
    """
    grads = [_forward_difference(x, axis) for axis in range(x.ndim)]
    magnitude = torch.stack(grads).square_().sum(0).add_(eps * eps).sqrt_()
    return sum(_backward_difference(g / magnitude, axis) for axis, g in enumerate(grads))


def _forward_difference(x: Tensor, axis: int) -> Tensor:
    """``x[i + 1] - x[i]`` along ``axis``, 0 at the last index."""
    pad = [0, 0] * (x.ndim - 1 - axis) + [0, 1]
    return torch.nn.functional.pad(torch.diff(x, dim=axis), pad)


def _backward_difference(p: Tensor, axis: int) -> Tensor:
    """``p[i] - p[i - 1]`` along ``axis`` with ``p[-1] = 0``: minus the adjoint of the above.

    Exact as the adjoint only for fields whose last entry along ``axis`` is 0, which
    :func:`_forward_difference` guarantees.
    """
    pad = [0, 0] * (p.ndim - 1 - axis) + [1, 0]
    return torch.diff(torch.nn.functional.pad(p, pad), dim=axis)


class _PocketFFT:
    """``H`` and ``H^T`` of an :class:`FFTConvolver` on the CPU, one axis at a time.

    The OTF is the convolver's; only the transforms differ. Axis by axis, each transform
    skips the lines that are all padding on the way in (the operand lives in the first
    ``n`` of ``N`` entries per axis) and those cropped away on the way out: about 20 %
    fewer butterflies than a full ``N``-point transform. With scipy's pocketfft this runs
    about 1.5x faster than torch's CPU FFT on the project's machines (AMD EPYC, where
    MKL's complex-to-real transform is slow); results agree to float round-off.

    Parameters
    ----------
    convolver
        Convolver whose ``otf`` (on the CPU) and ``fft_shape`` define the operator.
    """

    def __init__(self, convolver: FFTConvolver) -> None:
        self.shape = convolver.shape
        self.fft_shape = convolver.fft_shape
        self.otf = convolver.otf.numpy()
        self.otf_conj = np.conjugate(self.otf)

    def forward(self, x: Tensor) -> Tensor:
        """``H x``: ``(*spatial) -> (*spatial)``."""
        return self._apply(x, self.otf)

    def adjoint(self, x: Tensor) -> Tensor:
        """``H^T x``: ``(*spatial) -> (*spatial)``."""
        return self._apply(x, self.otf_conj)

    def _apply(self, x: Tensor, otf: np.ndarray) -> Tensor:
        workers = torch.get_num_threads()
        axes = range(len(self.shape))
        spectrum = scipy.fft.rfft(x.numpy(), n=self.fft_shape[-1], axis=-1, workers=workers)
        for axis in reversed(axes[:-1]):
            spectrum = scipy.fft.fft(
                spectrum, n=self.fft_shape[axis], axis=axis, workers=workers, overwrite_x=True
            )
        spectrum *= otf
        for axis in axes[:-1]:
            spectrum = scipy.fft.ifft(spectrum, axis=axis, workers=workers, overwrite_x=True)
            spectrum = spectrum[(slice(None),) * axis + (slice(0, self.shape[axis]),)]
        out = scipy.fft.irfft(spectrum, n=self.fft_shape[-1], axis=-1, workers=workers)
        return torch.from_numpy(out[..., : self.shape[-1]])


def _operator(convolver: FFTConvolver) -> FFTConvolver | _PocketFFT:
    """The fastest implementation of the convolver's ``H`` / ``H^T`` for its device."""
    return _PocketFFT(convolver) if convolver.otf.device.type == "cpu" else convolver


def _mirror_index(size: int, before: int, after: int, device: torch.device) -> Tensor:
    """Source index of each voxel of an axis of ``size`` extended symmetrically.

    numpy's ``mode="symmetric"`` (edge voxel repeated, ``-1 -> 0``), reflected again as
    often as needed when a width exceeds ``size``: the extension has period ``2 size``.
    """
    index = torch.arange(-before, size + after, device=device) % (2 * size)
    return torch.where(index >= size, 2 * size - 1 - index, index)


class _Mirrored:
    """``H = C E`` and ``H^T = E^T C^T``: convolution of the symmetrically extended estimate.

    ``E`` extends each axis by ``widths[a]`` voxels before and after (0 keeps that side
    truncated), ``C`` is ``inner`` (the truncated operator on the extended shape) cropped
    back to the field of view, and ``E^T`` adds the mirrored voxels onto their originals.

    Parameters
    ----------
    inner
        ``H`` / ``H^T`` on the extended shape.
    shape
        Field of view ``(*spatial)``.
    widths
        ``(before, after)`` extension per axis, in voxels.
    """

    def __init__(
        self,
        inner: FFTConvolver | _PocketFFT,
        shape: Sequence[int],
        widths: Sequence[tuple[int, int]],
        device: torch.device,
    ) -> None:
        self.inner = inner
        self.shape = tuple(int(n) for n in shape)
        self.extended = tuple(n + a + b for n, (a, b) in zip(self.shape, widths, strict=True))
        self.index = [
            _mirror_index(n, a, b, device) for n, (a, b) in zip(self.shape, widths, strict=True)
        ]
        self.view = tuple(slice(a, a + n) for n, (a, _) in zip(self.shape, widths, strict=True))

    def forward(self, x: Tensor) -> Tensor:
        """``H x``: ``(*spatial) -> (*spatial)``."""
        for axis, index in enumerate(self.index):
            x = x.index_select(axis, index)
        return self.inner.forward(x)[self.view]

    def adjoint(self, x: Tensor) -> Tensor:
        """``H^T x``: ``(*spatial) -> (*spatial)``."""
        embedded = x.new_zeros(self.extended)
        embedded[self.view] = x
        out = self.inner.adjoint(embedded)
        for axis, index in enumerate(self.index):
            shape = list(out.shape)
            shape[axis] = self.shape[axis]
            out = out.new_zeros(shape).index_add_(axis, index, out)
        return out


#: One boundary for every side, or per axis the ``(before, after)`` boundaries.
Boundaries = Boundary | Sequence[tuple[Boundary, Boundary]]


def _sides(boundary: Boundaries, ndim: int) -> list[tuple[str, str]]:
    """Per axis ``(before, after)`` boundary; ``ConfigError`` for unknown or misshapen ones."""
    sides = [(boundary, boundary)] * ndim if isinstance(boundary, str) else list(boundary)
    if len(sides) != ndim or any(len(pair) != 2 for pair in sides):
        raise ConfigError(f"boundary {boundary!r} needs (before, after) for each of {ndim} axes")
    for side in itertools.chain.from_iterable(sides):
        if side not in BOUNDARIES:
            raise ConfigError(f"boundary must be one of {', '.join(BOUNDARIES)}, got {side!r}")
    return [(str(a), str(b)) for a, b in sides]


def _build_operator(
    psf: Tensor, shape: tuple[int, ...], sides: Sequence[tuple[str, str]]
) -> FFTConvolver | _PocketFFT | _Mirrored:
    """``H`` / ``H^T`` of a unit-sum ``psf`` on images of ``shape`` with per-side boundaries."""
    # k // 2 per side covers the PSF's reach in both directions, for odd and even k.
    widths = [
        (k // 2 if before == "reflect" else 0, k // 2 if after == "reflect" else 0)
        for k, (before, after) in zip(psf.shape, sides, strict=True)
    ]
    if not any(a or b for a, b in widths):
        return _operator(FFTConvolver(psf, shape))
    extended = tuple(n + a + b for n, (a, b) in zip(shape, widths, strict=True))
    return _Mirrored(
        _operator(FFTConvolver(psf, extended, _fft_shape(extended, psf.shape, widths))),
        shape,
        widths,
        psf.device,
    )


def _fft_shape(
    extended: Sequence[int], psf_shape: Sequence[int], widths: Sequence[tuple[int, int]]
) -> tuple[int, ...]:
    """Smallest fast FFT lengths at which the kept part of the extended volume is exact.

    Output ``j`` of the circular convolution reads extended voxels ``j + c - (k - 1)`` to
    ``j + c`` (``c = k // 2``). Inside the kept field of view these stay within the
    extension on a reflected side; on a truncated side they reach ``k - 1 - c`` (before) or
    ``c`` (after) voxels past it, which must land on the zero padding, not wrap onto data.
    Where every side reflects this saves the ``k // 2`` of :func:`padded_shape`.
    """
    lengths = []
    for m, k, (before, after) in zip(extended, psf_shape, widths, strict=True):
        centre = k // 2
        reach = max(k - 1 - centre - before, centre - after, 0)
        lengths.append(scipy.fft.next_fast_len(max(m + reach, k), real=True))
    return tuple(lengths)


def _rl_step(
    x: Tensor,
    y: Tensor,
    operator: FFTConvolver | _PocketFFT | _Mirrored,
    sensitivity: Tensor | None,
    tv: float,
    eps: float,
) -> Tensor:
    """One (TV-)RL update of ``x`` in place; all tensors have shape ``(*spatial)``."""
    blurred = operator.forward(x).clamp_min_(eps)
    correction = operator.adjoint(torch.div(y, blurred, out=blurred))
    # FFT round-off can leave tiny negative corrections; a negative factor would flip x's sign.
    correction.clamp_min_(0.0)
    if tv > 0.0:
        correction /= 1.0 - tv * tv_divergence(x, eps)
    if sensitivity is not None:
        correction /= sensitivity
    return x.mul_(correction)


@torch.no_grad()
def richardson_lucy_torch(
    image: Tensor,
    psf: Tensor,
    iterations: int = 20,
    tv: float = 0.0,
    eps: float = 1e-6,
    normalize: bool = True,
    boundary: Boundaries = "reflect",
) -> Tensor:
    """Richardson-Lucy (``tv = 0``) or TV-regularised RL deconvolution of one volume.

    Implements the updates in the module docstring on the device of ``image``.

    Parameters
    ----------
    image
        Observed image, shape ``(Y, X)`` or ``(Z, Y, X)``; negative values (noise) are
        clipped to 0, NaN or infinite values are rejected.
    psf
        Point-spread function with as many axes as ``image``, centre at ``k // 2`` per axis
        (so even sizes are centred like :func:`hpcdeconv.physics.forward.convolve`); any
        size, also larger than the image. Negative values are clipped to 0 and the PSF is
        scaled to unit sum.
    iterations
        Number of updates; 0 returns the initial estimate.
    tv
        TV weight ``lambda`` in ``[0, 1 / (d + sqrt(d)))`` for ``d`` axes; typical values
        are 1e-3 to 1e-2.
    eps
        Floor of ``H x`` before the division and smoothing of ``|grad x|``, in image units.
    normalize
        Divide by ``H^T 1`` (exact MLEM for the operator) or not (textbook update, as
        scikit-image).
    boundary
        ``"reflect"``: the scene continues past the border as its mirror image, so a
        uniform field stays uniform. ``"truncated"``: dark outside the field of view (as
        scikit-image); the estimate then overshoots at the border (module docstring).
        Or per axis a ``(before, after)`` pair of these.

    Returns
    -------
    torch.Tensor
        Non-negative estimate, shape of ``image``; float64 for float64 input, otherwise
        float32.

    Raises
    ------
    InputError
        Wrong number of axes, empty arrays, non-finite values, or a PSF without positive
        values.
    ConfigError
        ``iterations``, ``tv`` or ``eps`` out of range, or an unknown or misshapen
        ``boundary``.
    """
    _check_arrays(image, psf)
    _check_parameters(iterations, tv, eps, image.ndim)
    sides = _sides(boundary, image.ndim)
    dtype = _compute_dtype(image)
    y = _non_negative(image.to(dtype), "image")
    unit = _unit_psf(psf.to(device=y.device, dtype=dtype))
    operator = _build_operator(unit, tuple(y.shape), sides)
    sensitivity = operator.adjoint(torch.ones_like(y)) if normalize else None
    x = torch.full_like(y, float(y.mean()))
    for iteration in range(iterations):
        x = _rl_step(x, y, operator, sensitivity, tv, eps)
        logger.debug("RL iteration %d/%d done", iteration + 1, iterations)
    return x


def richardson_lucy(
    image: np.ndarray,
    psf: np.ndarray,
    iterations: int = 20,
    tv: float = 0.0,
    eps: float = 1e-6,
    normalize: bool = True,
    device: str | torch.device | None = None,
    boundary: Boundaries = "reflect",
) -> np.ndarray:
    """NumPy front end of :func:`richardson_lucy_torch`, run on ``device`` (default CPU).

    Parameters
    ----------
    image, psf
        Arrays of shape ``(Y, X)`` or ``(Z, Y, X)``; see :func:`richardson_lucy_torch`.
    iterations, tv, eps, normalize, boundary
        As in :func:`richardson_lucy_torch`.
    device
        Torch device for the computation, e.g. ``"cuda"``.

    Returns
    -------
    numpy.ndarray
        Estimate, shape of ``image``; float64 for float64 input, otherwise float32.
    """
    target = torch.device("cpu") if device is None else torch.device(device)
    result = richardson_lucy_torch(
        _tensor(image).to(target),
        _tensor(psf).to(target),
        iterations=iterations,
        tv=tv,
        eps=eps,
        normalize=normalize,
        boundary=boundary,
    )
    return result.cpu().numpy()


def _tensor(array: np.ndarray) -> Tensor:
    """``array`` as a tensor; read-only, reversed or byte-swapped arrays are copied first.

    Memory-mapped TIFFs and arrays that dask deserialises on a worker are read-only, and
    torch warns when it would share their memory (it cannot honour the flag); it refuses
    negative strides and non-native byte order outright.
    """
    array = np.asarray(array)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if not array.flags.writeable or any(stride < 0 for stride in array.strides):
        array = array.copy()
    return torch.from_numpy(array)


def rl_halo(psf_shape: Sequence[int], widths: int = 3) -> tuple[int, ...]:
    """Halo per axis for running RL block-wise so that block cores match a whole-volume run.

    Each RL iteration couples voxels up to ``2 (k // 2)`` apart (``H`` then ``H^T``), so
    after ``n`` iterations a voxel depends in principle on everything ``2 n (k // 2)`` away.
    In practice a block only misses the light crossing its edge and the error decays
    about tenfold per PSF width ``2 (k // 2)`` of halo. Measured maximum deviation of the
    block core from the whole-volume result, relative to its maximum (microtubule phantom
    at 20 dB, Born & Wolf PSF, ``normalize=True``, the block's own edges reflected as
    :class:`~hpcdeconv.inference.driver.RLProcessor` does; truncating them instead is 1.5
    to 7 times worse from 2 widths on):

    ============  ==========  ==========  ==========  ==========
    PSF, iters    1 width     2 widths    3 widths    4 widths
    ============  ==========  ==========  ==========  ==========
    9^3, 20       2e-2        3e-3        1e-4        4e-5
    9^3, 40       3e-2        2e-3        8e-4        1e-4
    15^3, 20      4e-2        2e-3        3e-4        --
    ============  ==========  ==========  ==========  ==========

    The default of 3 widths keeps the core within 1e-3 of the whole volume for the usual
    10-40 iterations; 2 widths halves the halo at a few 1e-3.

    Parameters
    ----------
    psf_shape
        PSF shape ``(*K)``.
    widths
        Halo in units of the PSF width ``2 (k // 2)``.

    Returns
    -------
    tuple of int
        Halo in voxels on each side of a block, one entry per axis.
    """
    if any(int(k) < 1 for k in psf_shape):
        raise InputError(f"PSF shape must be positive, got {tuple(psf_shape)}")
    if widths < 0:
        raise ConfigError(f"widths must be >= 0, got {widths}")
    return tuple(2 * widths * (int(k) // 2) for k in psf_shape)
