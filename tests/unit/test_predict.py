"""Tiled in-memory prediction against whole-volume inference of small torch models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hpcdeconv.errors import ConfigError, InputError
from hpcdeconv.inference.predict import PredictSettings, predict_block, predict_volume
from hpcdeconv.inference.tiling import block_grid, tile_grid

SHAPE = (40, 56, 72)
# "Exact" means equal up to float32 summation order: a few ulps of the output scale
# (measured: at most 8e-7 of max |output|).
EXACT = 2e-6


def assert_exact(out: np.ndarray, reference: np.ndarray) -> None:
    assert np.abs(out - reference).max() <= EXACT * np.abs(reference).max()


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Seeded weights ~ N(0, 1 / fan_in) so outputs stay of order 1 through the stack."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=generator) / fan_in**0.5)
    return model.eval()


def conv_stack(radius: int, seed: int = 0, dims: int = 3) -> nn.Module:
    """``radius`` zero-padded 3-wide convolutions: receptive-field radius ``radius``."""
    conv = nn.Conv3d if dims == 3 else nn.Conv2d
    layers: list[nn.Module] = []
    for i in range(radius):
        layers.append(conv(1 if i == 0 else 4, 1 if i == radius - 1 else 4, 3, padding=1))
        if i < radius - 1:
            layers.append(nn.Tanh())
    return _randomise(nn.Sequential(*layers), seed)


def pointwise(seed: int = 0) -> nn.Module:
    return _randomise(nn.Sequential(nn.Conv3d(1, 4, 1), nn.Tanh(), nn.Conv3d(4, 1, 1)), seed)


def whole(model: nn.Module, volume: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(volume)[None, None])[0, 0].numpy()


class Recorder(nn.Module):
    """Wraps a model and records what each call saw; rejects sizes not divisible by ``k``."""

    def __init__(self, model: nn.Module, multiple: int = 1) -> None:
        super().__init__()
        self.model = model
        self.multiple = multiple
        self.calls: list[tuple[tuple[int, ...], bool, torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(n % self.multiple for n in x.shape[2:]):
            raise RuntimeError(f"spatial shape {tuple(x.shape[2:])} not divisible")
        y = self.model(x)
        self.calls.append((tuple(x.shape), torch.is_inference_mode_enabled(), y.dtype))
        return y


@pytest.fixture
def volume(rng) -> np.ndarray:
    return rng.standard_normal(SHAPE).astype(np.float32)


@pytest.mark.parametrize(
    ("blend", "radius", "exact"),
    [
        ("constant", 5, True),  # radius <= overlap // 2
        ("constant", 6, False),
        ("linear", 3, True),  # radius <= (overlap + 2) // 4
        ("linear", 4, False),
        ("gaussian", 3, True),
        ("gaussian", 4, False),
    ],
)
def test_tiled_equals_whole_volume_within_receptive_field(volume, blend, radius, exact) -> None:
    model = conv_stack(radius)
    reference = whole(model, volume)
    out = predict_volume(model, volume, tile=(20, 28, 36), overlap=10, blend=blend, batch_size=8)
    assert out.shape == SHAPE and out.dtype == np.float32
    if exact:
        assert_exact(out, reference)
    else:
        assert np.abs(out - reference).max() > 1e-3 * np.abs(reference).max()


@pytest.mark.parametrize("blend", ["linear", "gaussian"])
def test_smooth_blending_is_exact_for_pointwise_models(volume, blend) -> None:
    model = pointwise()
    out = predict_volume(model, volume, tile=(16, 24, 20), overlap=6, blend=blend, batch_size=16)
    np.testing.assert_allclose(out, whole(model, volume), atol=1e-5)


def _seam_ratio(out: np.ndarray, tile: int, overlap: int) -> float:
    """Largest step across a core boundary plane over the median step, worst axis."""
    tiles = tile_grid(out.shape, tile, overlap)
    worst = 0.0
    for axis in range(out.ndim):
        others = tuple(a for a in range(out.ndim) if a != axis)
        steps = np.abs(np.diff(out, axis=axis)).mean(axis=others)
        cuts = sorted({t.dest[axis].stop - 1 for t in tiles if t.dest[axis].stop < out.shape[axis]})
        worst = max(worst, float(steps[cuts].max() / np.median(steps)))
    return worst


def test_smooth_blending_hides_seams_of_a_tile_dependent_model(rng) -> None:
    # Instance normalisation makes each tile's output depend on the whole tile, as in many
    # U-Nets: cut-and-paste stitching then shows a step at every core boundary.
    model = _randomise(nn.Sequential(conv_stack(2), nn.InstanceNorm3d(1)), 0)
    grid = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in SHAPE), indexing="ij")
    smooth = grid[0] / 10 + np.sin(grid[1] / 8) + (grid[2] / 30) ** 2
    volume = (smooth + 0.05 * rng.standard_normal(SHAPE)).astype(np.float32)
    ratios = {
        blend: _seam_ratio(predict_volume(model, volume, (24,) * 3, 12, blend, 8), 24, 12)
        for blend in ("constant", "linear", "gaussian")
    }
    assert ratios["constant"] > 3.0
    assert ratios["linear"] < 1.3
    assert ratios["gaussian"] < 2.0


def test_small_axis_is_padded_and_tiles_respect_size_multiple(rng) -> None:
    volume = rng.standard_normal((10, 30, 45)).astype(np.float32)
    model = Recorder(conv_stack(2), multiple=8)
    out = predict_volume(
        model, volume, tile=(20, 24, 24), overlap=8, blend="constant", batch_size=4, size_multiple=8
    )
    assert out.shape == volume.shape
    # Z (10 < tile) becomes one 16-voxel tile padded symmetrically by 3 on each side.
    assert {call[0][2:] for call in model.calls} == {(16, 24, 24)}
    reference = whole(model.model, np.pad(volume, ((3, 3), (0, 0), (0, 0)), mode="symmetric"))
    assert_exact(out, reference[3:13])


def test_batches_run_in_inference_mode_and_do_not_change_the_result(volume) -> None:
    model = Recorder(conv_stack(2))
    single = predict_volume(model, volume, tile=(16, 16, 16), overlap=4, batch_size=1)
    count = len(model.calls)
    model.calls.clear()
    batched = predict_volume(model, volume, tile=(16, 16, 16), overlap=4, batch_size=5)
    assert count == len(tile_grid(SHAPE, 16, 4))
    sizes = [call[0][0] for call in model.calls]
    assert sum(sizes) == count and sizes[:-1] == [5] * (len(sizes) - 1) and sizes[-1] <= 5
    assert all(call[1] for call in model.calls)
    assert_exact(batched, single)


def test_bfloat16_autocast(volume) -> None:
    model = Recorder(conv_stack(3))
    full = predict_volume(model, volume, tile=(24, 24, 24), overlap=8, batch_size=4)
    half = predict_volume(
        model, volume, tile=(24, 24, 24), overlap=8, batch_size=4, autocast_dtype=torch.bfloat16
    )
    assert model.calls[-1][2] == torch.bfloat16
    assert half.dtype == np.float32
    scale = np.abs(full).max()
    assert 0 < np.abs(half - full).max() < 3e-2 * scale


def test_two_dimensional_volume(rng) -> None:
    image = rng.standard_normal((50, 70)).astype(np.float32)
    model = conv_stack(3, dims=2)
    out = predict_volume(model, image, tile=(16, 16), overlap=6, blend="constant", batch_size=8)
    with torch.inference_mode():
        reference = model(torch.from_numpy(image)[None, None])[0, 0].numpy()
    assert_exact(out, reference)


def test_progress_bar_only_when_asked(volume, capsys) -> None:
    model = pointwise()
    predict_volume(model, volume, tile=(32, 32, 32), overlap=8, progress=False)
    assert capsys.readouterr().err == ""
    predict_volume(model, volume, tile=(32, 32, 32), overlap=8, progress=True)
    assert "tile" in capsys.readouterr().err


def test_invalid_settings_and_inputs(volume) -> None:
    model = pointwise()
    with pytest.raises(InputError, match="axes"):
        predict_volume(model, volume[None], tile=(16, 16, 16), overlap=4)
    with pytest.raises(ConfigError, match="overlap"):
        predict_volume(model, volume, tile=(16, 16, 16), overlap=16)
    with pytest.raises(ConfigError, match="blend"):
        predict_volume(model, volume, tile=(16, 16, 16), overlap=4, blend="cosine")
    with pytest.raises(ConfigError, match="batch_size"):
        predict_volume(model, volume, tile=(16, 16, 16), overlap=4, batch_size=0)
    with pytest.raises(ValueError, match="model output shape"):
        predict_volume(nn.Conv3d(1, 2, 1), volume, tile=(16, 16, 16), overlap=4)


@pytest.mark.parametrize(("halo", "exact"), [(5, True), (3, False)])
def test_blocks_with_halo_reproduce_whole_volume_inference(volume, halo, exact) -> None:
    volume = volume[:24, :40, :48]
    model = conv_stack(radius=5)
    reference = whole(model, np.pad(volume, halo, mode="symmetric"))[(slice(halo, -halo),) * 3]
    # One tile along Z and Y of a padded block, several along X.
    settings = PredictSettings(tile=(26, 42, 20), overlap=10, blend="constant", batch_size=4)
    out = np.full(volume.shape, np.nan, dtype=np.float32)
    for block in block_grid(volume.shape, (16, 32, 32), halo, (8, 16, 16)):
        out[block.write] = predict_block(model, volume[block.read], block, settings)
    if exact:
        assert_exact(out, reference)
    else:
        assert np.abs(out - reference).max() > 1e-3 * np.abs(reference).max()


@pytest.mark.gpu
def test_cuda_matches_cpu(volume) -> None:
    model = conv_stack(3)
    cpu = predict_volume(model, volume, tile=(24, 24, 24), overlap=8, batch_size=4)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        gpu = predict_volume(
            model.to("cuda"), volume, tile=(24, 24, 24), overlap=8, batch_size=4, device="cuda"
        )
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)
