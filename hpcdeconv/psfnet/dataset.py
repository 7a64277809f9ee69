"""Synthesis of PSF-regression training samples, a pure function of ``(seed, sample index)``.

Shajkofci & Liebling, IEEE TIP 29 (2020), Sec. IV-A: sharp image patches are blurred by
PSFs whose parameters are drawn uniformly from the model's ranges (Table II), made noisy
with ``β·Poisson(ψ) + N(0, σ²)``, and texture-less patches are added with validity
``a0 = 1``. Sample ``i`` is made in four steps:

1. **Recipe** (:func:`draw_recipe`). A generator seeded by ``(seed, i)`` draws, always in
   this order: whether the sample is texture-less (probability ``invalid_fraction``), the
   PSF parameters (:meth:`~hpcdeconv.psfnet.psf_models.PSFModel.sample`), the source image,
   the crop position (redrawn up to :data:`TEXTURE_TRIES` times until the crop has texture),
   the number of quarter turns ``k``, the noise strengths ``ψ, β, σ`` and the level of a
   flat patch.
2. **Sharp crop** (:func:`sharp_crop`): a square of side ``S = patch + K − 1``
   (``K = psf_size``) of the source image, turned by ``k·90°`` with ``numpy.rot90``.
3. **Noise-free patch** (:func:`blur_valid`): the ``patch × patch`` *valid* part of the
   linear convolution of the crop with the PSF, so every pixel sees a whole PSF footprint of
   real image (no wrap-around, no padding), scaled to a peak of 1.
4. **Noise** (:func:`add_noise`): ``y = (1 − β)·b + β·Poisson(ψ·b)/ψ + N(0, σ²)``.

Rotations turn the *sharp* crop before it is blurred, so the stored parameters are exactly
those of the PSF that blurred the stored patch, in the patch's own frame (no parameter is
transformed). :func:`rotate_parameters` gives the other route, the parameters of a PSF turned
by ``k·90°`` (widths swapped, axis ``φ + kπ/2 mod π``), which the tests use to check the
frame conventions of the models.

A texture-less sample is a constant ``level`` (0: black) plus the same noise; its parameters
are the ranges' lows (finite, left out of the loss) and its validity all False (``a0 = 1``).
A textured sample has ``valid = model.defined(params)``.

The sharp images the crops are cut from (phantoms and the user's images) are the
:class:`~hpcdeconv.psfnet.sources.SourceLibrary` of :mod:`hpcdeconv.psfnet.sources`; the
parallel, resumable writing of a store of samples is :mod:`hpcdeconv.psfnet.dataset_run`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.fft import next_fast_len

from hpcdeconv.config import PSFDatasetConfig
from hpcdeconv.data.sampling import sample_rng
from hpcdeconv.errors import ConfigError
from hpcdeconv.psfnet.psf_models import PSFModel

if TYPE_CHECKING:
    from hpcdeconv.psfnet.sources import SourceLibrary

#: Random streams (:func:`~hpcdeconv.data.sampling.sample_rng`): recipe and noise of a
#: sample (step 0, index i); the phantoms' (13) is in :mod:`hpcdeconv.psfnet.sources`.
_STREAM_RECIPE, _STREAM_NOISE = 11, 12
#: Standard deviation (images scaled to [0, 1]) below which a sharp crop has no texture.
MIN_TEXTURE = 0.02
#: Crop positions tried before the most textured one is kept.
TEXTURE_TRIES = 16
#: Share of the texture-less samples that are black (the rest are flat grey).
BLACK_SHARE = 0.5


@dataclass(frozen=True)
class SampleRecipe:
    """Everything drawn for one sample.

    Attributes
    ----------
    index
        Sample index ``i``.
    textured
        False for a texture-less (flat or black) sample, validity ``a0 = 1``.
    params
        ``(P,)`` float32 PSF parameters (model units); the ranges' lows when not textured.
    image, start
        Library image and top-left ``(y, x)`` pixel of the sharp crop of side
        ``patch + K − 1`` (``image = -1`` when not textured).
    turns
        Quarter turns ``k`` of the sharp crop (``numpy.rot90(crop, k)``).
    photons, poisson_weight, read_sigma
        Noise strengths ψ (photons at the peak), β (in ``[0, 1]``) and σ (peak units).
    level
        Value of a texture-less patch before noise (0: black).
    """

    index: int
    textured: bool
    params: np.ndarray
    image: int
    start: tuple[int, int]
    turns: int
    photons: float
    poisson_weight: float
    read_sigma: float
    level: float


@dataclass(frozen=True)
class SampleBatch:
    """Synthesised samples.

    Attributes
    ----------
    patches
        ``(n, 1, Y, X)`` float32 noisy patches (what is stored).
    noiseless
        ``(n, Y, X)`` float32 patches before noise (peak 1, or the flat level).
    params
        ``(n, P)`` float32.
    valid
        ``(n, P)`` bool.
    recipes
        The ``n`` recipes.
    """

    patches: np.ndarray
    noiseless: np.ndarray
    params: np.ndarray
    valid: np.ndarray
    recipes: tuple[SampleRecipe, ...]


def crop_side(cfg: PSFDatasetConfig) -> int:
    """Side ``S = patch + K − 1`` of the sharp crop whose valid blur is one patch."""
    return cfg.patch + cfg.psf.optics.psf_size - 1


def draw_recipe(
    cfg: PSFDatasetConfig, model: PSFModel, library: SourceLibrary, index: int
) -> SampleRecipe:
    """The recipe of sample ``index`` (a pure function of the seed and the index)."""
    rng = sample_rng(cfg.seed, 0, index, stream=_STREAM_RECIPE)
    textured = bool(rng.random() >= cfg.invalid_fraction)
    params = model.sample(rng, 1)[0]
    side, patch = crop_side(cfg), cfg.patch
    image = int(rng.integers(len(library.images)))
    source = library.images[image]
    best, best_texture = (0, 0), -1.0
    for _ in range(TEXTURE_TRIES):
        start = (
            int(rng.integers(source.shape[0] - side + 1)),
            int(rng.integers(source.shape[1] - side + 1)),
        )
        inner = slice(side // 2 - patch // 2, side // 2 - patch // 2 + patch)
        crop = source[start[0] : start[0] + side, start[1] : start[1] + side]
        texture = float(crop[inner, inner].std())
        if texture > best_texture:
            best, best_texture = start, texture
        if texture >= MIN_TEXTURE:
            break
    turns = int(rng.integers(4)) if cfg.rotations else 0
    noise = cfg.noise
    photons = float(rng.uniform(*noise.photons))
    weight = float(rng.uniform(*noise.poisson_weight))
    sigma = float(rng.uniform(*noise.read_sigma))
    level = 0.0 if rng.random() < BLACK_SHARE else float(rng.uniform(0.05, 1.0))
    if not textured:
        params = np.array([p.low for p in model.parameters], np.float32)
    return SampleRecipe(
        index=int(index),
        textured=textured,
        params=params,
        image=image if textured else -1,
        start=best,
        turns=turns,
        photons=photons,
        poisson_weight=weight,
        read_sigma=sigma,
        level=level,
    )


def sharp_crop(library: SourceLibrary, recipe: SampleRecipe, side: int) -> np.ndarray:
    """The ``(side, side)`` sharp crop of a textured recipe, turned by ``recipe.turns``."""
    y, x = recipe.start
    crop = library.images[recipe.image][y : y + side, x : x + side]
    return np.ascontiguousarray(np.rot90(crop, recipe.turns), dtype=np.float32)


def blur_valid(sharp: torch.Tensor, psf: torch.Tensor) -> torch.Tensor:
    """Valid part of the linear convolution of each image with its PSF.

    ``out[b, i, j] = Σ_{u,v} sharp[b, i + K − 1 − u, j + K − 1 − v] · psf[b, u, v]``: the
    PSF's centre ``K // 2`` lands on ``sharp[b, i + K // 2, j + K // 2]``. Computed by FFT
    of size ``n ≥ S``: for outputs ``i ≥ K − 1`` the circular wrap only meets the PSF's zero
    padding, so the result equals direct linear convolution.

    Parameters
    ----------
    sharp
        ``(B, S, S)`` images.
    psf
        ``(B, K, K)`` PSFs, ``K ≤ S``, on the same device.

    Returns
    -------
    torch.Tensor
        ``(B, S − K + 1, S − K + 1)`` float32.
    """
    side, k = sharp.shape[-1], psf.shape[-1]
    if k > side:
        raise ValueError(f"PSF of {k} pixels is larger than the images ({side})")
    n = next_fast_len(side, real=True)
    spectrum = torch.fft.rfft2(sharp.float(), s=(n, n)) * torch.fft.rfft2(psf.float(), s=(n, n))
    full = torch.fft.irfft2(spectrum, s=(n, n))
    return full[:, k - 1 : side, k - 1 : side].contiguous()


def add_noise(noiseless: np.ndarray, recipe: SampleRecipe, seed: int) -> np.ndarray:
    """``(1 − β)·b + β·Poisson(ψ·b)/ψ + N(0, σ²)`` of a noise-free patch ``b`` (``(Y, X)``).

    Negative FFT round-off counts as zero photons. The noise of sample ``i`` comes from
    its own stream, so it does not depend on which other samples share its batch.
    """
    rng = sample_rng(seed, 0, recipe.index, stream=_STREAM_NOISE)
    b = noiseless.astype(np.float64)
    psi, beta = recipe.photons, recipe.poisson_weight
    shot = rng.poisson(psi * np.clip(b, 0.0, None)) / psi
    read = rng.normal(0.0, recipe.read_sigma, size=b.shape)
    return ((1.0 - beta) * b + beta * shot + read).astype(np.float32)


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` or ``auto`` (CUDA when available) as a torch device.

    Raises
    ------
    ConfigError
        ``cuda`` without a usable GPU.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda: no CUDA GPU is available here (use cpu or auto)")
    return torch.device(device)


def synthesize(
    cfg: PSFDatasetConfig,
    model: PSFModel,
    library: SourceLibrary,
    indices: Sequence[int],
    device: torch.device | str = "cpu",
) -> SampleBatch:
    """Samples ``indices``: PSFs rendered and patches blurred as one torch batch.

    Parameters
    ----------
    cfg
        Dataset configuration (seed, patch, noise, rotations, invalid fraction).
    model
        The PSF model of ``cfg.psf``.
    library
        Sharp images (:func:`~hpcdeconv.psfnet.sources.source_library`).
    indices
        Sample indices ``i``; each sample depends on ``(cfg, i)`` only.
    device
        Where PSFs are rendered and patches blurred.

    Returns
    -------
    SampleBatch
        ``n = len(indices)`` samples of ``cfg.patch × cfg.patch``.
    """
    device = torch.device(device)
    recipes = tuple(draw_recipe(cfg, model, library, int(i)) for i in indices)
    n, patch, side = len(recipes), cfg.patch, crop_side(cfg)
    params = (
        np.stack([r.params for r in recipes]) if n else np.zeros((0, len(model.names)), np.float32)
    )
    noiseless = (
        np.stack([np.full((patch, patch), r.level, np.float32) for r in recipes])
        if n
        else np.zeros((0, patch, patch), np.float32)
    )
    textured = [j for j, r in enumerate(recipes) if r.textured]
    if textured:
        sharp = torch.as_tensor(
            np.stack([sharp_crop(library, recipes[j], side) for j in textured]), device=device
        )
        psf = model.render(torch.as_tensor(params[textured], device=device))
        blurred = blur_valid(sharp, psf)
        peak = blurred.amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        noiseless[textured] = (blurred / peak).cpu().numpy()
    valid = np.zeros(params.shape, bool)
    if textured:
        valid[textured] = np.asarray(model.defined(params[textured]), bool)
    patches = (
        np.stack([add_noise(noiseless[j], r, cfg.seed) for j, r in enumerate(recipes)])
        if n
        else noiseless
    )
    return SampleBatch(
        patches=patches[:, None].astype(np.float32, copy=False),
        noiseless=noiseless,
        params=params.astype(np.float32, copy=False),
        valid=valid,
        recipes=recipes,
    )


def rotate_parameters(model: PSFModel, params: np.ndarray, turns: int) -> np.ndarray:
    """Parameters of the PSF ``numpy.rot90(render(params), turns)`` (``(..., P)``).

    An odd number of quarter turns swaps ``width_x`` and ``width_y`` and moves the
    astigmatism axis ``φ`` to ``φ + π/2`` modulo its period (π; π/2 for zernike2); focus,
    cylinder and width are unchanged.
    """
    out = np.array(params, dtype=np.float32, copy=True)
    if turns % 2 == 0:
        return out
    names = model.names
    if "width_x" in names:
        ix, iy = names.index("width_x"), names.index("width_y")
        out[..., [ix, iy]] = out[..., [iy, ix]]
    if "axis" in names:
        ia = names.index("axis")
        # The axis's period is the top of its meaning: π, or π/2 for zernike2 (see psf_models).
        period = np.float32(model.parameters[ia].highest)
        out[..., ia] = np.mod(out[..., ia] + np.float32(math.pi / 2), period)
    return out


def split_indices(count: int, val: float, test: float) -> dict[str, list[int]]:
    """Training, validation and test indices: contiguous runs, ``round(share · count)`` each.

    The samples are independent draws, so contiguous runs are as random as any other split.
    """
    n_val, n_test = round(val * count), round(test * count)
    n_train = count - n_val - n_test
    return {
        "train": list(range(n_train)),
        "val": list(range(n_train, n_train + n_val)),
        "test": list(range(n_train + n_val, count)),
    }
