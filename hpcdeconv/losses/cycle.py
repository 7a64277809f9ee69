"""Cycle-consistency and identity-mapping losses of the cycleGANs."""

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
        Sharp images and their reconstructions ``G(h ∗ x)``, same shape (B, C, *S).
    y, y_rec
        Measurements and their reconstructions ``h ∗ G(y)``, same shape (B, C, *S).

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


def identity_loss(images: Tensor, mapped: Tensor) -> Tensor:
    """Identity-mapping loss ``E‖a − G(a)‖₁`` (Zhu et al., ICCV 2017, section 5.2).

    A generator fed an image already of its output domain should return it unchanged: the
    deblurring generator G on sharp images ``x``, a deep blurring generator F on blurred
    ``y``. The weight is applied by the caller.

    Parameters
    ----------
    images, mapped
        Images of the generator's output domain and the generator's output for them, same
        shape (B, C, *S).

    Returns
    -------
    Tensor
        Scalar, fp32.
    """
    if images.shape != mapped.shape:
        raise ValueError(
            f"identity_loss: images have shape {tuple(images.shape)} but the generator's "
            f"output {tuple(mapped.shape)}"
        )
    return (images.float() - mapped.float()).abs().mean()
