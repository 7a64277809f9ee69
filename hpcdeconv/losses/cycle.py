"""Cycle-consistency loss of the cycleGAN with a blur kernel."""

from __future__ import annotations

from torch import Tensor


def cycle_loss(x: Tensor, x_rec: Tensor, y: Tensor, y_rec: Tensor) -> Tensor:
    """Cycle-consistency loss of Lim et al., IEEE TCI 2020 (eqs. 14 and 16).

    ``E‖x − G(h ∗ x)‖₁ + E‖y − h ∗ G(y)‖₁`` with ``E‖·‖₁`` the mean absolute error over
    all voxels; ``x`` are sharp images, ``y`` blurred measurements, ``G`` the deblurring
    generator and ``h`` the PSF. The weight γ is applied by the caller.

    Parameters
    ----------
    x, x_rec
        Sharp images and their reconstructions ``G(h ∗ x)``, same shape (B, C, Z, Y, X).
    y, y_rec
        Measurements and their reconstructions ``h ∗ G(y)``, same shape (B, C, Z, Y, X).

    Returns
    -------
    Tensor
        Scalar.
    """
    for name, a, b in (("x", x, x_rec), ("y", y, y_rec)):
        if a.shape != b.shape:
            raise ValueError(
                f"cycle_loss: {name} has shape {tuple(a.shape)} but its reconstruction "
                f"{tuple(b.shape)}"
            )
    # fp32 whatever precision the networks ran in (autocast leaves subtraction in bf16).
    return (x.float() - x_rec.float()).abs().mean() + (y.float() - y_rec.float()).abs().mean()
