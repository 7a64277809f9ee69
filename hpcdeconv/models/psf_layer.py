"""Linear blur generator: one learnable 2D or 3D convolution whose kernel is the PSF."""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpcdeconv.config import KernelConfig
from hpcdeconv.errors import ConfigError, InputError
from hpcdeconv.physics.forward import convolve_torch
from hpcdeconv.physics.psf import gaussian
from hpcdeconv.physics.psf_io import read_psf

Init = Literal["delta", "gaussian"]
Constraint = Literal["none", "simplex"]

# Smallest kernel value representable under the simplex parametrisation: softplus never
# reaches zero, so zero entries of an initial kernel are stored as this (float32-safe).
_SIMPLEX_FLOOR = 1e-8


def _inverse_softplus(y: np.ndarray) -> np.ndarray:
    """Solve softplus(θ) = y for y > 0, stable for small and large y."""
    return y + np.log(-np.expm1(-y))


def delta_kernel(kernel_size: tuple[int, ...]) -> np.ndarray:
    """Unit impulse at index ``n // 2`` per axis, shape ``kernel_size``."""
    h = np.zeros(kernel_size, dtype=np.float64)
    h[tuple(n // 2 for n in kernel_size)] = 1.0
    return h


class PSFLayer(nn.Module):
    """Blur generator of Lim et al., "CycleGAN with a blur kernel for deconvolution
    microscopy: optimal transport geometry", IEEE Trans. Comput. Imaging 6 (2020).

    A single linear convolution without bias, ``y = h ∗ x`` (paper eq. 1), evaluated as
    a *linear* convolution with zeros outside the volume and cropped to the input size with
    the PSF centre at index ``n // 2`` per axis, so that it equals
    ``hpcdeconv.physics.forward.convolve``. In the blind method ``h`` is learned; in the
    non-blind method it is fixed (``learnable=False``).

    Kernels larger than ``fft_threshold`` on any side are applied by FFT through
    :func:`hpcdeconv.physics.forward.convolve_torch` (same result, differentiable in ``h``
    and ``x``, computed in float32 or wider), smaller ones by a direct ``conv3d`` (``conv2d``
    for a 2D PSF).

    Parameters
    ----------
    kernel_size
        PSF shape (Z, Y, X), or (Y, X) for 2D images; even and odd sides are allowed.
    init
        ``"delta"``, ``"gaussian"`` (with ``sigma``) or an array of shape ``kernel_size``.
    sigma
        Gaussian standard deviation in voxels (scalar or per axis) for ``init="gaussian"``.
    constraint
        ``"none"``: raw kernel weights as in the paper. ``"simplex"``: the kernel is
        ``softplus(θ) / Σ softplus(θ)``, non-negative and summing to one with gradients
        flowing to every entry. Entries that start at zero are stored as ``1e-8`` and,
        softplus being flat there, move slowly: prefer a Gaussian start for blind training.
    learnable
        Whether the kernel receives gradients.
    fft_threshold
        Use FFT convolution when any kernel side exceeds this. Default from forward +
        backward timings on 2×64³ on a 2-core CPU (direct vs FFT): 0.12 vs 0.27 s at 3³,
        0.22 vs 0.16 s at 5³, 0.50 vs 0.24 s at 7³.
    """

    def __init__(
        self,
        kernel_size: tuple[int, ...],
        init: Init | np.ndarray = "delta",
        sigma: float | tuple[float, ...] = 1.0,
        constraint: Constraint = "none",
        learnable: bool = True,
        fft_threshold: int = 3,
    ) -> None:
        super().__init__()
        self.kernel_size = tuple(int(n) for n in kernel_size)
        if len(self.kernel_size) not in (2, 3) or min(self.kernel_size) < 1:
            raise ConfigError(
                f"PSF kernel_size must be two or three positive sides, got {kernel_size}"
            )
        if constraint not in ("none", "simplex"):
            raise ConfigError(f"PSF constraint must be 'none' or 'simplex', got {constraint!r}")
        self.constraint = constraint
        self.fft_threshold = fft_threshold
        self.weight = nn.Parameter(
            torch.zeros(self.kernel_size, dtype=torch.float32), requires_grad=learnable
        )
        self.load_kernel(self._initial_kernel(init, sigma))

    def _initial_kernel(
        self, init: Init | np.ndarray, sigma: float | tuple[float, ...]
    ) -> np.ndarray:
        if isinstance(init, np.ndarray):
            return init
        if init == "delta":
            return delta_kernel(self.kernel_size)
        if init == "gaussian":
            return gaussian(self.kernel_size, sigma)
        raise ConfigError(f"PSF init must be 'delta', 'gaussian' or an array, got {init!r}")

    @property
    def uses_fft(self) -> bool:
        """Whether :meth:`forward` convolves by FFT (a kernel side exceeds the threshold)."""
        return max(self.kernel_size) > self.fft_threshold

    def kernel(self) -> Tensor:
        """Effective PSF ``h``, shape ``kernel_size``, in PSF orientation (centre at ``n // 2``)."""
        if self.constraint == "simplex":
            positive = F.softplus(self.weight)
            return positive / positive.sum()
        return self.weight

    @torch.no_grad()
    def load_kernel(self, h: np.ndarray) -> None:
        """Set the PSF to ``h`` (shape ``kernel_size``).

        Under the simplex constraint ``h`` is clipped at zero and normalised to sum one.

        Raises
        ------
        InputError
            If the shape differs from ``kernel_size``, ``h`` is not finite, or (simplex)
            it has no positive mass.
        """
        h = np.asarray(h, dtype=np.float64)
        if h.shape != self.kernel_size:
            raise InputError(
                f"PSF of shape {h.shape} does not match kernel_size {self.kernel_size}"
            )
        if not np.all(np.isfinite(h)):
            raise InputError("PSF contains NaN or infinite values")
        if self.constraint == "simplex":
            h = np.clip(h, 0.0, None)
            if h.sum() <= 0:
                raise InputError("PSF has no positive values; cannot normalise it to sum one")
            h = _inverse_softplus(np.maximum(h / h.sum(), _SIMPLEX_FLOOR))
        self.weight.copy_(torch.from_numpy(h))

    def penalty(self, kind: Literal["l1", "tv"]) -> Tensor:
        """Kernel regulariser Q(h), a scalar.

        ``"l1"``: ``Σ |h|`` (sparsity). ``"tv"``: anisotropic total variation
        ``Σ_axes Σ |h[i+1] − h[i]|`` (smoothness). Sums, not means, so the value does not
        depend on the kernel size for a kernel normalised to sum one.
        """
        h = self.kernel()
        if kind == "l1":
            return h.abs().sum()
        if kind == "tv":
            return sum(torch.diff(h, dim=axis).abs().sum() for axis in range(h.ndim))
        raise ConfigError(f"PSF penalty must be 'l1' or 'tv', got {kind!r}")

    @torch.no_grad()
    def export(self, smooth_sigma: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """The learned PSF for inspection and comparison with a reference.

        Parameters
        ----------
        smooth_sigma
            Standard deviation (voxels) of the Gaussian smoothing the paper applies to the
            estimated kernel; zero-padded at the borders.

        Returns
        -------
        raw, smoothed
            float64 arrays of ``kernel_size`` ((Z, Y, X) or (Y, X)), each normalised to sum
            one.

        Raises
        ------
        ValueError
            If the kernel sums to (nearly) zero and cannot be normalised.
        """
        raw = self.kernel().detach().to("cpu", torch.float64).numpy()
        smoothed = scipy.ndimage.gaussian_filter(raw, smooth_sigma, mode="constant", cval=0.0)
        return _normalised(raw), _normalised(smoothed)

    def forward(self, x: Tensor) -> Tensor:
        """Blur every channel with the PSF.

        Parameters
        ----------
        x
            (B, C, Z, Y, X) for a 3D PSF, (B, C, Y, X) for a 2D one.

        Returns
        -------
        Tensor
            Shape of ``x``: ``(h ∗ x)`` cropped to the input size, zeros outside ``x``.

        Raises
        ------
        ValueError
            ``x`` is not a batch of channels of the PSF's dimensionality.
        """
        if x.ndim != 2 + len(self.kernel_size):
            axes = "(B, C, Z, Y, X)" if len(self.kernel_size) == 3 else "(B, C, Y, X)"
            raise ValueError(
                f"a {len(self.kernel_size)}D PSFLayer expects a {axes} tensor, got {tuple(x.shape)}"
            )
        h = self.kernel()
        return convolve_torch(x, h) if self.uses_fft else _direct_convolve(x, h)


def _normalised(h: np.ndarray) -> np.ndarray:
    total = h.sum()
    if abs(total) < 1e-12:
        raise ValueError("PSF sums to zero and cannot be normalised")
    return h / total


def _direct_convolve(x: Tensor, h: Tensor) -> Tensor:
    """Same-size linear convolution by ``conv3d`` or ``conv2d``.

    ``x`` is (B, C, Z, Y, X) with ``h`` (Z, Y, X), or (B, C, Y, X) with ``h`` (Y, X).
    The convolutions are cross-correlations, so the kernel is flipped. With the centre at
    ``c = n // 2``, ``y[i] = Σ_j h[j] x[i + c − j]`` needs ``n − 1 − c`` zeros before and
    ``c`` after each axis (asymmetric for even ``n``).
    """
    channels = x.shape[1]
    weight = h.flip(tuple(range(h.ndim))).to(x.dtype).expand(channels, 1, *h.shape)
    pad: list[int] = []
    for n in reversed(h.shape):
        pad += [n - 1 - n // 2, n // 2]
    conv = F.conv3d if h.ndim == 3 else F.conv2d
    return conv(F.pad(x, pad), weight, groups=channels)


def build_psf_layer(cfg: KernelConfig, dataset_psf: np.ndarray | None, learnable: bool) -> PSFLayer:
    """The blur layer of a cycleGAN, initialised as its kernel configuration says.

    Parameters
    ----------
    cfg
        ``init: dataset`` takes ``dataset_psf``; ``file`` reads ``cfg.file`` with
        :func:`hpcdeconv.physics.psf_io.read_psf`; ``delta`` and ``gaussian`` (``sigma``
        in voxels) start blind.
    dataset_psf
        The PSF stored with the training data, ``(Z, Y, X)``, or None.
    learnable
        Whether the kernel is trained (blind) or fixed (non-blind).

    Raises
    ------
    InputError
        ``init: dataset`` without a dataset PSF; an unreadable ``kernel.file``; a PSF whose
        shape differs from ``cfg.size``.
    """
    layer = PSFLayer(
        kernel_size=cfg.size,
        init="gaussian" if cfg.init == "gaussian" else "delta",
        sigma=cfg.sigma,
        constraint=cfg.constraint,
        learnable=learnable,
    )
    if cfg.init == "file":
        assert cfg.file is not None  # KernelConfig requires it for init: file
        layer.load_kernel(read_psf(cfg.file, source="kernel.file")[0])
    elif cfg.init == "dataset":
        if dataset_psf is None:
            raise InputError(
                "kernel.init is 'dataset' but the dataset has no 'psf' array; "
                "give kernel.init=file and kernel.file"
            )
        layer.load_kernel(np.asarray(dataset_psf, dtype=np.float32))
    return layer
