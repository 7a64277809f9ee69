"""PSF-regression training samples: re-blur check, texture-less samples, rotations, noise,
determinism and resume of the task driver, and bad input."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
import zarr
from scipy.signal import fftconvolve

from hpcdeconv.config import PSFDatasetConfig
from hpcdeconv.data.samples import PSFSampleStore
from hpcdeconv.errors import ConfigError, InputError
from hpcdeconv.psfnet.dataset import (
    SampleBatch,
    blur_valid,
    crop_side,
    draw_recipe,
    rotate_parameters,
    split_indices,
    synthesize,
)
from hpcdeconv.psfnet.dataset_run import generate, make_dataset, prepare
from hpcdeconv.psfnet.psf_models import build_psf_model
from hpcdeconv.psfnet.sources import SourceLibrary, build_library, source_library

QUIET = {"photons": [100.0, 100.0], "poisson_weight": [0.0, 0.0], "read_sigma": [0.0, 0.0]}


def _cfg(model: str = "gaussian1", **over: Any) -> PSFDatasetConfig:
    """A tiny set: 31-pixel PSFs at a 0.1 µm pixel, 32-pixel patches, two 96-pixel phantoms."""
    data: dict[str, Any] = {
        "psf": {
            "model": model,
            "optics": {"psf_size": 31, "camera_pixel": 2.0, "magnification": 20.0},
        },
        "phantoms": {"count": 2, "size": 96, "kinds": ["cells", "microtubules"]},
        "patch": 32,
        "samples": 40,
        "chunk": 8,
        "device": "cpu",
        "noise": QUIET,
    }
    data.update(over)
    return PSFDatasetConfig.model_validate(data)


def _reference(
    cfg: PSFDatasetConfig,
    library: SourceLibrary,
    batch: SampleBatch,
    j: int,
    params: np.ndarray | None = None,
) -> np.ndarray:
    """Independent re-blur of sample j: scipy's direct 'valid' convolution of its rotated
    source crop with the PSF of ``params`` (default: the stored ones), scaled to peak 1."""
    model = build_psf_model(cfg.psf)
    recipe = batch.recipes[j]
    side = crop_side(cfg)
    y, x = recipe.start
    crop = np.rot90(library.images[recipe.image][y : y + side, x : x + side], recipe.turns)
    stored = batch.params[j] if params is None else params
    psf = model.render(torch.as_tensor(stored[None])).numpy()[0].astype(np.float64)
    blurred = fftconvolve(crop.astype(np.float64), psf, mode="valid")
    return blurred / blurred.max()


def test_blur_valid_is_linear_convolution_without_wraparound() -> None:
    rng = np.random.default_rng(0)
    sharp = rng.random((2, 40, 40)).astype(np.float32)
    psf = rng.random((2, 9, 9)).astype(np.float32)
    out = blur_valid(torch.as_tensor(sharp), torch.as_tensor(psf)).numpy()
    assert out.shape == (2, 32, 32)
    for b in range(2):
        ref = fftconvolve(sharp[b].astype(np.float64), psf[b].astype(np.float64), mode="valid")
        np.testing.assert_allclose(out[b], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", ["gaussian1", "zernike3"])
def test_samples_carry_the_parameters_that_blurred_them(model: str) -> None:
    cfg = _cfg(model, invalid_fraction=0.0)
    library = source_library(cfg)
    batch = synthesize(cfg, build_psf_model(cfg.psf), library, range(6))
    assert batch.patches.shape == (6, 1, 32, 32) and batch.patches.dtype == np.float32
    for j in range(6):
        ref = _reference(cfg, library, batch, j)
        # Without noise the stored patch is the re-blurred source ...
        np.testing.assert_allclose(batch.patches[j, 0], ref, atol=2e-5)
        # ... and clearly not the source blurred with other parameters.
        other = batch.params[j] * np.float32(1.3) + np.float32(0.05)
        wrong = _reference(cfg, library, batch, j, other)
        assert np.abs(batch.patches[j, 0] - wrong).max() > 100 * 2e-5


def test_store_holds_the_synthesised_samples(tmp_path: Path) -> None:
    cfg = _cfg("zernike2", invalid_fraction=0.2)
    out = tmp_path / "z2.zarr"
    report = make_dataset(cfg, out, "new")
    assert report.computed == 5 and report.samples == 40
    store = PSFSampleStore(out)
    model = build_psf_model(cfg.psf)
    assert store.root["psf_model"] == model.record()
    assert store.names == ("cylinder", "axis") and store.units == ("waves", "rad")
    assert (len(store.split("train")), len(store.split("val")), len(store.split("test"))) == (
        32,
        4,
        4,
    )
    stored = store.read(range(40))
    fresh = synthesize(cfg, model, source_library(cfg), range(40))
    np.testing.assert_array_equal(stored.patches, fresh.patches)
    np.testing.assert_array_equal(stored.params, fresh.params)
    np.testing.assert_array_equal(stored.valid, fresh.valid)


def test_texture_less_samples_are_flat_and_invalid() -> None:
    cfg = _cfg("zernike3", invalid_fraction=0.5)
    model = build_psf_model(cfg.psf)
    batch = synthesize(cfg, model, source_library(cfg), range(40))
    flat = np.array([not r.textured for r in batch.recipes])
    assert 8 <= flat.sum() <= 32  # about half of 40
    lows = np.array([p.low for p in model.parameters], np.float32)
    for j in np.flatnonzero(flat):
        assert not batch.valid[j].any()  # a0 = 1
        np.testing.assert_array_equal(batch.params[j], lows)
        assert np.ptp(batch.patches[j]) == 0.0  # no noise configured: exactly flat
        assert batch.patches[j, 0, 0, 0] == np.float32(batch.recipes[j].level)
    assert any(batch.recipes[j].level == 0.0 for j in np.flatnonzero(flat))  # some black
    for j in np.flatnonzero(~flat):
        np.testing.assert_array_equal(batch.valid[j], model.defined(batch.params[j]))
        assert batch.patches[j].std() > 0.01


def _turned(batch: SampleBatch, odd: bool = True) -> int:
    return next(j for j, r in enumerate(batch.recipes) if r.textured and r.turns % 2 == odd)


@pytest.mark.parametrize(
    ("model", "ranges"),
    [
        ("gaussian2", {"width_x": [0.15, 0.2], "width_y": [0.8, 1.0]}),
        # Zernike-2 alone cannot tell φ from φ + π/2 (astigmatism without defocus gives the
        # same intensity PSF, see psf_models); with defocus the two differ.
        ("zernike3", {"focus": [0.3, 0.6], "cylinder": [0.4, 0.8]}),
    ],
)
def test_rotations_keep_parameters_exact(model: str, ranges: dict[str, list[float]]) -> None:
    """A sample from a turned source is blurred by its stored parameters in the patch's own
    frame, not by the parameters of the turned PSF (widths swapped / axis + π/2)."""
    cfg = _cfg(model, invalid_fraction=0.0, psf={**_cfg(model).psf.model_dump(), "ranges": ranges})
    library = source_library(cfg)
    psf_model = build_psf_model(cfg.psf)
    batch = synthesize(cfg, psf_model, library, range(16))
    assert {r.turns for r in batch.recipes} == {0, 1, 2, 3}
    j = _turned(batch)
    np.testing.assert_allclose(batch.patches[j, 0], _reference(cfg, library, batch, j), atol=2e-5)
    turned = rotate_parameters(psf_model, batch.params[j], 1)
    assert not np.allclose(turned, batch.params[j])
    wrong = _reference(cfg, library, batch, j, turned)
    assert np.abs(batch.patches[j, 0] - wrong).max() > 0.01


@pytest.mark.parametrize("model", ["gaussian2", "zernike2", "zernike3"])
def test_rotate_parameters_matches_turned_psf(model: str) -> None:
    cfg = _cfg(model)
    psf_model = build_psf_model(cfg.psf)
    params = psf_model.sample(np.random.default_rng(3), 4)
    if "cylinder" in psf_model.names:
        params[:, psf_model.names.index("cylinder")] += 0.3
    psfs = psf_model.render(torch.as_tensor(params)).numpy()
    for k in range(4):
        turned = psf_model.render(torch.as_tensor(rotate_parameters(psf_model, params, k)))
        expect = np.rot90(psfs, k, axes=(-2, -1))
        np.testing.assert_allclose(turned.numpy(), expect, atol=1e-6 * float(psfs.max()))
    swap = rotate_parameters(psf_model, params, 1)
    if model == "gaussian2":
        np.testing.assert_array_equal(swap[:, [1, 0]], params)
    else:
        # The axis turns by π/2 within its period: π, or π/2 for zernike2 (then unchanged).
        axis = psf_model.names.index("axis")
        period = math.pi / 2 if model == "zernike2" else math.pi
        expect = np.mod(params[:, axis] + math.pi / 2, period)
        np.testing.assert_allclose(swap[:, axis], expect, atol=1e-6)


def test_noise_has_the_paper_model_statistics() -> None:
    """y - b has mean 0 and variance β² b/ψ + σ² (Poisson variance ψb scaled by β/ψ)."""
    noise = {"photons": [40.0, 40.0], "poisson_weight": [0.7, 0.7], "read_sigma": [0.03, 0.03]}
    cfg = _cfg(noise=noise, invalid_fraction=0.0, patch=64, phantoms={"count": 1, "size": 128})
    batch = synthesize(cfg, build_psf_model(cfg.psf), source_library(cfg), range(8))
    residual = (batch.patches[:, 0] - batch.noiseless).astype(np.float64)
    expected = 0.7**2 * np.clip(batch.noiseless, 0, None) / 40.0 + 0.03**2
    assert abs(residual.mean()) < 3 * math.sqrt(expected.mean() / residual.size)
    assert residual.var() == pytest.approx(expected.mean(), rel=0.05)


def test_samples_depend_on_seed_and_index_only() -> None:
    cfg = _cfg("zernike1")
    model, library = build_psf_model(cfg.psf), source_library(cfg)
    alone = synthesize(cfg, model, library, [5, 6])
    within = synthesize(cfg, model, library, range(10))
    np.testing.assert_allclose(alone.patches, within.patches[5:7], atol=1e-6)
    np.testing.assert_array_equal(alone.params, within.params[5:7])
    other = synthesize(
        _cfg("zernike1", seed=1), model, source_library(_cfg("zernike1", seed=1)), [5]
    )
    assert not np.array_equal(other.params, alone.params[:1])


def _arrays(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(path, mode="r")
    return {name: np.asarray(group[name][...]) for name in ("patches", "params", "valid", "done")}


def test_partial_run_then_resume_equals_one_run(tmp_path: Path) -> None:
    cfg = _cfg("gaussian2")
    whole, parts = tmp_path / "whole.zarr", tmp_path / "parts.zarr"
    make_dataset(cfg, whole, "new")
    prepare(cfg, parts, "new")
    first = generate(cfg, parts, None, limit=2)
    assert (first.computed, first.skipped) == (2, 0)
    assert PSFSampleStore(parts).split("train") == []  # not complete: no split yet
    # A task killed after writing part of its data (its done flag not set) is redone.
    zarr.open_group(parts, mode="r+")["patches"][24:28] = -1.0
    prepare(cfg, parts, "resume")
    second = generate(cfg, parts, None)
    assert (second.computed, second.skipped) == (3, 2)
    a, b = _arrays(whole), _arrays(parts)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert PSFSampleStore(parts).root["split"] == PSFSampleStore(whole).root["split"]
    again = make_dataset(cfg, parts, "resume")
    assert (again.computed, again.skipped) == (0, 5)


def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    prepare(_cfg(), out, "new")
    with pytest.raises(ConfigError, match="other settings"):
        prepare(_cfg(seed=7), out, "resume")


def test_bad_input_is_refused_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    psf = {"model": "gaussian1", "ranges": {"width": [-0.5, 1.0]}}
    with pytest.raises(ConfigError, match="outside its meaning"):
        prepare(_cfg(psf=psf), out, "new")
    with pytest.raises(ConfigError, match="at least 62x62"):
        prepare(_cfg(phantoms={"count": 1, "size": 48}), out, "new")
    assert not out.exists()
    with pytest.raises(ValueError, match="no sharp images"):
        _cfg(phantoms={"count": 0})


def test_user_images_are_sources(tmp_path: Path) -> None:
    image = np.random.default_rng(0).random((70, 80)).astype(np.float32) * 500 + 100
    tifffile.imwrite(tmp_path / "sharp.tif", image)
    cfg = _cfg(images=[tmp_path / "sharp.tif"], phantoms={"count": 0}, invalid_fraction=0.0)
    library = build_library(cfg)
    assert len(library.images) == 1 and library.images[0].min() == 0.0
    np.testing.assert_allclose(library.images[0].max(), 1.0)
    batch = synthesize(cfg, build_psf_model(cfg.psf), library, range(3))
    np.testing.assert_allclose(batch.patches[0, 0], _reference(cfg, library, batch, 0), atol=2e-5)
    tifffile.imwrite(
        tmp_path / "stack.tif", np.zeros((3, 70, 80), np.float32), photometric="minisblack"
    )
    with pytest.raises(InputError, match="2D"):
        build_library(_cfg(images=[tmp_path / "stack.tif"], phantoms={"count": 0}))


def test_split_indices() -> None:
    split = split_indices(100, 0.1, 0.2)
    assert split["train"] == list(range(70))
    assert split["val"] == list(range(70, 80)) and split["test"] == list(range(80, 100))


def test_recipe_draws_uniform_parameters_within_ranges() -> None:
    cfg = _cfg("zernike3", invalid_fraction=0.0)
    model, library = build_psf_model(cfg.psf), source_library(cfg)
    params = np.stack([draw_recipe(cfg, model, library, i).params for i in range(300)])
    for p, parameter in enumerate(model.parameters):
        assert params[:, p].min() >= parameter.low and params[:, p].max() <= parameter.high
        # uniform: the mean is the centre within 4 standard errors
        centre, span = (parameter.low + parameter.high) / 2, parameter.high - parameter.low
        assert abs(params[:, p].mean() - centre) < 4 * span / math.sqrt(12 * 300)
