"""Loss of PSF-parameter regression with a validity output (Shajkofci & Liebling 2020, eq. 11)."""

from __future__ import annotations

import torch
from torch import Tensor


def psf_regression_loss(
    output: Tensor, target: Tensor, valid: Tensor, gamma: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. 11, averaged over the batch.

    ``L = γ (a0 − â0)² + (1 − a0) / (2N) · Σ_n v_n (a_n − â_n)²``

    with ``N = P`` the number of parameters, ``a_n`` the true parameters in the unit scale
    of :meth:`~hpcdeconv.psfnet.psf_models.PSFModel.to_unit`, ``v_n`` whether parameter
    ``n`` is defined for the sample (an undefined one, e.g. the axis of a round spot, adds
    nothing), and ``a0 = 1`` for an invalid (textureless) sample, one with no defined
    parameter, else 0. Computed in float32.

    Parameters
    ----------
    output
        ``(B, P + 1)`` network outputs: ``â_1 … â_P`` then ``â0``.
    target
        ``(B, P)`` true parameters in unit scale (undefined entries may hold anything,
        NaN included).
    valid
        ``(B, P)`` bool, ``v_n`` per sample.
    gamma
        Weight γ of the validity term.

    Returns
    -------
    (Tensor, Tensor, Tensor)
        The loss, its validity term ``mean γ (a0 − â0)²`` and its parameter term, scalars.

    Raises
    ------
    ValueError
        Shapes that are not ``(B, P + 1)``, ``(B, P)``, ``(B, P)``.
    """
    batch, count = target.shape[0], target.shape[-1]
    if target.ndim != 2 or valid.shape != target.shape or output.shape != (batch, count + 1):
        raise ValueError(
            f"eq. 11 needs output (B, P + 1), target and valid (B, P); got "
            f"{tuple(output.shape)}, {tuple(target.shape)}, {tuple(valid.shape)}"
        )
    output, target = output.float(), target.float()
    valid = valid.bool()
    a0 = (~valid.any(dim=1)).float()
    validity = gamma * (a0 - output[:, count]).square()
    error = torch.where(valid, target - output[:, :count], torch.zeros_like(target))
    params = (1.0 - a0) / (2 * count) * error.square().sum(dim=1)
    return (validity + params).mean(), validity.mean(), params.mean()
