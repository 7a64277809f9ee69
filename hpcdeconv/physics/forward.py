"""Linear (non-circular) FFT convolution with a centred PSF, in numpy and torch.

The imaging model is ``b = h * x``: the object ``x`` is blurred
by the point-spread function ``h`` and everything outside the field of view is dark. The
PSF's centre sits at index ``n // 2`` along every axis, so a delta at voxel ``c`` becomes a
copy of ``h`` whose index ``n // 2`` lies at ``c``; the output has the shape of the input.

Circular wrap-around is avoided by zero-padding each axis to a fast FFT length of at least
``max(n + k // 2, k)`` (volume size ``n``, PSF size ``k``): that is the smallest length at
which the aliased part of the circular result falls outside the cropped field of view, so
the FFTs are about half a PSF smaller than a full ``n + k - 1`` linear convolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.fft
import torch
from torch import Tensor

from hpcdeconv.errors import InputError

__all__ = ["FFTConvolver", "convolve", "convolve_adjoint", "convolve_torch", "padded_shape"]


def _check_pair(volume_shape: Sequence[int], psf_shape: Sequence[int]) -> None:
    """Raise unless the volume's spatial axes and the PSF's axes are equally many."""
    if len(volume_shape) != len(psf_shape):
        raise InputError(
            f"volume has {len(volume_shape)} axes but the PSF has {len(psf_shape)}; they must match"
        )


def padded_shape(shape: Sequence[int], psf_shape: Sequence[int]) -> tuple[int, ...]:
    """Fast FFT sizes at which circular convolution equals the cropped linear one.

    Parameters
    ----------
    shape
        Spatial shape of the volume, ``(*spatial)``.
    psf_shape
        Shape of the PSF, same number of axes.

    Returns
    -------
    tuple of int
        Per-axis 2·3·5-smooth lengths ``>= max(n + k // 2, k)``.
    """
    _check_pair(shape, psf_shape)
    return tuple(
        scipy.fft.next_fast_len(max(n + k // 2, k), real=True)
        for n, k in zip(shape, psf_shape, strict=True)
    )


def _crop(array: np.ndarray | Tensor, shape: Sequence[int]) -> np.ndarray | Tensor:
    """Keep the leading ``shape`` entries of the trailing ``len(shape)`` axes."""
    index = (Ellipsis, *(slice(0, n) for n in shape))
    return array[index]


def _numpy_otf(psf: np.ndarray, fft_shape: Sequence[int]) -> np.ndarray:
    """OTF of ``psf`` with its centre moved to the origin of a ``fft_shape`` grid."""
    padded = np.zeros(fft_shape, dtype=psf.dtype)
    padded[tuple(slice(0, k) for k in psf.shape)] = psf
    # Rolling the centre to index 0 makes the output's origin coincide with the input's.
    shifted = np.roll(padded, [-(k // 2) for k in psf.shape], axis=tuple(range(psf.ndim)))
    return scipy.fft.rfftn(shifted)


def _numpy_apply(volume: np.ndarray, psf: np.ndarray, adjoint: bool) -> np.ndarray:
    volume = np.asarray(volume)
    psf = np.asarray(psf)
    dtype = np.result_type(volume.dtype, psf.dtype, np.float32)
    fft_shape = padded_shape(volume.shape, psf.shape)
    otf = _numpy_otf(psf.astype(dtype, copy=False), fft_shape)
    if adjoint:
        # Correlation with h is convolution with its mirror: conj(H) in Fourier space.
        np.conjugate(otf, out=otf)
    spectrum = scipy.fft.rfftn(volume.astype(dtype, copy=False), s=fft_shape)
    spectrum *= otf
    out = scipy.fft.irfftn(spectrum, s=fft_shape)
    return np.ascontiguousarray(_crop(out, volume.shape), dtype=dtype)


def convolve(volume: np.ndarray, psf: np.ndarray) -> np.ndarray:
    """Blur ``volume`` with a centred ``psf``: linear convolution, same-size output.

    Implements ``b[i] = sum_j h[j] x[i + k // 2 - j]`` with ``x = 0`` outside the volume.

    Parameters
    ----------
    volume
        Object, shape ``(*spatial)`` (2D ``(Y, X)`` or 3D ``(Z, Y, X)``).
    psf
        Point-spread function with the same number of axes, centre at ``k // 2``.

    Returns
    -------
    numpy.ndarray
        Blurred volume, shape ``(*spatial)``; float32 for float32 inputs, otherwise the
        promoted floating dtype.
    """
    return _numpy_apply(volume, psf, adjoint=False)


def convolve_adjoint(volume: np.ndarray, psf: np.ndarray) -> np.ndarray:
    """Transpose of :func:`convolve`: correlation with ``psf`` and the same cropping.

    Satisfies ``<convolve(x, h), y> = <x, convolve_adjoint(y, h)>``; this is the
    ``h^T *`` step of Richardson-Lucy.

    Parameters
    ----------
    volume
        Image to back-project, shape ``(*spatial)``.
    psf
        Point-spread function with the same number of axes, centre at ``k // 2``.

    Returns
    -------
    numpy.ndarray
        Shape ``(*spatial)``, dtype as in :func:`convolve`.
    """
    return _numpy_apply(volume, psf, adjoint=True)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """FFT precision: float64 stays, anything narrower (fp16, bf16) runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class FFTConvolver:
    """Convolution and correlation with a fixed PSF on volumes of one spatial shape.

    The OTF of the padded size is computed once, so iterative solvers such as
    Richardson-Lucy pay two real FFTs per application. Gradients flow to ``x`` and, if the
    PSF requires grad, to the PSF (build a new convolver after each PSF update).

    Parameters
    ----------
    psf
        Point-spread function, shape ``(*K)`` with centre at ``k // 2``; its device decides
        where the OTF lives.
    shape
        Spatial shape ``(*spatial)`` of the volumes that will be convolved.
    fft_shape
        FFT lengths, at least ``max(n, k)`` per axis; default :func:`padded_shape` (linear
        convolution). Shorter lengths alias up to ``k // 2`` voxels at the edges, which a
        caller that crops those edges away (a symmetrically extended volume) may accept.
    """

    def __init__(
        self, psf: Tensor, shape: tuple[int, ...], fft_shape: Sequence[int] | None = None
    ) -> None:
        self.shape = tuple(int(n) for n in shape)
        if fft_shape is None:
            self.fft_shape = padded_shape(self.shape, psf.shape)
        elif any(f < max(n, k) for f, n, k in zip(fft_shape, shape, psf.shape, strict=True)):
            raise InputError(f"fft_shape {tuple(fft_shape)} is shorter than {shape} or the PSF")
        else:
            self.fft_shape = tuple(int(f) for f in fft_shape)
        self.dims = tuple(range(-psf.ndim, 0))
        self.compute_dtype = _compute_dtype(psf.dtype)
        self.otf = self._otf(psf.to(self.compute_dtype))

    def _otf(self, psf: Tensor) -> Tensor:
        pad = []
        for n_fft, k in zip(reversed(self.fft_shape), reversed(psf.shape), strict=True):
            pad.extend((0, n_fft - k))
        padded = torch.nn.functional.pad(psf, pad)
        shifted = torch.roll(padded, shifts=[-(k // 2) for k in psf.shape], dims=self.dims)
        return torch.fft.rfftn(shifted, dim=self.dims)

    def _apply(self, x: Tensor, otf: Tensor) -> Tensor:
        if tuple(x.shape[-len(self.shape) :]) != self.shape:
            raise InputError(
                f"expected spatial shape {self.shape}, got {tuple(x.shape[-len(self.shape) :])}"
            )
        dtype = torch.promote_types(self.compute_dtype, _compute_dtype(x.dtype))
        spectrum = torch.fft.rfftn(x.to(dtype), s=self.fft_shape, dim=self.dims)
        out = torch.fft.irfftn(spectrum * otf, s=self.fft_shape, dim=self.dims)
        return _crop(out, self.shape).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Convolve: ``(..., *spatial) -> (..., *spatial)``, same dtype as ``x``."""
        return self._apply(x, self.otf)

    def adjoint(self, x: Tensor) -> Tensor:
        """Correlate (transpose of :meth:`forward`): ``(..., *spatial) -> (..., *spatial)``."""
        return self._apply(x, self.otf.conj())


def convolve_torch(x: Tensor, psf: Tensor) -> Tensor:
    """Differentiable linear convolution of ``x`` with a centred ``psf``.

    Parameters
    ----------
    x
        Volumes, shape ``(..., *spatial)``; the last ``psf.ndim`` axes are spatial and any
        leading axes (e.g. ``(B, C)``) are batched.
    psf
        Point-spread function, shape ``(*K)``, on the same device as ``x``.

    Returns
    -------
    torch.Tensor
        Shape and dtype of ``x``; FFTs run in float32 (float64 for float64 inputs).
    """
    if x.ndim < psf.ndim:
        raise InputError(f"input has {x.ndim} axes, fewer than the PSF's {psf.ndim}")
    return FFTConvolver(psf, tuple(x.shape[-psf.ndim :])).forward(x)
