"""Synthetic out-of-focus planes: sharp 2D images blurred by the Zernike defocus PSF.

For training without z-stacks, each field (a built-in phantom or one of the user's 2D
images) is seen through the pupil ``A exp(2πi · s · Z4)`` of the configured optics, with
``s`` the defocus in waves RMS of Noll's Z4 drawn uniformly per plane
(:class:`hpcdeconv.psfnet.psf_models.PSFModel` ``zernike1`` renders the PSFs in a batch).
Since the intensity PSF of a pure defocus ``−s`` equals that of ``+s``, strengths are
non-negative. The sharp target is the field seen through the in-focus PSF (``s = 0``;
``target: in_focus``) so that a pair differs by defocus alone, or the image itself
(``as_is``). Blurring is linear convolution of the image mirrored by half a PSF at its
edges (:func:`hpcdeconv.physics.forward.convolve`), so the output keeps the image's size
without dark borders.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcdeconv.comi.stacks import sanitise
from hpcdeconv.config.comi_data import SyntheticSource
from hpcdeconv.config.psfnet import PSFModelConfig, PSFOptics
from hpcdeconv.data.opener import Image, load, open_image
from hpcdeconv.errors import InputError
from hpcdeconv.physics.forward import convolve
from hpcdeconv.physics.noise import add_noise

__all__ = ["SyntheticField", "blur", "defocus_psfs", "synthetic_fields"]

logger = logging.getLogger(__name__)

#: Random streams of a field: its phantom, its strengths, and the noise of its planes.
_STREAM_PHANTOM, _STREAM_STRENGTH, _STREAM_NOISE = 1, 2, 3
#: Filament density of the 2D microtubule phantoms (per million pixels).
_FILAMENTS_PER_MPX = 400.0


def defocus_psfs(optics: PSFOptics, strengths: Sequence[float]) -> np.ndarray:
    """Defocus PSFs of ``optics`` at ``strengths`` (waves RMS of Z4).

    Returns
    -------
    numpy.ndarray
        ``(B, K, K)`` float32, ``K = optics.psf_size``, each summing to 1, centre at
        ``K // 2``.
    """
    from hpcdeconv.psfnet.psf_models import build_psf_model

    model = build_psf_model(PSFModelConfig(model="zernike1", optics=optics))
    params = torch.as_tensor(np.asarray(strengths, np.float32)[:, None])
    return model.render(params).numpy()


def blur(image: np.ndarray, psf: np.ndarray) -> np.ndarray:
    """``image`` convolved with a centred ``psf``, its edges mirrored by half a PSF.

    Parameters
    ----------
    image
        ``(Y, X)`` or ``(C, Y, X)``; each channel is blurred alike.
    psf
        ``(K, K)``, centre at ``K // 2``.

    Returns
    -------
    numpy.ndarray
        float32, the shape of ``image``.
    """
    array = np.asarray(image, np.float32)
    if array.ndim == 3:
        return np.stack([blur(channel, psf) for channel in array])
    k = psf.shape[-1]
    pad = ((k // 2, k - 1 - k // 2),) * 2
    out = convolve(np.pad(array, pad, mode="symmetric"), np.asarray(psf, np.float32))
    y, x = array.shape
    return np.ascontiguousarray(out[k // 2 : k // 2 + y, k // 2 : k // 2 + x])


def _phantom(kind: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    from hpcdeconv.physics.phantoms import microtubules, texture_2d

    if kind == "microtubules":
        return microtubules(shape, rng, filaments_per_mvoxel=_FILAMENTS_PER_MPX)
    return texture_2d(shape, rng, kind)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SyntheticField:
    """One field of view of a synthetic set: a sharp image and its defocused planes.

    Attributes
    ----------
    name
        Its id prefix (and its field: each image is a field of its own).
    index
        Position among the fields (phantoms first), seeding its random streams.
    source
        The configuration it belongs to.
    seed
        The dataset seed.
    kind
        The phantom's kind, or None for the user's image ``image``.
    image
        The opened user image, or None for a phantom.
    """

    name: str
    index: int
    source: SyntheticSource
    seed: int
    kind: str | None = None
    image: Image | None = None

    @property
    def field(self) -> str:
        """The field of view (the unit of the split): the field itself."""
        return self.name

    @property
    def voxel_size(self) -> tuple[float, float]:
        """``(dy, dx)`` µm: the object-side pixel the PSFs are rendered for."""
        pixel = self.source.optics.pixel_size
        return (pixel, pixel)

    @property
    def shape(self) -> tuple[int, ...]:
        """``(C?, Y, X)`` of its planes."""
        if self.image is not None:
            return tuple(int(n) for n in self.image.data.shape)
        return tuple(self.source.phantoms.shape)

    def strengths(self) -> np.ndarray:
        """Its planes' defocus, ``(draws,)`` waves RMS, drawn uniformly."""
        rng = np.random.default_rng([self.seed, _STREAM_STRENGTH, self.index])
        low, high = self.source.strength
        return rng.uniform(low, high, self.source.draws)

    def sharp(self) -> np.ndarray:
        """The object ``(C?, Y, X)`` float32: the phantom, or the user's image."""
        if self.image is not None:
            return load(self.image)
        rng = np.random.default_rng([self.seed, _STREAM_PHANTOM, self.index])
        assert self.kind is not None
        return _phantom(self.kind, self.source.phantoms.shape, rng)

    def target(self) -> np.ndarray:
        """The sharp plane stored: the object through the in-focus PSF, or as it is."""
        if self.source.target == "as_is":
            return self.sharp()
        return blur(self.sharp(), defocus_psfs(self.source.optics, [0.0])[0])

    def target_record(self) -> dict[str, Any]:
        """Provenance of the sharp plane."""
        return {"source": self._described(), "defocus_waves": 0.0, "target": self.source.target}

    def _described(self) -> str:
        if self.image is not None:
            return str(Path(self.image.source).resolve())
        return f"phantom {self.index} ({self.kind})"

    def pairs(self, target: np.ndarray) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
        """Per draw ``d``: the id suffix ``d<d>``, the defocused plane ``(C?, Y, X)`` and its
        provenance (source, strength in waves, the noise's requested SNR)."""
        del target  # the planes are rendered from the object, not from the target
        sharp = self.sharp()
        strengths = self.strengths()
        noise = self.source.noise
        for d, (strength, psf) in enumerate(
            zip(strengths, defocus_psfs(self.source.optics, strengths), strict=True)
        ):
            plane = blur(sharp, psf)
            if noise.snr_db is not None:
                rng = np.random.default_rng([self.seed, _STREAM_NOISE, self.index, d])
                plane = add_noise(plane, noise.snr_db, rng, poisson_weight=noise.poisson_weight)
            record = {
                "source": self._described(),
                "draw": d,
                "defocus_waves": round(float(strength), 6),
                "snr_db": noise.snr_db,
            }
            yield f"d{d}", plane, record


def _open_image(path: Path, optics: PSFOptics) -> Image:
    """A user's sharp 2D image, ``(Y, X)`` or ``(C, Y, X)``.

    Raises
    ------
    InputError
        Unreadable, or not a 2D image.
    """
    image = open_image(path, warn=False, any_rank=True)
    if image.dims not in ("YX", "CYX"):
        raise InputError(
            f"{path}: synthetic fields are 2D images (Y, X) or (C, Y, X); this one has axes "
            f"{image.dims}"
        )
    dy, dx = image.voxel_size[1], image.voxel_size[2]
    pixel = optics.pixel_size
    for size in (dy, dx):
        if size is not None and abs(size - pixel) > 0.01 * pixel:
            logger.warning(
                "%s: its pixel is %.4g µm but the PSFs are rendered for %.4g µm "
                "(optics.camera_pixel / optics.magnification); the defocus is scaled to the "
                "optics, not to the file",
                path,
                size,
                pixel,
            )
            break
    return image


def synthetic_fields(source: SyntheticSource, seed: int) -> list[SyntheticField]:
    """The fields of a synthetic source: ``phantom000`` … first, then the user's images.

    Raises
    ------
    InputError
        An unreadable or non-2D image, or two fields of one name.
    """
    fields: list[SyntheticField] = []
    kinds = source.phantoms.kinds
    for j in range(source.phantoms.count):
        kind = kinds[j % len(kinds)]
        fields.append(SyntheticField(f"phantom{j:03d}", j, source, seed, kind=kind))
    seen = {f.name: Path(f.name) for f in fields}
    for path in source.images:
        image = _open_image(path, source.optics)
        name = sanitise(image.name)
        if name in seen:
            raise InputError(f"{path} and {seen[name]} would both be field '{name}'")
        seen[name] = path
        fields.append(SyntheticField(name, len(fields), source, seed, image=image))
    return fields
