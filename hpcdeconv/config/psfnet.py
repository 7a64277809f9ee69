"""Configuration of the parametric PSF models that the PSF-regression CNN estimates.

Shajkofci & Liebling, "Spatially-variant CNN-based point spread function estimation for
blind deconvolution and depth estimation in optical microscopy", IEEE TIP 29, 2020,
Table II: two Gaussian and three Zernike models. The optics default to the paper's
(NA 0.45, 20×, water immersion n = 1.33, PSFs of 127 × 127 pixels).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from hpcdeconv.config.base import PositiveFloat, PositiveInt, StrictModel

#: Names of the PSF models of the paper's Table II.
PSFModelName = Literal["gaussian1", "gaussian2", "zernike1", "zernike2", "zernike3"]


class PSFOptics(StrictModel):
    """Optics the PSFs are computed for.

    Attributes
    ----------
    na
        Numerical aperture of the objective.
    magnification
        Total magnification onto the camera.
    n_immersion
        Refractive index of the immersion medium.
    wavelength
        Emission wavelength in µm.
    camera_pixel
        Camera pixel pitch in µm; the object-side pixel is ``camera_pixel / magnification``.
    psf_size
        Side of the square PSF in pixels (odd: the centre is a pixel, at ``psf_size // 2``).
    """

    na: PositiveFloat = 0.45
    magnification: PositiveFloat = 20.0
    n_immersion: PositiveFloat = 1.33
    wavelength: PositiveFloat = 0.53
    camera_pixel: PositiveFloat = 6.5
    psf_size: PositiveInt = 127

    @property
    def pixel_size(self) -> float:
        """Object-side pixel size in µm."""
        return self.camera_pixel / self.magnification


class PSFModelConfig(StrictModel):
    """Which PSF model, its optics, and the range each parameter is drawn from.

    ``ranges`` overrides the model's default ``[low, high]`` of the named parameters
    (units: µm for widths, waves RMS for Zernike amplitudes, radians for the axis angle);
    names and ranges are checked against the model when it is built
    (:func:`hpcdeconv.psfnet.psf_models.build_psf_model`).
    """

    model: PSFModelName = "gaussian1"
    optics: PSFOptics = Field(default_factory=PSFOptics)
    ranges: dict[str, tuple[float, float]] = Field(default_factory=dict)
