"""Configuration of ``hpcdeconv comi make-dataset``: COMI's in-focus / out-of-focus pairs.

Zhang et al., "Correction of out-of-focus microscopic images by deep learning", CSBJ 20
(2022), train on pairs of an in-focus plane and planes around it (planes 4…10 of 15, focus
7: offsets ``[-3, -2, -1, 1, 2, 3]``), split 8:2 by field of view. ``source`` is a tagged
union (key ``kind``) of where the planes come from:

``stacks``
    z-stacks (OME-Zarr, zarr, TIFF), one field of view each, with a named in-focus plane;
``bbbc006``
    a folder of one image file per field, plane and stain, named as the public BBBC006 set
    (or by any regular expression with the groups ``field``, ``plane`` and ``stain``);
``synthetic``
    phantoms or the user's 2D images defocused by the Zernike defocus PSF at random
    strengths (training without stacks).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, Tag, field_validator, model_validator

from hpcdeconv.config.base import PositiveFloat, PositiveInt, StrictModel, tagged_by
from hpcdeconv.config.physics import NoiseConfig, StorageConfig
from hpcdeconv.config.psfnet import PSFOptics

#: The paper's out-of-focus planes: 4…10 around plane 7 of 15, the focus itself left out.
PAPER_OFFSETS = (-3, -2, -1, 1, 2, 3)

#: BBBC006 (Bray et al., J Biomol Screen 17:266, 2012; Broad Bioimage Benchmark Collection):
#: one folder per plane, ``BBBC006_v1_images_z_NN`` (NN = 00…33, 2 µm apart, 16 in focus),
#: holding ``mcf-z-stacks-03212011_<well>_s<site>_w<stain><uuid>.tif`` (well a01…p24, site
#: 1 or 2, stain w1 Hoechst / w2 phalloidin), matched against the path below ``root``.
BBBC006_PATTERN = (
    r"(?:.*/)?BBBC006_v1_images_z_(?P<plane>\d+)/"
    r"mcf-z-stacks-03212011_(?P<field>[a-pA-P]\d{2}_s\d+)_(?P<stain>w\d)[^/]*\.tiff?"
)


class RegistrationConfig(StrictModel):
    """Rigid (translation) registration of each plane to its field's in-focus plane.

    Planes of a stack drift sideways as the stage moves in Z; the shift is estimated by
    phase correlation (:func:`skimage.registration.phase_cross_correlation`) to
    ``1 / upsample_factor`` pixel and applied by spline interpolation.
    """

    enabled: bool = False
    upsample_factor: PositiveInt = 20


class _PlaneSource(StrictModel):
    """What the real-plane sources share: offsets, registration and pixel size.

    ``offsets`` are plane numbers relative to the in-focus plane (non-zero, distinct);
    ``voxel_size`` ``(dy, dx)`` in µm replaces what the files say (needed when they say
    nothing).
    """

    offsets: tuple[int, ...] = Field(default=PAPER_OFFSETS, min_length=1)
    registration: RegistrationConfig = Field(default_factory=RegistrationConfig)
    voxel_size: tuple[PositiveFloat, PositiveFloat] | None = None

    @field_validator("offsets")
    @classmethod
    def _offsets(cls, offsets: tuple[int, ...]) -> tuple[int, ...]:
        if 0 in offsets:
            raise ValueError("0 is the in-focus plane itself; give non-zero offsets")
        if len(set(offsets)) != len(offsets):
            raise ValueError(f"offsets repeat a plane: {list(offsets)}")
        return offsets


class StackEntry(StrictModel):
    """One z-stack: its path and (optionally) its own in-focus plane (index along Z, from 0)."""

    path: Path
    focus: Annotated[int, Field(ge=0)] | None = None


class StacksSource(_PlaneSource):
    """z-stacks ``(Z, Y, X)`` or ``(C, Z, Y, X)``, one field of view each.

    ``focus`` is the in-focus plane (index along Z, from 0) of every stack that names none
    of its own; the paper's 15-plane stacks have it at index 6 (plane 7).
    """

    kind: Literal["stacks"] = "stacks"
    stacks: list[StackEntry] = Field(min_length=1)
    focus: Annotated[int, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _focus_named(self) -> StacksSource:
        if self.focus is None:
            missing = [str(s.path) for s in self.stacks if s.focus is None]
            if missing:
                raise ValueError(
                    f"no in-focus plane for {missing[0]}: give source.focus or its own focus"
                )
        return self


class BBBC006Source(_PlaneSource):
    """A folder of single-plane image files named by field, plane and stain.

    ``pattern`` is a regular expression matched in full against each file's path below
    ``root`` (``/``-separated), with the named groups ``field`` (the field of view, the
    unit of the split), ``plane`` (an integer) and optionally ``stain``; the default is
    BBBC006's naming (:data:`BBBC006_PATTERN`). ``stains`` keeps only those stains (all
    found when None); each stain of a field is its own image series, ``<field>_<stain>``,
    in the field's split. ``focus`` is the in-focus plane number (BBBC006: 16).
    """

    kind: Literal["bbbc006"] = "bbbc006"
    root: Path
    pattern: str = BBBC006_PATTERN
    stains: tuple[str, ...] | None = None
    focus: int = 16

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, pattern: str) -> str:
        try:
            groups = re.compile(pattern).groupindex
        except re.error as exc:
            raise ValueError(f"not a regular expression ({exc})") from None
        missing = [g for g in ("field", "plane") if g not in groups]
        if missing:
            raise ValueError(f"needs the named group(s) {', '.join(missing)}, e.g. (?P<field>...)")
        return pattern


class PhantomFields(StrictModel):
    """Built-in sharp phantoms (:mod:`hpcdeconv.physics.phantoms`), one field each.

    Phantom ``j`` is of kind ``kinds[j % len(kinds)]``, ``shape`` ``(Y, X)`` pixels.
    """

    count: Annotated[int, Field(ge=0)] = 12
    shape: tuple[PositiveInt, PositiveInt] = (256, 256)
    kinds: tuple[Literal["cells", "points", "microtubules"], ...] = Field(
        default=("cells", "microtubules"), min_length=1
    )


class SyntheticSource(StrictModel):
    """Sharp 2D images defocused by the Zernike defocus PSF (Noll 4) at random strengths.

    Each field (a phantom, or one of ``images``: ``(Y, X)`` or ``(C, Y, X)``) gets
    ``draws`` out-of-focus planes, strengths drawn uniformly from ``strength`` (waves RMS),
    rendered for ``optics`` (whose object-side pixel is the stored pixel size).
    ``target``: ``in_focus`` stores the image seen through the in-focus PSF (strength 0)
    as the sharp plane, so that the pair differs by defocus only; ``as_is`` stores the
    image itself (already an in-focus micrograph). ``noise`` is added to the out-of-focus
    planes only.
    """

    kind: Literal["synthetic"] = "synthetic"
    images: list[Path] = Field(default_factory=list)
    phantoms: PhantomFields = Field(default_factory=PhantomFields)
    draws: PositiveInt = 6
    strength: tuple[float, float] = (0.25, 1.0)
    optics: PSFOptics = Field(default_factory=lambda: PSFOptics(psf_size=63))
    target: Literal["in_focus", "as_is"] = "in_focus"
    noise: NoiseConfig = Field(default_factory=lambda: NoiseConfig(snr_db=None))

    @model_validator(mode="after")
    def _check(self) -> SyntheticSource:
        low, high = self.strength
        if not 0.0 <= low <= high:
            raise ValueError(f"strength must satisfy 0 <= low <= high (waves), got {[low, high]}")
        if not self.images and self.phantoms.count == 0:
            raise ValueError("no fields: give images or phantoms.count > 0")
        return self


SourceConfig = Annotated[
    Annotated[StacksSource, Tag("stacks")]
    | Annotated[BBBC006Source, Tag("bbbc006")]
    | Annotated[SyntheticSource, Tag("synthetic")],
    tagged_by("kind", "synthetic"),
]


class COMISplit(StrictModel):
    """Shares of the fields of view for test and validation (the paper: 8:2 train:test).

    ``test`` is a share of all fields; ``val`` a share of those left after the test fields.
    All planes of one field go to one split.
    """

    test: Annotated[float, Field(ge=0, lt=1)] = 0.2
    val: Annotated[float, Field(ge=0, lt=1)] = 0.1


class IntensityFit(StrictModel):
    """The dataset's one affine intensity mapping, fitted on the training in-focus planes:
    ``percentiles`` (in percent) of their values go to ``target``."""

    percentiles: tuple[float, float] = (0.1, 99.9)
    target: tuple[float, float] = (-1.0, 1.0)

    @model_validator(mode="after")
    def _order(self) -> IntensityFit:
        low, high = self.percentiles
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {[low, high]}")
        if not self.target[0] < self.target[1]:
            raise ValueError(f"target must be increasing, got {list(self.target)}")
        return self


class COMIDatasetConfig(StrictModel):
    """Top level of ``hpcdeconv comi make-dataset``.

    ``seed`` draws the split (and the synthetic fields); ``storage.chunks`` are ``(Y, X)``.
    """

    source: SourceConfig = Field(default_factory=SyntheticSource)
    split: COMISplit = Field(default_factory=COMISplit)
    intensity: IntensityFit = Field(default_factory=IntensityFit)
    storage: StorageConfig = Field(default_factory=lambda: StorageConfig(chunks=(256, 256)))
    seed: int = 0


__all__ = [
    "BBBC006_PATTERN",
    "PAPER_OFFSETS",
    "BBBC006Source",
    "COMIDatasetConfig",
    "COMISplit",
    "IntensityFit",
    "PhantomFields",
    "RegistrationConfig",
    "SourceConfig",
    "StackEntry",
    "StacksSource",
    "SyntheticSource",
]
