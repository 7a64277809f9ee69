"""Validation on fixed centred crops: the same voxels at every evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hpcdeconv.config import ExperimentConfig, ImageDomainsData, UNetConfig, load_config
from hpcdeconv.data.sampling import centre_crop_slices
from hpcdeconv.errors import ConfigError
from hpcdeconv.metrics import psnr, ssim
from hpcdeconv.models.factory import build_generator
from hpcdeconv.training.feed import TrainingFeed
from hpcdeconv.training.validate import ValidationSet, validate

CPU = torch.device("cpu")


@pytest.fixture
def feed(tiny_dataset: Path) -> TrainingFeed:
    return TrainingFeed(ImageDomainsData(path=tiny_dataset, patch=(16, 16, 16)), seed=0)


@pytest.fixture
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_generator(
        UNetConfig(channels=4, depth=2), spatial_dims=3, in_channels=1, out_channels=1
    )


def test_centre_crop_is_centred_and_clamped() -> None:
    assert centre_crop_slices((16, 32, 32), (11, 16, 40)) == (
        slice(2, 13),
        slice(8, 24),
        slice(0, 32),
    )
    # An odd margin leaves the extra voxel after the crop.
    assert centre_crop_slices((16, 33, 12), (13, 16, 12)) == (
        slice(1, 14),
        slice(8, 24),
        slice(0, 12),
    )
    whole = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    assert np.array_equal(whole[centre_crop_slices(whole.shape, None)], whole)


def test_validation_set_cuts_each_volume_once(feed: TrainingFeed) -> None:
    data = ValidationSet.from_feed(feed, (11, 16, 20))
    assert [v.vid for v in data.volumes] == feed.val_ids == ["val000"]
    vol = data.volumes[0]
    blurred, sharp = feed.read_pair("val000")
    assert vol.blurred.shape == vol.sharp.shape == (11, 16, 20)
    np.testing.assert_array_equal(vol.blurred, blurred[2:13, 8:24, 6:26])
    np.testing.assert_array_equal(vol.sharp, sharp[2:13, 8:24, 6:26])
    # PSNR/SSIM use the whole truth volume's range, fixed for the run.
    assert vol.data_range == pytest.approx(float(sharp.max() - sharp.min()))
    assert vol.data_range > float(vol.sharp.max() - vol.sharp.min())


def test_metrics_are_those_of_the_crop_and_repeat_exactly(
    feed: TrainingFeed, net: torch.nn.Module
) -> None:
    crop = (11, 16, 16)
    data = ValidationSet.from_feed(feed, crop)
    kw = {"tile": (16, 16, 16), "overlap": 4, "device": CPU, "autocast_dtype": None}
    first = validate(net, data, **kw)
    again = validate(net, data, **kw)
    from_feed = validate(net, feed, crop=crop, **kw)
    assert first == again == from_feed
    blurred, sharp = feed.read_pair("val000")
    cut = (slice(2, 13), slice(8, 24), slice(8, 24))
    rng = float(sharp.max() - sharp.min())
    assert first["psnr_input"] == pytest.approx(psnr(blurred[cut], sharp[cut], data_range=rng))
    assert first["ssim_input"] == pytest.approx(ssim(blurred[cut], sharp[cut], data_range=rng))
    # The input's score is independent of the network: only a fixed crop makes it so.
    whole = validate(net, feed, **kw)
    assert whole["psnr_input"] == pytest.approx(psnr(blurred, sharp, data_range=rng))
    assert whole["psnr_input"] != pytest.approx(first["psnr_input"])
    # The network's mode is restored.
    net.train()
    validate(net, data, **kw)
    assert net.training


def test_a_set_cut_to_another_crop_is_refused(feed: TrainingFeed, net: torch.nn.Module) -> None:
    data = ValidationSet.from_feed(feed, (11, 16, 16))
    kw = {"tile": (16, 16, 16), "overlap": 4, "device": CPU, "autocast_dtype": None}
    assert validate(net, data, crop=(11, 16, 16), **kw) == validate(net, data, **kw)
    with pytest.raises(ValueError, match="cut to"):
        validate(net, data, crop=(12, 16, 16), **kw)


def test_val_crop_configuration() -> None:
    assert load_config(ExperimentConfig, None, []).train.val_crop is None
    cfg = load_config(ExperimentConfig, None, ["train.val_crop=[11, 64, 64]"])
    assert cfg.train.val_crop == (11, 64, 64)
    with pytest.raises(ConfigError, match=r"val_crop \[8, 64, 64\] must be at least 11 voxels"):
        load_config(ExperimentConfig, None, ["train.val_crop=[8, 64, 64]"])
    with pytest.raises(ConfigError, match=r"'train\.val_crop\.0': Input should be greater"):
        load_config(ExperimentConfig, None, ["train.val_crop=[0, 64, 64]"])


def _image_dataset(path: Path, channels: int) -> Path:
    """A 2D dataset: one training and one validation image of ``channels`` channels."""
    from scipy import ndimage

    from hpcdeconv.data.zarr_io import create_dataset, set_split, write_volume

    group = create_dataset(path)
    rng = np.random.default_rng(4)
    shape = (channels, 24, 28) if channels > 1 else (24, 28)
    for vid in ("v0", "val0"):
        sharp = ndimage.gaussian_filter(rng.random(shape), (0, 1.0, 1.0)[-len(shape) :])
        blurred = ndimage.gaussian_filter(sharp, (0, 2.0, 2.0)[-len(shape) :])
        write_volume(group, f"sharp/{vid}", sharp.astype(np.float32), (0.1, 0.1))
        write_volume(group, f"blurred/{vid}", blurred.astype(np.float32), (0.1, 0.1))
    set_split(group, {"train": ["v0"], "val": ["val0"]})
    return path


@pytest.mark.parametrize("channels", [1, 3])
def test_2d_images_with_and_without_channels(tmp_path: Path, channels: int) -> None:
    from skimage.metrics import structural_similarity

    from hpcdeconv.models.factory import build_generator

    path = _image_dataset(tmp_path / "flat.zarr", channels)
    feed = TrainingFeed(ImageDomainsData(path=path, patch=(16, 16)), seed=0)
    data = ValidationSet.from_feed(feed, (16, 20))
    vol = data.volumes[0]
    blurred, sharp = feed.read_pair("val0")
    lead = (slice(None),) * (channels > 1)
    cut = (*lead, slice(4, 20), slice(4, 24))
    assert vol.sharp.shape == sharp[cut].shape == ((channels,) if channels > 1 else ()) + (16, 20)
    np.testing.assert_array_equal(vol.blurred, blurred[cut])
    torch.manual_seed(0)
    net = build_generator(
        UNetConfig(channels=4, depth=2), spatial_dims=2, in_channels=channels, out_channels=channels
    )
    net.eval()
    # One tile covers the crop, so the prediction is the network applied to it once.
    scores = validate(net, data, tile=(16, 20), overlap=4, device=CPU, autocast_dtype=None)
    x = torch.from_numpy(vol.blurred).reshape(1, channels, 16, 20)
    with torch.no_grad():
        pred = net(x).reshape(vol.sharp.shape).numpy()
    rng = vol.data_range
    assert scores["psnr"] == pytest.approx(psnr(pred, vol.sharp, data_range=rng), abs=1e-4)
    axis = 0 if channels > 1 else None
    reference = structural_similarity(
        vol.blurred.astype(np.float64),
        vol.sharp.astype(np.float64),
        data_range=rng,
        gaussian_weights=True,
        use_sample_covariance=False,
        channel_axis=axis,
    )
    assert scores["ssim_input"] == pytest.approx(reference, abs=1e-4)
    assert scores["ssim"] == pytest.approx(ssim(pred, vol.sharp, rng, channel_axis=axis), abs=1e-4)


def test_a_volume_thinner_than_the_ssim_window_is_scored_with_a_window_that_fits(
    feed: TrainingFeed, net: torch.nn.Module
) -> None:
    data = ValidationSet.from_feed(feed, (5, 16, 16))
    scores = validate(net, data, tile=(16, 16, 16), overlap=4, device=CPU, autocast_dtype=None)
    blurred, sharp = feed.read_pair("val000")
    cut = centre_crop_slices(sharp.shape, (5, 16, 16))
    rng = float(sharp.max() - sharp.min())
    expected = ssim(blurred[cut], sharp[cut], data_range=rng, win_size=5)
    assert scores["ssim_input"] == pytest.approx(expected)
