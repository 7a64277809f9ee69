"""Training data configuration: a tagged union, one class per kind of data.

``kind`` says what a batch holds: two unpaired image domains (``domains``), paired images
of the same place (``paired``) or (patch, PSF parameter vector, validity) samples
(``psf_samples``). A ``data`` block without ``kind`` takes the kind its method trains on
(see :class:`~hpcdeconv.config.experiment.ExperimentConfig`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, Tag

from hpcdeconv.config.base import PositiveInt, Shape, StrictModel, tagged_by


class _DataBase(StrictModel):
    path: Path = Path("data.zarr")
    batch_size: PositiveInt = 1
    num_workers: Annotated[int, Field(ge=0)] = 0
    augment: bool = True


class ImageDomainsData(_DataBase):
    """Patches drawn independently from the sharp and the blurred volumes of a dataset.

    ``patch`` is ``(Y, X)`` for 2D data and ``(Z, Y, X)`` for volumes, in voxels; its
    length is the training's ``spatial_dims``.
    """

    kind: Literal["domains"] = "domains"
    patch: Shape = (64, 64, 64)
    val_volumes: Annotated[int, Field(ge=0)] = 1


class PairedImagesData(ImageDomainsData):
    """Patches at the same place of a sharp volume and its blurred counterpart."""

    kind: Literal["paired"] = "paired"  # type: ignore[assignment]


class PSFSamplesData(_DataBase):
    """(patch, PSF parameter vector, validity) samples for PSF-parameter regression."""

    kind: Literal["psf_samples"] = "psf_samples"
    val_samples: Annotated[int, Field(ge=0)] = 64


DataConfig = Annotated[
    Annotated[ImageDomainsData, Tag("domains")]
    | Annotated[PairedImagesData, Tag("paired")]
    | Annotated[PSFSamplesData, Tag("psf_samples")],
    tagged_by("kind", "domains"),
]
