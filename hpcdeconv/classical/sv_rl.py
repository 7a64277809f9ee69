"""Spatially-variant (TV-)Richardson-Lucy with an overlap-add PSF map (eq. 13).

Shajkofci & Liebling (IEEE TIP 29, 2020, eq. 13) model the blur of a 2D image whose PSF
changes across the field of view by overlap-add (Nagy & O'Leary, SIAM J. Sci. Comput. 19,
1998)::

    H x = sum_m h_m * (phi_m . x),        H^T y = sum_m phi_m . (h~_m * y)

with ``h_m`` the PSF of node ``m`` of a PSF map (:class:`~hpcdeconv.psfnet.psf_map.PSFMap`),
``*`` the linear (zero-padded, non-circular) convolution of
:mod:`hpcdeconv.physics.forward` (PSF centre at ``k // 2``), ``h~_m * y`` its transpose
(correlation) and ``phi_m`` the bilinear interpolating mask of node ``m``
(:mod:`hpcdeconv.classical.sv_masks`: the masks sum to 1 everywhere, and inside a grid
cell the local PSF is the bilinear interpolation of its four corner PSFs'
contributions). With one PSF ``h`` at every node ``H x = h * x`` exactly.

Each node's term is computed only where its mask is positive (at most two node spacings
per axis) plus the PSF's reach: the masked patches of all nodes share one shape, are
transformed in batches and added onto the output (:class:`OverlapAdd`). The update is that
of :mod:`hpcdeconv.classical.rl` with this ``H``: the same normalisation by ``H^T 1``, the
same one-step-late TV term (Dey et al. 2006) with ``lambda < 1 / (2 + sqrt 2) ~ 0.29`` in 2D,
the same per-side ``reflect`` / ``truncated`` border. Under ``reflect`` the estimate is
extended symmetrically by ``k // 2`` pixels and the extension is blurred with the PSFs of
the positions it stands in for (the masks are evaluated at the true, out-of-view
positions), so a block-wise run that reflects at its inner edges sees the PSFs a
whole-image run uses there.

Rendered map PSFs are 127 x 127 by default while most hold their light within a few
pixels; :func:`crop_size` finds the smallest centred support that keeps all but a
fraction ``loss`` (1e-4 by default in ``hpcdeconv rl --psf-map``) of every PSF's energy,
and :func:`node_psfs` crops to it and rescales each PSF to unit sum. ``loss = 0`` keeps the
PSFs whole (exact); the halo of block-wise runs scales with the cropped size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.fft
import torch
from torch import Tensor

from hpcdeconv.classical.rl import (
    as_tensor,
    check_rl_parameters,
    compute_dtype,
    non_negative,
    rl_iterations,
)
from hpcdeconv.classical.rl_operator import Boundaries, Mirrored, boundary_sides
from hpcdeconv.classical.sv_masks import hat_weights
from hpcdeconv.errors import InputError
from hpcdeconv.psfnet.psf_map import PSFMap

__all__ = [
    "OverlapAdd",
    "build_sv_operator",
    "crop_size",
    "node_psfs",
    "sv_richardson_lucy",
    "sv_richardson_lucy_torch",
]


#: Most elements of one batch of FFT buffers (nodes x FFT shape) in :class:`OverlapAdd`.
BATCH_ELEMENTS = 1 << 22


def _support(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First pixel and length of each row's positive weights (0, 0 for none)."""
    positive = weights > 0
    first = np.where(positive.any(axis=1), positive.argmax(axis=1), 0)
    last = weights.shape[1] - 1 - positive[:, ::-1].argmax(axis=1)
    length = np.where(positive.any(axis=1), last - first + 1, 0)
    return first, length


class OverlapAdd:
    """``H`` and ``H^T`` of eq. 13 on one field of view, dark outside it (truncated).

    Every node with a positive mask on the field of view contributes one patch: the
    image under its mask support (``Py x Px``, the largest support of any node), masked,
    convolved with its PSF (full linear convolution, ``Py + Ky - 1`` by ``Px + Kx - 1``,
    by FFT of a fast length with no wrap-around) and added onto the output; ``H^T``
    gathers the same output regions, correlates and masks. Batches of nodes share one
    FFT call.

    Parameters
    ----------
    psfs
        ``(gy, gx, Ky, Kx)`` unit-sum PSFs of the nodes ``first_node[0] + [0, gy)`` by
        ``first_node[1] + [0, gx)`` of the grid, centre at ``k // 2``; their device and
        dtype are used.
    centres
        Node positions ``(Gy,)`` and ``(Gx,)`` of the whole grid, in image pixels.
    shape
        ``(Y, X)`` of the field of view.
    offset
        Image coordinates of its first pixel (negative where it reaches past the image).
    first_node
        Grid index of ``psfs[0, 0]``.

    Raises
    ------
    ValueError
        A node whose mask touches the field of view has no PSF in ``psfs``.
    """

    def __init__(
        self,
        psfs: Tensor,
        centres: tuple[np.ndarray, np.ndarray],
        shape: Sequence[int],
        offset: Sequence[int] = (0, 0),
        first_node: Sequence[int] = (0, 0),
    ) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.kernel = (int(psfs.shape[-2]), int(psfs.shape[-1]))
        device = psfs.device
        axes = []
        for axis in range(2):
            weights = hat_weights(centres[axis], offset[axis], offset[axis] + self.shape[axis])
            first, length = _support(weights)
            given = range(first_node[axis], first_node[axis] + psfs.shape[axis])
            used = np.flatnonzero(length > 0)
            if used[0] not in given or used[-1] not in given:
                raise ValueError(
                    f"nodes {used[0]}..{used[-1]} touch axis {axis} of the field of view, "
                    f"PSFs are given for {given.start}..{given.stop - 1}"
                )
            axes.append((weights, first, length, used))
        self.patch = tuple(int(a[2].max()) for a in axes)
        full = [p + k - 1 for p, k in zip(self.patch, self.kernel, strict=True)]
        self.fft_shape = tuple(scipy.fft.next_fast_len(n, real=True) for n in full)
        (wy, fy, _, uy), (wx, fx, _, ux) = axes
        iy, ix = (g.reshape(-1) for g in np.meshgrid(uy, ux, indexing="ij"))
        dtype = psfs.dtype
        self.nodes = int(iy.size)
        local = psfs[iy - first_node[0], ix - first_node[1]]
        self.otf = torch.fft.rfft2(local, s=self.fft_shape)
        self.starts = torch.as_tensor(np.stack([fy[iy], fx[ix]], axis=1), device=device)
        self.weights = tuple(
            torch.as_tensor(
                np.stack([np.pad(w[i], (0, p))[f[i] : f[i] + p] for i in idx]), dtype=dtype
            ).to(device)
            for w, f, p, idx in ((wy, fy, self.patch[0], iy), (wx, fx, self.patch[1], ix))
        )
        self.full = tuple(full)
        batch = max(1, BATCH_ELEMENTS // math.prod(self.fft_shape))
        self.batches = [slice(b, min(b + batch, self.nodes)) for b in range(0, self.nodes, batch)]
        self.ranges = [
            [torch.arange(n, device=device) for n in self.patch],
            [torch.arange(n, device=device) for n in self.full],
        ]

    def _index(self, nodes: slice, full: bool) -> tuple[Tensor, Tensor]:
        """Row and column indices ``(n, Ly, 1)``, ``(n, 1, Lx)`` of the nodes' regions.

        ``full=False``: the mask support in the padded input (origin at the field of
        view); ``full=True``: the convolution's support in the padded output, whose origin
        is ``k // 2`` pixels before the field of view.
        """
        ry, rx = self.ranges[int(full)]
        start = self.starts[nodes]
        return (start[:, 0, None] + ry)[:, :, None], (start[:, 1, None] + rx)[:, None, :]

    def _masks(self, nodes: slice) -> Tensor:
        return self.weights[0][nodes, :, None] * self.weights[1][nodes, None, :]

    def forward(self, x: Tensor) -> Tensor:
        """``H x``: ``(Y, X) -> (Y, X)``."""
        (ny, nx), (py, px), (ky, kx) = self.shape, self.patch, self.kernel
        padded = x.new_zeros(ny + py, nx + px)
        padded[:ny, :nx] = x
        out = x.new_zeros(ny + self.full[0], nx + self.full[1])
        for nodes in self.batches:
            patches = padded[self._index(nodes, False)] * self._masks(nodes)
            spectrum = torch.fft.rfft2(patches, s=self.fft_shape) * self.otf[nodes]
            blurred = torch.fft.irfft2(spectrum, s=self.fft_shape)
            out.index_put_(
                self._index(nodes, True), blurred[:, : self.full[0], : self.full[1]], True
            )
        return out[ky // 2 : ky // 2 + ny, kx // 2 : kx // 2 + nx]

    def adjoint(self, y: Tensor) -> Tensor:
        """``H^T y``: ``(Y, X) -> (Y, X)``."""
        (ny, nx), (py, px), (ky, kx) = self.shape, self.patch, self.kernel
        padded = y.new_zeros(ny + self.full[0], nx + self.full[1])
        padded[ky // 2 : ky // 2 + ny, kx // 2 : kx // 2 + nx] = y
        out = y.new_zeros(ny + py, nx + px)
        for nodes in self.batches:
            regions = padded[self._index(nodes, True)]
            spectrum = torch.fft.rfft2(regions, s=self.fft_shape) * self.otf[nodes].conj()
            back = torch.fft.irfft2(spectrum, s=self.fft_shape)[:, :py, :px]
            out.index_put_(self._index(nodes, False), back * self._masks(nodes), True)
        return out[:ny, :nx]


def build_sv_operator(
    psfs: Tensor,
    centres: tuple[np.ndarray, np.ndarray],
    shape: Sequence[int],
    sides: Sequence[tuple[str, str]],
    offset: Sequence[int] = (0, 0),
    first_node: Sequence[int] = (0, 0),
) -> OverlapAdd | Mirrored:
    """``H`` / ``H^T`` of eq. 13 on a field of view with per-side boundaries.

    On a ``reflect`` side the field of view is extended by ``k // 2`` pixels whose masks
    are evaluated at their own image positions (module docstring); ``truncated`` sides
    are dark beyond the field of view. Arguments as in :class:`OverlapAdd`; ``sides`` is
    the ``(before, after)`` boundary per axis.
    """
    widths = [
        (k // 2 if before == "reflect" else 0, k // 2 if after == "reflect" else 0)
        for k, (before, after) in zip(psfs.shape[-2:], sides, strict=True)
    ]
    extended = [int(n) + a + b for n, (a, b) in zip(shape, widths, strict=True)]
    start = [int(o) - a for o, (a, _) in zip(offset, widths, strict=True)]
    inner = OverlapAdd(psfs, centres, extended, start, first_node)
    if not any(a or b for a, b in widths):
        return inner
    return Mirrored(inner, shape, widths, psfs.device)


def _unit_psfs(psfs: Tensor) -> Tensor:
    """Non-negative PSFs ``(gy, gx, Ky, Kx)`` each scaled to unit sum."""
    psfs = non_negative(psfs, "PSF")
    total = psfs.sum(dim=(-2, -1), keepdim=True)
    if not bool((total > 0).all()):
        raise InputError("a PSF of the map has no positive values")
    return psfs / total


def _check_inputs(image: Tensor, psfs: Tensor) -> None:
    if image.ndim != 2:
        raise InputError(f"spatially-variant RL needs a 2D (Y, X) image, got {image.ndim} axes")
    if psfs.ndim != 4:
        raise InputError(f"PSFs must be (Gy, Gx, Ky, Kx), got shape {tuple(psfs.shape)}")
    if image.numel() == 0 or psfs.numel() == 0:
        raise InputError(f"empty input: image {tuple(image.shape)}, PSFs {tuple(psfs.shape)}")
    for name, array in (("image", image), ("PSF map", psfs)):
        if not bool(torch.isfinite(array).all()):
            raise InputError(f"{name} contains NaN or infinite values")


@torch.no_grad()
def sv_richardson_lucy_torch(
    image: Tensor,
    psfs: Tensor,
    centres: tuple[np.ndarray, np.ndarray],
    iterations: int = 20,
    tv: float = 0.0,
    eps: float = 1e-6,
    normalize: bool = True,
    boundary: Boundaries = "reflect",
    offset: Sequence[int] = (0, 0),
    first_node: Sequence[int] = (0, 0),
) -> Tensor:
    """Spatially-variant (TV-)Richardson-Lucy of eq. 13 on the device of ``image``.

    The update, its TV term and the boundary handling are those of
    :func:`~hpcdeconv.classical.rl.richardson_lucy_torch`, with ``H`` the overlap-add
    operator of the module docstring.

    Parameters
    ----------
    image
        ``(Y, X)`` observed image; negative values are clipped to 0.
    psfs
        ``(gy, gx, Ky, Kx)`` PSFs of the nodes from ``first_node`` on (centre at
        ``k // 2``); each is clipped to non-negative values and scaled to unit sum.
    centres
        Node positions ``(Gy,)`` and ``(Gx,)`` of the whole map, in image pixels.
    iterations, tv, eps, normalize, boundary
        As in :func:`~hpcdeconv.classical.rl.richardson_lucy_torch`; ``tv`` in
        ``[0, 1 / (2 + sqrt 2))``.
    offset
        Image coordinates of ``image[0, 0]`` (a block of a larger image).
    first_node
        Grid index of ``psfs[0, 0]``.

    Returns
    -------
    torch.Tensor
        ``(Y, X)`` non-negative estimate; float64 for float64 input, else float32.

    Raises
    ------
    InputError
        Not a 2D image, PSFs not ``(gy, gx, Ky, Kx)``, empty or non-finite arrays, a PSF
        without positive values, or node positions that do not increase.
    ConfigError
        ``iterations``, ``tv``, ``eps`` or ``boundary`` out of range.
    """
    _check_inputs(image, psfs)
    check_rl_parameters(iterations, tv, eps, image.ndim)
    sides = boundary_sides(boundary, image.ndim)
    dtype = compute_dtype(image)
    y = non_negative(image.to(dtype), "image")
    unit = _unit_psfs(psfs.to(device=y.device, dtype=dtype))
    operator = build_sv_operator(unit, centres, tuple(y.shape), sides, offset, first_node)
    return rl_iterations(y, operator, iterations, tv, eps, normalize, "SV-RL")


def sv_richardson_lucy(
    image: np.ndarray,
    psfs: np.ndarray | Tensor,
    centres: tuple[np.ndarray, np.ndarray],
    iterations: int = 20,
    tv: float = 0.0,
    eps: float = 1e-6,
    normalize: bool = True,
    device: str | torch.device | None = None,
    boundary: Boundaries = "reflect",
    offset: Sequence[int] = (0, 0),
    first_node: Sequence[int] = (0, 0),
) -> np.ndarray:
    """NumPy front end of :func:`sv_richardson_lucy_torch`, run on ``device`` (default CPU).

    Returns
    -------
    numpy.ndarray
        ``(Y, X)`` estimate; float64 for float64 input, else float32.
    """
    target = torch.device("cpu") if device is None else torch.device(device)
    kernels = psfs if isinstance(psfs, Tensor) else as_tensor(np.asarray(psfs))
    result = sv_richardson_lucy_torch(
        as_tensor(image).to(target),
        kernels.to(target),
        centres,
        iterations=iterations,
        tv=tv,
        eps=eps,
        normalize=normalize,
        boundary=boundary,
        offset=offset,
        first_node=first_node,
    )
    return result.cpu().numpy()


def crop_size(psfs: Tensor, loss: float = 1e-4) -> int:
    """Smallest odd side of a centred window keeping ``>= 1 - loss`` of every PSF's energy.

    Parameters
    ----------
    psfs
        ``(..., K, K)`` non-negative PSFs, centre at ``K // 2``.
    loss
        Largest fraction of a PSF's sum allowed outside the window; 0 keeps ``K``.

    Returns
    -------
    int
        Side ``2 r + 1``, or ``K`` when no smaller centred window suffices (or ``loss = 0``).
    """
    k = int(psfs.shape[-1])
    if loss <= 0 or psfs.shape[-2] != k:
        return k
    flat = psfs.reshape(-1, k, k).to(torch.float64).clamp_min(0.0)
    total = flat.sum(dim=(-2, -1))
    centre = k // 2
    for radius in range(min(centre, k - 1 - centre) + 1):
        window = slice(centre - radius, centre + radius + 1)
        kept = flat[:, window, window].sum(dim=(-2, -1))
        if bool((kept >= (1.0 - loss) * total).all()):
            return 2 * radius + 1
    return k


def node_psfs(
    psf_map: PSFMap,
    size: int | None = None,
    rows: slice = slice(None),
    cols: slice = slice(None),
    device: torch.device | str = "cpu",
) -> Tensor:
    """PSFs of a sub-grid of a map's nodes, centre-cropped to ``size`` and unit-sum.

    Parameters
    ----------
    psf_map
        The map; its model renders the PSFs (Gaussian or Zernike).
    size
        Odd side of the centred crop (:func:`crop_size`); None keeps the rendered size.
    rows, cols
        Node ranges (slices of the grid).
    device
        Where the PSFs are rendered.

    Returns
    -------
    torch.Tensor
        ``(gy, gx, size, size)`` float32, each summing to 1.
    """
    params = np.ascontiguousarray(psf_map.params[:, rows, cols])
    p, gy, gx = params.shape
    flat = torch.as_tensor(params.reshape(p, -1).T.copy(), device=device)
    rendered = psf_map.model.render(flat)
    k = int(rendered.shape[-1])
    if size is not None and size < k:
        low = k // 2 - size // 2
        rendered = rendered[:, low : low + size, low : low + size]
        rendered = rendered / rendered.sum(dim=(-2, -1), keepdim=True)
    return rendered.reshape(gy, gx, *rendered.shape[1:])
