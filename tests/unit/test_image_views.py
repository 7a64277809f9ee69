"""TensorBoard strips and orthoview figures of 2D images and of images with channels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hpcdeconv.training.runlog import RunLogger, mip_strip, read_metrics
from hpcdeconv.viz import orthoview_figure, save_orthoviews


def _scaled(a: np.ndarray) -> np.ndarray:
    return (a - a.min()) / (a.max() - a.min())


def test_2d_images_are_shown_as_they_are() -> None:
    image = torch.rand(10, 14)
    strip = mip_strip({"in": image, "out": 2 * image})
    assert strip.shape == (10, 2 * (14 + 2))
    np.testing.assert_allclose(strip[:, :14], _scaled(image.numpy()), rtol=1e-6)
    np.testing.assert_allclose(strip[:, 16:30], _scaled(image.numpy()), rtol=1e-6)
    assert not strip[:, 14:16].any()


def test_channels_first_channel_or_rgb() -> None:
    rgb = torch.rand(3, 10, 14)
    two = torch.rand(2, 10, 14)
    strip = mip_strip({"rgb": rgb, "two": two}, spatial_dims=2)
    assert strip.shape == (10, 32, 3)
    np.testing.assert_allclose(strip[:, :14], _scaled(rgb.permute(1, 2, 0).numpy()), rtol=1e-6)
    grey = _scaled(two[0].numpy())
    for c in range(3):  # a non-RGB image next to an RGB one is repeated as grey
        np.testing.assert_allclose(strip[:, 16:30, c], grey, rtol=1e-6)
    volumes = torch.rand(2, 6, 10, 14)  # (C, Z, Y, X): the MIP of the first channel
    mip = mip_strip({"v": volumes})
    np.testing.assert_allclose(mip[:, :14], _scaled(volumes[0].amax(0).numpy()), rtol=1e-6)


def test_rgb_strip_reaches_tensorboard(tmp_path: Path) -> None:
    logger = RunLogger(tmp_path, enabled=True)
    logger.images(3, {"rgb": torch.rand(3, 8, 8), "grey": torch.rand(8, 8)}, spatial_dims=2)
    logger.scalars(3, "train", {"loss": 1.0})
    logger.close()
    assert read_metrics(tmp_path)[0]["step"] == 3
    assert list((tmp_path / "tensorboard").iterdir())


def test_2d_figure_has_one_view_per_panel(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.random((20, 30)).astype(np.float32)
    fig = orthoview_figure([("in", image), ("out", image)], (0.1, 0.2))
    axes = fig.get_axes()
    assert len(axes) == 2 and axes[0].get_title() == "in — XY"
    np.testing.assert_array_equal(axes[0].images[0].get_array(), image)
    assert axes[0].images[0].get_extent() == pytest.approx((0, 30 * 0.2, 20 * 0.1, 0))
    rgb = rng.random((3, 20, 30)).astype(np.float32)
    fig = orthoview_figure([("rgb", rgb)], (0.1, 0.2))
    shown = np.asarray(fig.get_axes()[0].images[0].get_array())
    assert shown.shape == (20, 30, 3)
    np.testing.assert_allclose(shown, _scaled(np.moveaxis(rgb, 0, -1)), rtol=1e-6)
    save_orthoviews(tmp_path / "flat.png", [("rgb", rgb)], (0.1, 0.2))
    assert (tmp_path / "flat.png").read_bytes().startswith(b"\x89PNG")


def test_3d_channels_show_the_first_channel() -> None:
    rng = np.random.default_rng(1)
    stack = rng.random((2, 6, 10, 12)).astype(np.float32)
    fig = orthoview_figure([("two", stack)], (0.3, 0.1, 0.1), mode="mip")
    xy, xz, yz = (ax.images[0].get_array() for ax in fig.get_axes())
    np.testing.assert_array_equal(xy, stack[0].max(axis=0))
    np.testing.assert_array_equal(xz, stack[0].max(axis=1))
    np.testing.assert_array_equal(yz, stack[0].max(axis=2).T)
    with pytest.raises(ValueError, match="does not match 3 voxel-size entries"):
        orthoview_figure([("bad", stack[None])], (0.3, 0.1, 0.1))
