"""The generator's head starts at the training data's mean (issue 13, section 5).

The paper's sigmoid head with PyTorch's initialisation starts at 0.5 on a dark background;
``generator.head_init: data`` (the default) starts it at the mean of the domain it maps into.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from hpcdeconv.config import ExperimentConfig, load_config
from hpcdeconv.data.zarr_io import create_dataset, open_array, open_dataset, write_volume
from hpcdeconv.errors import InputError
from hpcdeconv.methods import build_method
from hpcdeconv.methods.base import Method
from hpcdeconv.metrics import psnr
from hpcdeconv.models.blocks import SIGMOID_START_EPS
from hpcdeconv.models.unet import UNet
from hpcdeconv.training.feed import TrainingFeed, sampled_mean
from tests.conftest import TINY_TRAINING

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _build(
    data: Path, seed: int, *extra: str, config: str = "blind.yaml"
) -> tuple[Method, TrainingFeed]:
    """The method as the engine builds it: seeded torch, then the feed's data means."""
    cfg = load_config(
        ExperimentConfig, CONFIGS / config, [*TINY_TRAINING, f"data.path={data}", *extra]
    )
    torch.manual_seed(seed)
    feed = TrainingFeed(cfg.data, seed=cfg.train.seed)
    method = build_method(cfg.method, feed.info(), seed=seed, checkpointing=False)
    return method, feed


def _exact_mean(data: Path, domain: str, ids: list[str]) -> float:
    group = open_dataset(data)
    volumes = [np.asarray(open_array(group, f"{domain}/{i}")[...], np.float64) for i in ids]
    return float(np.concatenate([v.ravel() for v in volumes]).mean())


def _predict(net: torch.nn.Module, volume: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net.eval()(torch.from_numpy(volume)[None, None])[0, 0].numpy()


def test_feed_means_are_the_training_volumes_means(tiny_dataset: Path) -> None:
    _, feed = _build(tiny_dataset, 0)
    means = feed.data_means()
    assert means["x"] == pytest.approx(_exact_mean(tiny_dataset, "sharp", feed.train_ids))
    assert means["y"] == pytest.approx(_exact_mean(tiny_dataset, "blurred", feed.train_ids))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("head", ["sigmoid", "none"])
def test_untrained_generator_starts_at_the_data_mean(
    tiny_dataset: Path, seed: int, head: str
) -> None:
    """Output mean within 20 % of the sharp mean; PSNR far above the default start and
    within a few dB of the input's."""
    # The demo configurations' width (TINY_TRAINING's 4 channels start up to 34 % off).
    extra = (f"method.generator.final_activation={head}", "method.generator.channels=16")
    data_start, feed = _build(tiny_dataset, seed, *extra)
    default_start, _ = _build(tiny_dataset, seed, *extra, "method.generator.head_init=default")
    blurred, sharp = feed.read_pair(feed.val_ids[0])
    mean = _exact_mean(tiny_dataset, "sharp", feed.train_ids)
    rng = float(sharp.max() - sharp.min())

    ours = _predict(data_start.artefact().network, blurred)
    before = _predict(default_start.artefact().network, blurred)
    if head == "sigmoid":
        assert abs(float(ours.mean()) - mean) < 0.2 * mean
    else:
        # A linear head's start keeps a small spread of means: within 1 % of the range
        # (0.0014 of 0.6 at worst here, 21 % of this sparse data's mean of 0.0067).
        assert abs(float(ours.mean()) - mean) < 0.01 * rng
    psnr_ours, psnr_before = psnr(ours, sharp, rng), psnr(before, sharp, rng)
    psnr_input = psnr(blurred, sharp, rng)
    assert psnr_ours > psnr_before + 10
    # A constant at the mean is the best start a structure-blind output can make (here
    # 4.9 dB below the input); the head's remaining spread costs a little more.
    assert psnr_ours > psnr_input - 8
    if head == "sigmoid":
        assert float(before.mean()) == pytest.approx(0.5, abs=0.1)  # the reported start


def test_conventional_cyclegan_blur_generator_starts_at_the_blurred_mean(
    tiny_dataset: Path,
) -> None:
    method, feed = _build(
        tiny_dataset,
        0,
        "method.generator.final_activation=sigmoid",
        "method.blur_generator.final_activation=sigmoid",
        "method.generator.channels=16",
        "method.blur_generator.channels=16",
        "method.blur_generator.depth=2",
        config="cyclegan.yaml",
    )
    blurred, sharp = feed.read_pair(feed.val_ids[0])
    means = feed.data_means()
    assert means["x"] != pytest.approx(means["y"], rel=0.05)  # the two domains differ here
    blur_net = method.groups()["G"].blur  # type: ignore[union-attr]
    assert float(_predict(blur_net, sharp).mean()) == pytest.approx(means["y"], rel=0.2)
    assert float(_predict(method.artefact().network, blurred).mean()) == pytest.approx(
        means["x"], rel=0.2
    )


def test_start_is_deterministic_and_draws_no_random_numbers(tiny_dataset: Path) -> None:
    """Same weights on every rank and run; the RNG stream (discriminators, pools) unchanged."""
    first, _ = _build(tiny_dataset, 5)
    after_first = torch.random.get_rng_state()
    second, _ = _build(tiny_dataset, 5)
    default, _ = _build(tiny_dataset, 5, "method.generator.head_init=default")
    assert torch.equal(torch.random.get_rng_state(), after_first)
    for name, tensor in first.artefact().network.state_dict().items():
        assert torch.equal(tensor, second.artefact().network.state_dict()[name]), name
    # Only the head differs from PyTorch's initialisation, and the discriminators not at all.
    ours, theirs = first.artefact().network.state_dict(), default.artefact().network.state_dict()
    changed = {k for k in ours if not torch.equal(ours[k], theirs[k])}
    assert changed == {"head.weight", "head.bias"}
    d_ours, d_theirs = first.groups()["D"].state_dict(), default.groups()["D"].state_dict()
    assert all(torch.equal(d_ours[k], d_theirs[k]) for k in d_ours)


def test_loading_a_checkpoint_replaces_the_start(tiny_dataset: Path) -> None:
    trained, feed = _build(tiny_dataset, 0, "method.generator.head_init=default")
    with torch.no_grad():
        trained.artefact().network.head.bias.fill_(0.25)  # type: ignore[operator]
    resumed, _ = _build(tiny_dataset, 0)
    resumed.artefact().network.load_state_dict(trained.artefact().network.state_dict())
    blurred, _ = feed.read_pair(feed.val_ids[0])
    np.testing.assert_array_equal(
        _predict(resumed.artefact().network, blurred), _predict(trained.artefact().network, blurred)
    )


def test_sigmoid_start_is_clamped_and_bad_means_refused() -> None:
    net = UNet(3, channels=2, depth=1)
    net.start_at(0.0)
    eps = SIGMOID_START_EPS
    assert float(net.head.bias.detach()) == pytest.approx(math.log(eps / (1 - eps)))
    net.start_at(0.2)
    assert float(net.head.bias.detach()) == pytest.approx(math.log(0.2 / 0.8))
    assert float(net.head.weight.detach().sum()) == pytest.approx(0.0, abs=1e-6)
    linear = UNet(3, channels=2, depth=1, final_activation="none")
    linear.start_at(3.5)
    assert float(linear.head.bias.detach()) == 3.5
    with pytest.raises(ValueError, match="finite"):
        net.start_at(float("nan"))
    with pytest.raises(ValueError, match="weight_scale"):
        net.start_at(0.1, weight_scale=0.0)


def _volumes(tmp_path: Path, nan: bool = False) -> dict[str, zarr.Array]:
    group = create_dataset(tmp_path / "m.zarr")
    rng = np.random.default_rng(7)
    for i, shape in enumerate([(20, 24, 24), (16, 40, 8)]):
        data = rng.random(shape).astype(np.float32) * (i + 1)
        if nan:
            data[3, 5, 5] = np.nan
        write_volume(group, f"sharp/v{i}", data, (0.1, 0.1, 0.1), chunks=(8, 8, 8))
    group = open_dataset(tmp_path / "m.zarr")
    return {name: open_array(group, name) for name in ("sharp/v0", "sharp/v1")}


def test_sampled_mean_is_exact_within_budget_and_a_chunk_sample_beyond(tmp_path: Path) -> None:
    arrays = _volumes(tmp_path)
    voxels = sum(a.size for a in arrays.values())
    exact = float(
        np.concatenate([np.asarray(a[...], np.float64).ravel() for a in arrays.values()]).mean()
    )
    assert sampled_mean(arrays, voxels) == pytest.approx(exact, rel=1e-12)
    # A budget of one chunk reads exactly one whole chunk, the same one every time.
    one = sampled_mean(arrays, 8 * 8 * 8)
    assert one == sampled_mean(arrays, 8 * 8 * 8)
    chunk_means = [
        float(np.asarray(a[z : z + 8, y : y + 8, x : x + 8], np.float64).mean())
        for a in arrays.values()
        for z in range(0, a.shape[0], 8)
        for y in range(0, a.shape[1], 8)
        for x in range(0, a.shape[2], 8)
    ]
    assert min(abs(one - m) for m in chunk_means) < 1e-12
    assert one != pytest.approx(exact, rel=1e-6)


def test_sampled_mean_refuses_non_finite_voxels(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="NaN or Inf voxels in training volume 'sharp/v0'"):
        sampled_mean(_volumes(tmp_path, nan=True), 10**9)
