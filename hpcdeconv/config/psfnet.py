"""Configuration of the parametric PSF models that the PSF-regression CNN estimates.

Shajkofci & Liebling, "Spatially-variant CNN-based point spread function estimation for
blind deconvolution and depth estimation in optical microscopy", IEEE TIP 29, 2020,
Table II: two Gaussian and three Zernike models. The optics default to the paper's
(NA 0.45, 20×, water immersion n = 1.33, PSFs of 127 × 127 pixels).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from hpcdeconv.config.base import PositiveFloat, PositiveInt, StrictModel
from hpcdeconv.config.infer import ClusterConfig
from hpcdeconv.config.physics import CodecConfig

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


class PhantomLibraryConfig(StrictModel):
    """Synthetic sharp 2D images that training patches are cut from.

    Image ``i`` is a ``size`` × ``size`` phantom of kind ``kinds[i % len(kinds)]``
    (:mod:`hpcdeconv.physics.phantoms`: ``cells`` and ``points`` from ``texture_2d``,
    ``microtubules`` 2D filaments), drawn from the dataset seed.
    """

    count: Annotated[int, Field(ge=0)] = 8
    size: PositiveInt = 512
    kinds: tuple[Literal["cells", "points", "microtubules"], ...] = Field(
        default=("cells", "microtubules"), min_length=1
    )


def _check_range(name: str, bounds: tuple[float, float], lowest: float, highest: float) -> None:
    low, high = bounds
    if not lowest <= low <= high <= highest:
        raise ValueError(
            f"{name} range {[low, high]} must satisfy {lowest:g} <= low <= high <= {highest:g}"
        )


class PSFNoiseConfig(StrictModel):
    """Ranges of the paper's noise ``β·Poisson(ψ) + N(0, σ²)``, drawn uniformly per sample.

    A noise-free patch ``b`` (peak 1) becomes
    ``y = (1 − β)·b + β·Poisson(ψ·b)/ψ + N(0, σ²)``:

    ``photons`` (ψ)
        Expected photon count at the patch's peak; shot noise has relative strength
        ``1/√(ψ·b)``.
    ``poisson_weight`` (β)
        Weight of the shot-noise image against the noise-free one, in ``[0, 1]``
        (0: no shot noise, 1: pure photon counting).
    ``read_sigma`` (σ)
        Standard deviation of the additive Gaussian read noise, in units of the peak.
    """

    photons: tuple[PositiveFloat, PositiveFloat] = (50.0, 2000.0)
    poisson_weight: tuple[float, float] = (0.0, 1.0)
    read_sigma: tuple[float, float] = (0.0, 0.05)

    @model_validator(mode="after")
    def _ranges(self) -> PSFNoiseConfig:
        _check_range("noise.photons", self.photons, 0.0, math.inf)
        _check_range("noise.poisson_weight", self.poisson_weight, 0.0, 1.0)
        _check_range("noise.read_sigma", self.read_sigma, 0.0, math.inf)
        return self


class PSFSplitFractions(StrictModel):
    """Shares of the samples for validation and test; training gets the rest.

    Samples are independent draws, so the split is by index: training first, then
    validation, then test.
    """

    val: Annotated[float, Field(ge=0, le=1)] = 0.1
    test: Annotated[float, Field(ge=0, le=1)] = 0.1

    @model_validator(mode="after")
    def _sum(self) -> PSFSplitFractions:
        if self.val + self.test > 1:
            raise ValueError(f"split.val + split.test must be <= 1, got {self.val + self.test}")
        return self


class PSFDatasetConfig(StrictModel):
    """Top level of ``hpcdeconv psfnet make-dataset``: PSF-regression training samples.

    Each of ``samples`` samples is a ``patch`` × ``patch`` crop of a sharp image (a phantom
    or one of ``images``), optionally turned by a multiple of 90°, blurred by the PSF of
    parameters drawn uniformly from ``psf``'s ranges, normalised and made noisy
    (``noise``); ``invalid_fraction`` of them are texture-less instead (flat or black,
    validity a0 = 1). Every sample is a pure function of ``(seed, index)``
    (:mod:`hpcdeconv.psfnet.dataset`); ``chunk`` samples make one task and one storage
    chunk. ``device``: where PSFs are rendered and patches blurred (``auto``: CUDA when
    available); ``cluster``: where the dask workers come from.
    """

    psf: PSFModelConfig = Field(default_factory=PSFModelConfig)
    images: list[Path] = Field(default_factory=list)
    phantoms: PhantomLibraryConfig = Field(default_factory=PhantomLibraryConfig)
    patch: PositiveInt = 128
    samples: PositiveInt = 2048
    invalid_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1
    noise: PSFNoiseConfig = Field(default_factory=PSFNoiseConfig)
    rotations: bool = True
    split: PSFSplitFractions = Field(default_factory=PSFSplitFractions)
    seed: int = 0
    chunk: PositiveInt = 64
    device: Literal["cpu", "cuda", "auto"] = "auto"
    codec: CodecConfig = Field(default_factory=CodecConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _has_images(self) -> PSFDatasetConfig:
        if not self.images and self.phantoms.count == 0:
            raise ValueError("no sharp images: give images or phantoms.count > 0")
        return self
