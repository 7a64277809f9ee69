"""The PSF models of the PSF-regression CNN (Table II) and the PSF-map store."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hpcdeconv.config import PSFModelConfig, PSFOptics
from hpcdeconv.data.summary import describe
from hpcdeconv.errors import ConfigError, InputError, OutputExistsError
from hpcdeconv.physics.psf import gaussian
from hpcdeconv.physics.zernike import astigmatism_coefficients, zernike_psf
from hpcdeconv.psfnet.psf_map import (
    PSFMap,
    read_psf_map,
    window_centres,
    window_starts,
    write_psf_map,
)
from hpcdeconv.psfnet.psf_models import build_psf_model, model_from_record

OPTICS = PSFOptics(psf_size=63)


def _model(name: str, **ranges: tuple[float, float]):
    return build_psf_model(PSFModelConfig(model=name, optics=OPTICS, ranges=ranges))


def test_gaussian_models_match_the_physics_gaussian() -> None:
    px = OPTICS.pixel_size
    g1 = _model("gaussian1").render(torch.tensor([[0.6]]))[0].numpy()
    np.testing.assert_allclose(g1, gaussian((63, 63), 0.6 / px), atol=1e-7)
    # width_y is sigma along Y (rows), width_x along X (columns).
    g2 = _model("gaussian2").render(torch.tensor([[0.3, 0.9]]))[0].numpy()
    np.testing.assert_allclose(g2, gaussian((63, 63), (0.9 / px, 0.3 / px)), atol=1e-7)


@pytest.mark.parametrize(
    ("name", "params", "focus", "cylinder", "axis"),
    [
        ("zernike1", [0.8], 0.8, 0.0, 0.0),
        ("zernike2", [0.5, 1.1], 0.0, 0.5, 1.1),
        ("zernike3", [0.7, 0.4, 2.5], 0.7, 0.4, 2.5),
    ],
)
def test_zernike_models_match_the_numpy_pupil_psf(
    name: str, params: list[float], focus: float, cylinder: float, axis: float
) -> None:
    coefficients = astigmatism_coefficients(cylinder, math.degrees(axis))
    coefficients[4] = focus
    want = zernike_psf(
        (63, 63), OPTICS.pixel_size, OPTICS.na, OPTICS.n_immersion, OPTICS.wavelength, coefficients
    )
    got = _model(name).render(torch.tensor([params]))[0].numpy()
    assert got.sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(got, want, atol=1e-6 * want.max() + 1e-9)


def test_negative_defocus_equals_the_axis_turned_by_a_quarter() -> None:
    # The sign of the defocus is carried by the axis: the basis of depth from astigmatism.
    below = astigmatism_coefficients(0.4, 45.0)
    below[4] = -0.6
    psf_below = zernike_psf((63, 63), OPTICS.pixel_size, 0.45, 1.33, 0.53, below)
    model = _model("zernike3")
    rendered = model.render(torch.tensor([[0.6, 0.4, 3 * math.pi / 4], [0.6, 0.4, math.pi / 4]]))
    np.testing.assert_allclose(rendered[0].numpy(), psf_below, atol=1e-6 * psf_below.max())
    assert float((rendered[1] - rendered[0]).abs().max()) > 0.1 * float(rendered[0].max())


def test_unit_scale_round_trip_and_sampling_inside_the_ranges() -> None:
    model = _model("zernike3", focus=(0.2, 1.0))
    params = model.sample(np.random.default_rng(0), 500)
    assert params.shape == (500, 3) and params.dtype == np.float32
    unit = model.to_unit(params)
    assert unit.min() >= 0 and unit.max() <= 1
    np.testing.assert_allclose(model.from_unit(unit), params, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        model.to_unit(torch.tensor([[0.6, 0.5, math.pi / 2]])).numpy(), [[0.5, 0.5, 0.5]], rtol=1e-6
    )


def test_axis_undefined_for_a_round_spot() -> None:
    model = _model("zernike2")
    defined = model.defined(np.array([[0.01, 1.0], [0.3, 1.0]], np.float32))
    np.testing.assert_array_equal(defined, [[True, False], [True, True]])


@pytest.mark.parametrize(
    ("name", "ranges", "message"),
    [
        ("gaussian1", {"width": (-0.5, 1.0)}, "outside its meaning (> 0 um)"),
        ("gaussian2", {"width_x": (0.0, 1.0)}, "outside its meaning (> 0 um)"),
        ("zernike2", {"axis": (0.0, 4.0)}, "outside its meaning"),
        ("zernike1", {"focus": (1.0, 0.5)}, "low < high"),
        ("zernike1", {"width": (0.1, 0.5)}, "has no parameter(s) ['width']"),
    ],
)
def test_ranges_outside_the_meaning_are_refused(
    name: str, ranges: dict[str, tuple[float, float]], message: str
) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        _model(name, **ranges)
    assert message in str(err.value)


def test_record_rebuilds_the_same_model() -> None:
    model = _model("zernike3", cylinder=(0.1, 0.8))
    again = model_from_record(model.record())
    assert again.record() == model.record()
    with pytest.raises(ConfigError, match="not a PSF model description"):
        model_from_record({"model": "zernike3"})


def test_window_grid_covers_every_pixel() -> None:
    assert window_starts(300, 128, 64) == [0, 64, 128, 172]
    assert window_starts(256, 128, 64) == [0, 64, 128]
    np.testing.assert_array_equal(window_centres(128, 128, 7), [64.0])
    with pytest.raises(InputError, match="smaller than one 128-pixel window"):
        window_starts(100, 128, 64)
    for stride in (0, 301):
        with pytest.raises(ConfigError, match="stride must be between 1"):
            window_starts(300, 128, stride)


def test_map_store_round_trip_and_checks(tmp_path) -> None:
    model = _model("gaussian2")
    gy, gx = len(window_starts(300, 128, 64)), len(window_starts(256, 128, 64))
    params = np.random.default_rng(1).uniform(0.2, 1.0, (2, gy, gx)).astype(np.float32)
    m = PSFMap(
        model,
        params,
        np.zeros((gy, gx), np.float32),
        np.ones((gy, gx), bool),
        128,
        64,
        (300, 256),
        (0.325, 0.325),
    )
    write_psf_map(tmp_path / "map.zarr", m)
    # info lists the map's arrays and attributes, and no empty split (a map has none).
    summary = describe(tmp_path / "map.zarr")
    assert "split" not in summary.split("attributes:")[0] and '"kind":"psf_map"' in summary
    back = read_psf_map(tmp_path / "map.zarr")
    np.testing.assert_array_equal(back.params, params)
    assert back.model.record() == model.record()
    psfs = back.psfs()
    assert psfs.shape == (gy, gx, 63, 63)
    np.testing.assert_allclose(
        psfs[1, 2].numpy(), model.render(torch.from_numpy(params[None, :, 1, 2].copy()))[0]
    )
    with pytest.raises(InputError, match=r"estimated on a \[300, 256\] image, but the image"):
        back.check_image((256, 256))
    with pytest.raises(OutputExistsError):
        write_psf_map(tmp_path / "map.zarr", m)
    wrong = PSFMap(model, params[:, :2], m.invalid, m.estimated, 128, 64, (300, 256), (0.3, 0.3))
    with pytest.raises(InputError, match=r"has a grid of \[2, 4, 3\]"):
        write_psf_map(tmp_path / "wrong.zarr", wrong)
    assert not (tmp_path / "wrong.zarr").exists()
