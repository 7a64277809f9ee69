"""PSF maps from a sliding window: grid, batching, inverse-distance fill, dask bands.

The network is an analytic stand-in (:class:`MeanPredictor`) so that every window's
output is known in closed form from the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from hpcdeconv.config.psfnet import PSFOptics
from hpcdeconv.errors import ConfigError, InputError
from hpcdeconv.psfnet.estimate import (
    ArrayReader,
    FillSettings,
    estimate_psf_map,
    idw_fill,
    predict_rows,
)
from hpcdeconv.psfnet.estimate_cluster import bands, estimate_on_client
from hpcdeconv.psfnet.psf_map import read_psf_map, write_psf_map
from hpcdeconv.psfnet.psf_models import PSFModel

MODEL = PSFModel("gaussian2", PSFOptics(psf_size=15))
WINDOW = 32


@dataclass(frozen=True)
class MeanPredictor:
    """``width_x`` = 0.2 + mean / 100, ``width_y`` = 0.2 + std / 100, ``a0`` = 1 on flat patches.

    Also a factory (calling it with no argument returns itself), as dask workers need.
    """

    def __call__(self, patches: torch.Tensor | None = None):  # type: ignore[no-untyped-def]
        if patches is None:
            return self
        flat = patches.flatten(1).double()
        mean, std = flat.mean(1), flat.std(1)
        params = torch.stack([0.2 + mean / 100, 0.2 + std / 100], dim=1).float()
        return params, (std < 1e-3).float()


def expected_window(image: np.ndarray, y: int, x: int) -> tuple[float, float]:
    patch = image[y : y + WINDOW, x : x + WINDOW].astype(np.float64)
    return 0.2 + patch.mean() / 100, 0.2 + patch.std(ddof=1) / 100


def textured(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (rng.random(shape) * (1 + yy / 10) + xx / 7).astype(np.float32)


def test_windows_and_centres_on_a_size_that_is_not_a_multiple() -> None:
    image = textured((101, 77))
    m = estimate_psf_map(image, MeanPredictor(), MODEL, WINDOW, 24)
    starts_y, starts_x = [0, 24, 48, 69], [0, 24, 45]  # the last flush with the end
    cy, cx = m.centres
    np.testing.assert_array_equal(cy, np.array(starts_y) + 16.0)
    np.testing.assert_array_equal(cx, np.array(starts_x) + 16.0)
    assert m.params.shape == (2, 4, 3) and m.estimated.all()
    for i, y in enumerate(starts_y):
        for j, x in enumerate(starts_x):
            np.testing.assert_allclose(m.params[:, i, j], expected_window(image, y, x), rtol=1e-5)
    assert m.voxel_size == (MODEL.optics.pixel_size,) * 2


def test_batch_size_does_not_change_the_map() -> None:
    image = textured((90, 90), seed=1)
    maps = [
        estimate_psf_map(image, MeanPredictor(), MODEL, WINDOW, 16, batch_size=b)
        for b in (1, 5, 64)
    ]
    for m in maps[1:]:
        np.testing.assert_array_equal(m.params, maps[0].params)
        np.testing.assert_array_equal(m.invalid, maps[0].invalid)


def test_idw_fill_by_hand() -> None:
    # 2 x 3 grid; node (0, 0) is invalid, k = 2 nearest valid: (0, 1) at 40 px, (1, 0) at 50 px.
    centres_y = np.array([10.0, 60.0])
    centres_x = np.array([10.0, 50.0, 70.0])
    params = np.array([[[99.0, 1.0, 5.0], [2.0, 7.0, 9.0]]], np.float32)
    estimated = np.array([[False, True, True], [True, True, True]])
    for power in (1, 2):
        w1, w2 = 1 / 40.0**power, 1 / 50.0**power
        want = (w1 * 1.0 + w2 * 2.0) / (w1 + w2)
        out = idw_fill(params, estimated, centres_y, centres_x, neighbours=2, power=power)
        assert out[0, 0, 0] == pytest.approx(want, rel=1e-6)
        np.testing.assert_array_equal(out[:, estimated], params[:, estimated])
    # k larger than the number of valid nodes: all of them, weighted by 1 / d.
    d = [40.0, 60.0, 50.0, math.hypot(50, 40), math.hypot(50, 60)]
    values = [1.0, 5.0, 2.0, 7.0, 9.0]
    want = sum(v / di for v, di in zip(values, d, strict=True)) / sum(1 / di for di in d)
    out = idw_fill(params, estimated, centres_y, centres_x, neighbours=10, power=1)
    assert out[0, 0, 0] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("power", [1, 2])
def test_idw_fill_matches_a_kd_tree(power: int) -> None:
    rng = np.random.default_rng(3)
    # Irregular spacings: no two distances tie, so the k nearest are unambiguous.
    centres_y = np.cumsum(rng.uniform(20, 60, 7))
    centres_x = np.cumsum(rng.uniform(20, 60, 9))
    params = rng.normal(size=(3, 7, 9)).astype(np.float32)
    estimated = rng.random((7, 9)) > 0.4
    out = idw_fill(params, estimated, centres_y, centres_x, neighbours=4, power=power)

    yy, xx = np.meshgrid(centres_y, centres_x, indexing="ij")
    tree = cKDTree(np.stack([yy[estimated], xx[estimated]], 1))
    dist, index = tree.query(np.stack([yy[~estimated], xx[~estimated]], 1), k=4)
    weights = 1 / dist**power
    want = (params[:, estimated][:, index] * weights).sum(-1) / weights.sum(-1)
    np.testing.assert_allclose(out[:, ~estimated], want, rtol=1e-5)
    np.testing.assert_array_equal(out[:, estimated], params[:, estimated])


def test_flat_windows_are_filled_from_textured_ones() -> None:
    image = textured((128, 128), seed=2)
    image[:64, :64] = 5.0  # flat: its windows have no texture
    m = estimate_psf_map(image, MeanPredictor(), MODEL, WINDOW, 32, fill=FillSettings(power=2))
    cy, cx = m.centres
    flat = (cy[:, None] + 16 <= 64) & (cx[None, :] + 16 <= 64)
    np.testing.assert_array_equal(~m.estimated, flat)
    np.testing.assert_array_equal(m.invalid, flat.astype(np.float32))
    raw = np.stack([[expected_window(image, int(y - 16), int(x - 16)) for x in cx] for y in cy])
    raw = np.moveaxis(raw, -1, 0)
    want = idw_fill(raw.astype(np.float32), ~flat, cy, cx, neighbours=4, power=2)
    np.testing.assert_allclose(m.params, want, rtol=1e-5)


def test_map_round_trips_through_the_store(tmp_path) -> None:  # type: ignore[no-untyped-def]
    image = textured((70, 64))
    image[:40] = 0.0
    m = estimate_psf_map(image, MeanPredictor(), MODEL, WINDOW, 16)
    write_psf_map(tmp_path / "map.zarr", m)
    back = read_psf_map(tmp_path / "map.zarr")
    np.testing.assert_array_equal(back.params, m.params)
    np.testing.assert_array_equal(back.estimated, m.estimated)
    assert (~back.estimated).any() and back.estimated.any()


def test_every_window_invalid_is_one_line() -> None:
    with pytest.raises(InputError, match="every window of the image is invalid") as err:
        estimate_psf_map(np.zeros((64, 64), np.float32), MeanPredictor(), MODEL, WINDOW, 16)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("value", [0.0, 7.5])
def test_flat_images_are_invalid_even_when_the_network_calls_them_valid(value: float) -> None:
    # A constant window standardises to all zeros, which a trained network may score as
    # valid (its training flats carry noise): the estimate must still refuse it.
    def always_valid(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return MeanPredictor()(patches)[0], torch.zeros(len(patches))

    image = np.full((64, 64), value, np.float32)
    with pytest.raises(InputError, match="every window of the image is invalid"):
        estimate_psf_map(image, always_valid, MODEL, WINDOW, 16)


@pytest.mark.parametrize(
    ("shape", "stride", "error", "match"),
    [
        ((20, 64), 8, InputError, "smaller than one 32x32 window"),
        ((64, 64), 0, ConfigError, "stride must be between 1 and"),
        ((64, 40), 50, ConfigError, "stride must be between 1 and the image size 40"),
        ((2, 64, 64), 8, InputError, "needs a 2D"),
    ],
)
def test_bad_grids_are_one_line(shape, stride, error, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        image = np.ones(shape, np.float32)
        estimate_psf_map(image, MeanPredictor(), MODEL, WINDOW, stride)


def test_bad_fill_settings() -> None:
    with pytest.raises(ConfigError, match="power must be 1 or 2"):
        FillSettings(power=3)
    with pytest.raises(ConfigError, match="neighbours must be positive"):
        FillSettings(neighbours=0)


@dataclass
class RecordingReader:
    """Records every region read (to check a band reads only its rows)."""

    image: np.ndarray
    regions: list

    def read(self, region):  # type: ignore[no-untyped-def]
        self.regions.append(region)
        return self.image[region]


def test_a_band_reads_only_its_rows() -> None:
    image = textured((200, 64))
    reader = RecordingReader(image, [])
    params, invalid = predict_rows(reader, [48, 72], [0, 32], WINDOW, MeanPredictor(), 3)
    assert reader.regions == [(slice(48, 72 + WINDOW), slice(None))]
    np.testing.assert_allclose(params[1, 1], expected_window(image, 72, 32), rtol=1e-5)
    assert invalid.shape == (2, 2)


def test_bands_cover_every_row_once() -> None:
    assert [list(b) for b in bands(7, 3)] == [[0, 1, 2], [3, 4, 5], [6]]


def test_dask_bands_equal_the_single_process_map() -> None:
    from distributed import Client, LocalCluster

    image = textured((150, 130), seed=4)
    image[40:110, 30:100] = 1.0  # some invalid windows in the middle
    single = estimate_psf_map(image, MeanPredictor(), MODEL, WINDOW, 20, batch_size=7)
    assert (~single.estimated).any()
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        for band_rows in (1, 3, None):
            m = estimate_on_client(
                client, ArrayReader(image), image.shape, MeanPredictor(), MODEL, WINDOW, 20,
                batch_size=7, band_rows=band_rows, device="cpu",
            )  # fmt: skip
            np.testing.assert_array_equal(m.params, single.params)
            np.testing.assert_array_equal(m.invalid, single.invalid)
            np.testing.assert_array_equal(m.estimated, single.estimated)
