"""The curvature term of total-variation regularisation, as TV-regularised RL uses it.

Dey et al. (Microsc. Res. Tech. 69:260, 2006) add ``lambda * TV(x)`` to the negative
log-likelihood of Richardson-Lucy; its one-step-late update divides by
``1 - lambda * div( grad x / |grad x|_eps )`` (:mod:`hpcdeconv.classical.rl`), computed
here with forward differences for ``grad`` and their negative adjoint for ``div``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["tv_divergence"]


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
