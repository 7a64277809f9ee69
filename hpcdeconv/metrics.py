"""Image-quality and regression metrics: PSNR, SSIM (2D/3D, channels), PCC, R², SNR.

Every function takes array-likes (numpy, or dask through ``np.asarray``) of equal shape
and computes in float64; the image metrics return a Python float, :func:`r2_score` one
value per regressed parameter. :func:`pcc` is the project's one normalised
cross-correlation (zero-mean NCC and Pearson's r are the same number).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

from hpcdeconv.errors import InputError

__all__ = [
    "SSIM_WINDOW",
    "delta_snr",
    "fitted_win_size",
    "pcc",
    "psnr",
    "r2_score",
    "snr",
    "ssim",
    "ssim_as_seen",
]

_K1 = 0.01
_K2 = 0.03
_TRUNCATE = 3.5  # Gaussian kernel extent in sigmas, as skimage uses for SSIM


def _kernel_width(sigma: float) -> int:
    """Width ``2 int(3.5 sigma + 0.5) + 1`` of the truncated Gaussian SSIM window."""
    return 2 * int(_TRUNCATE * sigma + 0.5) + 1


#: The default SSIM window (sigma 1.5 voxels): 11 voxels per axis.
SSIM_WINDOW = _kernel_width(1.5)


def _pair(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as float64 arrays of one shape."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise InputError(f"arrays must have the same shape, got {a.shape} and {b.shape}")
    return a, b


def _ratio_db(signal_power: float, noise_power: float) -> float:
    """``10 log10(signal / noise)``; ``inf`` when the noise power is zero."""
    if noise_power == 0.0:
        return float("inf")
    return float(10.0 * np.log10(signal_power / noise_power))


def psnr(x: ArrayLike, ref: ArrayLike, data_range: float) -> float:
    """Peak signal-to-noise ratio ``10 log10(data_range^2 / MSE)`` in dB.

    Parameters
    ----------
    x, ref
        Image and reference, same shape ``(*spatial)``.
    data_range
        Peak-to-peak range of valid intensities (e.g. 1 for images in ``[0, 1]``).
    """
    x, ref = _pair(x, ref)
    return _ratio_db(data_range**2, float(np.mean((x - ref) ** 2)))


def _local_mean(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-weighted local mean with reflecting borders, same shape as ``image``."""
    return ndimage.gaussian_filter(image, sigma, mode="reflect", truncate=_TRUNCATE)


def ssim(
    x: ArrayLike,
    ref: ArrayLike,
    data_range: float,
    sigma: float = 1.5,
    win_size: int | None = None,
    channel_axis: int | None = None,
) -> float:
    """Mean structural similarity with a Gaussian window (Wang et al. 2004).

    Local means, variances and covariance come from a Gaussian filter of std ``sigma``
    truncated at 3.5 sigma with reflecting borders; the SSIM map

        ((2 mu_x mu_y + C1)(2 s_xy + C2)) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)),

    ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``, is averaged after cropping
    ``(win_size - 1) // 2`` voxels at every border. This equals
    ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
    use_sample_covariance=False)``, including its ``win_size`` and ``channel_axis``
    semantics: with channels, the mean over channels of each channel's SSIM.

    Parameters
    ----------
    x, ref
        Images, same shape, 2D ``(Y, X)`` or 3D ``(Z, Y, X)``, or with a channel axis
        (e.g. ``(C, Y, X)``, ``channel_axis=0``).
    data_range
        Peak-to-peak range ``L`` of valid intensities.
    sigma
        Standard deviation of the Gaussian window, in voxels.
    win_size
        Odd border-crop width; defaults to the kernel width ``2 int(3.5 sigma + 0.5) + 1``.
    channel_axis
        Axis of ``x`` holding channels (scored separately, then averaged); None: no channels.

    Raises
    ------
    InputError
        Shapes differ, the spatial axes are not 2 or 3, or ``win_size`` is even or larger
        than the smallest side.
    """
    x, ref = _pair(x, ref)
    if channel_axis is not None:
        x, ref = np.moveaxis(x, channel_axis, 0), np.moveaxis(ref, channel_axis, 0)
        return float(
            np.mean([ssim(a, b, data_range, sigma, win_size) for a, b in zip(x, ref, strict=True)])
        )
    if x.ndim not in (2, 3):
        raise InputError(f"ssim needs 2D or 3D images, got {x.ndim} dimensions")
    if win_size is None:
        win_size = _kernel_width(sigma)
    if win_size % 2 == 0 or win_size > min(x.shape):
        raise InputError(
            f"win_size must be odd and at most the smallest image side {min(x.shape)}, "
            f"got {win_size}"
        )
    mu_x, mu_y = _local_mean(x, sigma), _local_mean(ref, sigma)
    var_x = _local_mean(x * x, sigma) - mu_x**2
    var_y = _local_mean(ref * ref, sigma) - mu_y**2
    cov = _local_mean(x * ref, sigma) - mu_x * mu_y
    c1 = (_K1 * data_range) ** 2
    c2 = (_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    pad = (win_size - 1) // 2
    core = tuple(slice(pad, n - pad) for n in ssim_map.shape)
    return float(ssim_map[core].mean())


def fitted_win_size(shape: tuple[int, ...], sigma: float = 1.5) -> int:
    """SSIM border-crop width for an image of spatial ``shape``: the Gaussian kernel width
    ``2 int(3.5 sigma + 0.5) + 1``, or the largest odd width that fits the smallest side."""
    side = min(shape)
    return min(_kernel_width(sigma), side if side % 2 else side - 1)


def ssim_as_seen(
    x: ArrayLike, ref: ArrayLike, data_range: float, spatial_dims: int
) -> tuple[float, int]:
    """Mean SSIM of the images a ``spatial_dims``-D network sees, and the window used.

    The last ``spatial_dims`` axes are one image; every leading axis (channels, or the
    planes of a stack run by a 2D network) indexes images scored apart and averaged. An
    image thinner than the default window (11 voxels) is scored with the largest odd
    window that fits (:func:`fitted_win_size`).

    Parameters
    ----------
    x, ref
        Images, same shape ``(..., *S)``, ``len(S) == spatial_dims`` (2 or 3).
    data_range
        Peak-to-peak range ``L`` of valid intensities.
    spatial_dims
        Axes of one image, 2 (Y, X) or 3 (Z, Y, X).

    Returns
    -------
    tuple[float, int]
        The mean SSIM and the window (border-crop width) it used.

    Raises
    ------
    InputError
        Shapes differ, or the arrays have fewer than ``spatial_dims`` axes.
    """
    x, ref = _pair(x, ref)
    if spatial_dims not in (2, 3) or x.ndim < spatial_dims:
        raise InputError(f"cannot score {spatial_dims}D images in an array of shape {x.shape}")
    image_shape = x.shape[x.ndim - spatial_dims :]
    win_size = fitted_win_size(image_shape)
    pairs = zip(x.reshape(-1, *image_shape), ref.reshape(-1, *image_shape), strict=True)
    score = float(np.mean([ssim(a, b, data_range, win_size=win_size) for a, b in pairs]))
    return score, win_size


def pcc(x: ArrayLike, y: ArrayLike) -> float:
    """Pearson correlation coefficient of all voxels; ``nan`` if either input is constant.

    This is the zero-mean normalised cross-correlation (NCC) of the two arrays, e.g. of a
    learned and a true PSF.
    """
    x, y = _pair(x, y)
    dx = x - x.mean()
    dy = y - y.mean()
    denominator = np.sqrt(np.sum(dx * dx) * np.sum(dy * dy))
    if denominator == 0.0:
        return float("nan")
    return float(np.sum(dx * dy) / denominator)


def r2_score(pred: ArrayLike, true: ArrayLike, valid: ArrayLike | None = None) -> np.ndarray:
    """Coefficient of determination per regressed parameter (PSF-regression paper, eq. 15).

    ``R² = 1 - Σ (y - ŷ)² / Σ (y - ȳ)²`` over the samples of each parameter, ``y`` the true
    and ``ŷ`` the predicted values, ``ȳ`` the mean of ``y``; with ``valid``, only the
    entries marked valid enter the sums and the mean (parameters a sample does not define,
    e.g. the astigmatism of an in-focus bead, are left out).

    Parameters
    ----------
    pred, true
        ``(N, P)`` predictions and true values of ``P`` parameters for ``N`` samples
        (``(N,)`` for one parameter).
    valid
        ``(N, P)`` (or ``(N,)``) bool, which entries count; default all.

    Returns
    -------
    numpy.ndarray
        ``(P,)`` float64 (``()`` for ``(N,)`` inputs); ``nan`` for a parameter with no
        valid entry or a constant true value.

    Raises
    ------
    InputError
        Shapes differ or are not ``(N,)`` / ``(N, P)``.
    """
    pred, true = _pair(pred, true)
    if true.ndim not in (1, 2):
        raise InputError(f"r2_score needs (N,) or (N, P) values, got shape {true.shape}")
    mask = np.ones(true.shape, bool) if valid is None else np.asarray(valid, dtype=bool)
    if mask.shape != true.shape:
        raise InputError(f"valid mask of shape {mask.shape} does not match values {true.shape}")
    count = mask.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(mask, true, 0.0).sum(axis=0) / count
        ss_tot = np.where(mask, (true - mean) ** 2, 0.0).sum(axis=0)
        ss_res = np.where(mask, (true - pred) ** 2, 0.0).sum(axis=0)
        score = 1.0 - ss_res / ss_tot
    return np.where((count > 0) & (ss_tot > 0), score, np.nan)


def snr(clean: ArrayLike, noisy: ArrayLike) -> float:
    """SNR in dB of ``noisy`` against ``clean``: ``10 log10(sum(c^2) / sum((n - c)^2))``."""
    clean, noisy = _pair(clean, noisy)
    return _ratio_db(float(np.sum(clean**2)), float(np.sum((noisy - clean) ** 2)))


def delta_snr(clean: ArrayLike, noisy: ArrayLike, restored: ArrayLike) -> float:
    """SNR gain of a restoration: ``snr(clean, restored) - snr(clean, noisy)`` in dB."""
    return snr(clean, restored) - snr(clean, noisy)
