"""The sharp images that PSF-regression training patches are cut from.

Shajkofci & Liebling, IEEE TIP 29 (2020), Sec. IV-A blur sharp image patches by sampled
PSFs. The sharp sources of a dataset configuration are ``phantoms.count`` synthetic 2D
phantoms (:func:`phantom_image`, a pure function of the seed and the phantom index) and
the user's 2D images, each scaled to ``[0, 1]`` (:class:`SourceLibrary`) and checked to be
large enough for a patch blurred without wrap-around
(:func:`~hpcdeconv.psfnet.dataset.crop_side`). :func:`source_library` builds the library
once per process for a configuration, as each dask task of
:mod:`hpcdeconv.psfnet.dataset_run` needs it. The samples cut from it are synthesised by
:mod:`hpcdeconv.psfnet.dataset`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

from hpcdeconv.config import PSFDatasetConfig
from hpcdeconv.data.sampling import sample_rng
from hpcdeconv.errors import ConfigError, InputError
from hpcdeconv.psfnet.dataset import crop_side

#: Random stream (:func:`~hpcdeconv.data.sampling.sample_rng`) of phantom ``j`` (step 1,
#: index j); the samples' streams are in :mod:`hpcdeconv.psfnet.dataset`.
_STREAM_PHANTOM = 13
#: Filament density of the 2D microtubule phantoms (per million pixels).
_FILAMENTS_PER_MPX = 400.0


class SourceLibrary:
    """Sharp 2D images that patches are cut from, each scaled to ``[0, 1]``.

    Parameters
    ----------
    images
        ``(Y, X)`` arrays.
    names
        One name per image, for messages.
    """

    def __init__(self, images: Sequence[np.ndarray], names: Sequence[str]) -> None:
        if not images:
            raise ConfigError("no sharp images to cut patches from")
        self.images = tuple(
            _unit_range(np.asarray(im, np.float32), n) for im, n in zip(images, names, strict=True)
        )
        self.names = tuple(names)

    def check_fits(self, side: int, patch: int) -> None:
        """Raise a one-line :class:`ConfigError` if a crop of ``side`` pixels does not fit.

        ``side = patch + K − 1``: a patch needs a margin of half a PSF on every side.
        """
        for image, name in zip(self.images, self.names, strict=True):
            if min(image.shape) < side:
                raise ConfigError(
                    f"{name} is {image.shape[0]}x{image.shape[1]} pixels: a {patch}-pixel patch "
                    f"blurred without wrap-around needs sources of at least {side}x{side} "
                    f"(patch + psf_size - 1)"
                )


def _unit_range(image: np.ndarray, name: str) -> np.ndarray:
    if image.ndim != 2:
        raise InputError(f"{name}: sharp images must be 2D (Y, X), got shape {image.shape}")
    low, high = float(image.min()), float(image.max())
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        raise InputError(f"{name}: a sharp image must be finite and not flat")
    return ((image - low) / (high - low)).astype(np.float32)


def phantom_image(cfg: PSFDatasetConfig, j: int) -> np.ndarray:
    """Phantom ``j`` of the library: ``(size, size)`` float32 in ``[0, 1]``."""
    from hpcdeconv.physics.phantoms import microtubules, texture_2d

    kinds = cfg.phantoms.kinds
    kind = kinds[j % len(kinds)]
    rng = sample_rng(cfg.seed, 1, j, stream=_STREAM_PHANTOM)
    shape = (cfg.phantoms.size, cfg.phantoms.size)
    if kind == "microtubules":
        return microtubules(shape, rng, filaments_per_mvoxel=_FILAMENTS_PER_MPX)
    return texture_2d(shape, rng, kind)


def build_library(cfg: PSFDatasetConfig) -> SourceLibrary:
    """The phantoms and the user's images of ``cfg``, checked to fit a blurred patch.

    Raises
    ------
    InputError
        An image that cannot be read, is not 2D, or is flat.
    ConfigError
        An image smaller than ``patch + psf_size − 1`` on a side.
    """
    from hpcdeconv.data.opener import load, open_image

    images, names = [], []
    for j in range(cfg.phantoms.count):
        images.append(phantom_image(cfg, j))
        names.append(f"phantom {j} ({cfg.phantoms.kinds[j % len(cfg.phantoms.kinds)]})")
    for path in cfg.images:
        opened = open_image(path, warn=False, any_rank=True)
        if opened.dims != "YX":
            raise InputError(
                f"{path}: sharp images must be 2D (Y, X), this one has axes {opened.dims}"
            )
        images.append(load(opened))
        names.append(str(path))
    library = SourceLibrary(images, names)
    library.check_fits(crop_side(cfg), cfg.patch)
    return library


@functools.lru_cache(maxsize=2)
def _cached_library(key: str) -> SourceLibrary:
    return build_library(PSFDatasetConfig.model_validate_json(key))


def source_library(cfg: PSFDatasetConfig) -> SourceLibrary:
    """:func:`build_library`, built once per process for a configuration."""
    return _cached_library(cfg.model_dump_json())
