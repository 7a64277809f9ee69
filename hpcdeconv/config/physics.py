"""Physics configuration: PSF models, phantoms, noise, storage and ``hpcdeconv simulate``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    Field,
    Tag,
    model_validator,
)

from hpcdeconv.config.base import PositiveFloat, PositiveInt, Shape, StrictModel, tagged_by

# --------------------------------------------------------------------------------------
# Point-spread functions. Lengths are in micrometres; shapes and spacings are (Z, Y, X),
# or (Y, X) for a 2D PSF.
# --------------------------------------------------------------------------------------

#: Sampling step per axis in micrometres, (dz, dy, dx) or (dy, dx).
_Spacing = Annotated[tuple[PositiveFloat, ...], Field(min_length=2, max_length=3)]


def _check_na(na: float, n_immersion: float) -> None:
    """Refuse a numerical aperture the immersion medium cannot carry (NA = n sin θ < n).

    Raises
    ------
    ValueError
        ``na >= n_immersion``.
    """
    if na >= n_immersion:
        raise ValueError(f"na={na} must be smaller than n_immersion={n_immersion}")


class _Optics(StrictModel):
    """Objective and sampling shared by the widefield PSF models.

    A 3-axis ``shape`` (Z, Y, X) gives the 3D PSF; a 2-axis ``shape`` (Y, X) gives its
    in-focus plane ``z = 0`` (normalised to sum one), the PSF of 2D images.
    """

    shape: Shape = (31, 31, 31)
    voxel_size: _Spacing = (0.1, 0.1, 0.1)
    na: PositiveFloat = 1.4
    n_immersion: PositiveFloat = 1.5
    wavelength: PositiveFloat = 0.5

    @model_validator(mode="after")
    def _consistent(self) -> _Optics:
        _check_na(self.na, self.n_immersion)
        if len(self.voxel_size) != len(self.shape):
            raise ValueError(
                f"voxel_size {self.voxel_size} needs one entry per axis of shape {self.shape}"
            )
        return self


class BornWolfPSF(_Optics):
    """Scalar Born & Wolf PSF; ``paraxial`` selects the seed paper's quadratic defocus."""

    model: Literal["born_wolf"] = "born_wolf"
    paraxial: bool = True


class RichardsWolfPSF(_Optics):
    """Vectorial Richards & Wolf PSF, unpolarised light, aplanatic apodisation."""

    model: Literal["richards_wolf"] = "richards_wolf"


class GibsonLanniPSF(_Optics):
    """Gibson & Lanni PSF with a refractive-index mismatch between immersion and sample."""

    model: Literal["gibson_lanni"] = "gibson_lanni"
    n_immersion: PositiveFloat = 1.515
    n_sample: PositiveFloat = 1.33
    n_coverslip: PositiveFloat = 1.515
    n_coverslip_design: PositiveFloat = 1.515
    n_immersion_design: PositiveFloat = 1.515
    coverslip_thickness: PositiveFloat = 170.0
    coverslip_thickness_design: PositiveFloat = 170.0
    working_distance_design: PositiveFloat = 150.0
    particle_depth: Annotated[float, Field(ge=0)] = 0.0


class GaussianPSF(StrictModel):
    """Anisotropic Gaussian PSF; ``sigma`` in voxels, one per axis (2 or 3 axes)."""

    model: Literal["gaussian"] = "gaussian"
    shape: tuple[PositiveInt, ...] = (31, 31, 31)
    voxel_size: tuple[PositiveFloat, ...] = (0.1, 0.1, 0.1)
    sigma: tuple[PositiveFloat, ...] = (2.0, 1.0, 1.0)

    @model_validator(mode="after")
    def _same_rank(self) -> GaussianPSF:
        if not (len(self.shape) == len(self.voxel_size) == len(self.sigma)) or len(
            self.shape
        ) not in (2, 3):
            raise ValueError("shape, voxel_size and sigma must all have 2 or all have 3 entries")
        return self


class ZernikePSF(StrictModel):
    """2D PSF of a Zernike-expanded pupil, e.g. at one defocus plane.

    ``coefficients`` maps Noll indices to amplitudes in waves (RMS-normalised Zernikes).
    ``cylinder_power`` and ``axis_angle`` (degrees) add astigmatism in the form used by
    the PSF-regression paper; ``defocus`` is an axial offset in micrometres.
    """

    model: Literal["zernike"] = "zernike"
    shape: tuple[PositiveInt, PositiveInt] = (64, 64)
    pixel_size: PositiveFloat = 0.1
    na: PositiveFloat = 1.4
    n_immersion: PositiveFloat = 1.5
    wavelength: PositiveFloat = 0.5
    defocus: float = 0.0
    cylinder_power: float = 0.0
    axis_angle: float = 0.0
    coefficients: dict[Annotated[int, Field(ge=1)], float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _na_below_index(self) -> ZernikePSF:
        _check_na(self.na, self.n_immersion)
        return self


PSFConfig = Annotated[
    Annotated[BornWolfPSF, Tag("born_wolf")]
    | Annotated[RichardsWolfPSF, Tag("richards_wolf")]
    | Annotated[GibsonLanniPSF, Tag("gibson_lanni")]
    | Annotated[GaussianPSF, Tag("gaussian")]
    | Annotated[ZernikePSF, Tag("zernike")],
    tagged_by("model", "born_wolf"),
]


class PSFFileConfig(StrictModel):
    """Top level of a ``hpcdeconv psf`` configuration file."""

    psf: PSFConfig = Field(default_factory=BornWolfPSF)


# --------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------


class PhantomConfig(StrictModel):
    """Synthetic specimen.

    ``microtubules``: random smooth tubular filaments, a 3D network or 2D filaments (as
    seen by TIRF) after the rank of ``SimulateConfig.shape``; ``filaments_per_mvoxel``
    counts per million voxels or pixels. ``cells`` and ``points`` (2D only): textured cell
    bodies or sparse point emitters; the filament settings do not apply to them.
    """

    kind: Literal["microtubules", "cells", "points"] = "microtubules"
    filaments_per_mvoxel: PositiveFloat = 60.0
    radius: PositiveFloat = 1.2
    intensity_range: tuple[PositiveFloat, PositiveFloat] = (0.4, 1.0)
    stiffness: PositiveFloat = 0.9


class NoiseConfig(StrictModel):
    """Poisson + Gaussian noise at a requested average SNR (dB), seed paper's definition."""

    snr_db: float | None = 20.0
    poisson_weight: Annotated[float, Field(ge=0, le=1)] = 0.5


class CodecConfig(StrictModel):
    """Blosc compression of zarr chunks."""

    cname: Literal["zstd", "lz4", "lz4hc", "zlib", "blosclz"] = "zstd"
    clevel: Annotated[int, Field(ge=0, le=9)] = 3
    shuffle: Literal["shuffle", "bitshuffle", "noshuffle"] = "bitshuffle"


class StorageConfig(StrictModel):
    """How images are laid out on disk.

    ``chunks`` is (Z, Y, X) or (Y, X); an image takes its trailing axes, so 3D chunks also
    serve 2D images.
    """

    chunks: Shape = (64, 64, 64)
    codec: CodecConfig = Field(default_factory=CodecConfig)


class SplitConfig(StrictModel):
    """Number of volumes per split."""

    train: Annotated[int, Field(ge=0)] = 4
    val: Annotated[int, Field(ge=0)] = 1
    test: Annotated[int, Field(ge=0)] = 1


class SimulateConfig(StrictModel):
    """Top level of a ``hpcdeconv simulate`` configuration file.

    ``shape`` (Z, Y, X) makes volumes, (Y, X) makes 2D images; the PSF has the same axes.
    """

    shape: Shape = (64, 128, 128)
    split: SplitConfig = Field(default_factory=SplitConfig)
    psf: PSFConfig = Field(default_factory=BornWolfPSF)
    phantom: PhantomConfig = Field(default_factory=PhantomConfig)
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    seed: int = 0

    @model_validator(mode="after")
    def _psf_fits(self) -> SimulateConfig:
        if self.split.train + self.split.val + self.split.test == 0:
            raise ValueError("split must hold at least one volume")
        if len(self.psf.shape) != len(self.shape):
            raise ValueError(
                f"psf.shape {self.psf.shape} has {len(self.psf.shape)} axes but the images "
                f"{self.shape} have {len(self.shape)}; give the PSF the images' axes"
            )
        if len(self.shape) == 3 and self.phantom.kind != "microtubules":
            raise ValueError(f"phantom.kind {self.phantom.kind!r} is 2D only; use microtubules")
        if len(self.storage.chunks) < len(self.shape):
            raise ValueError(
                f"storage.chunks {self.storage.chunks} has fewer axes than the images {self.shape}"
            )
        if any(p > s for p, s in zip(self.psf.shape, self.shape, strict=True)):
            raise ValueError(f"psf.shape {self.psf.shape} is larger than the volume {self.shape}")
        return self
