"""EMA of the generator's weights: the update rule, exact resume, and EMA weights at inference."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hpcdeconv.config import ExperimentConfig, UNetConfig, load_config
from hpcdeconv.errors import ConfigError, InputError
from hpcdeconv.inference.model import load_model
from hpcdeconv.inference.predict import predict_volume
from hpcdeconv.inference.processors import NetworkProcessor, _cached_network
from hpcdeconv.models.factory import build_generator
from hpcdeconv.training.checkpoint import (
    CKPT_DIR,
    latest_checkpoint,
    load_checkpoint,
    mark_best,
    save_checkpoint,
)
from hpcdeconv.training.ema import GeneratorEMA, unwrap
from hpcdeconv.training.engine import train
from tests.conftest import TINY_TRAINING

TINY_UNET = UNetConfig(channels=4, depth=2)


def test_update_is_the_hand_computed_average() -> None:
    net = nn.Linear(3, 2)
    p0 = {k: v.clone() for k, v in net.state_dict().items()}
    ema = GeneratorEMA(net, decay=0.5)
    values = []
    with torch.no_grad():
        for shift in (1.0, -3.0):
            for p in net.parameters():
                p.add_(shift)
            values.append({k: v.clone() for k, v in net.state_dict().items()})
            ema.update(net)
    p1, p2 = values
    for k in p0:
        # s1 = .5 p0 + .5 p1, s2 = .5 s1 + .5 p2
        expected = 0.25 * p0[k] + 0.25 * p1[k] + 0.5 * p2[k]
        torch.testing.assert_close(ema.module.state_dict()[k], expected, rtol=0, atol=1e-6)
    assert ema.updates == 2
    # The shadow is a copy: the trained module keeps its own weights.
    torch.testing.assert_close(net.weight, p2["weight"])


def test_constant_weights_are_approached_geometrically() -> None:
    net = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        net.weight.zero_()
    ema = GeneratorEMA(net, decay=0.9)
    with torch.no_grad():
        net.weight.fill_(2.0)
    for n in range(1, 61):
        ema.update(net)
        if n in (1, 10):
            # From 0 towards c: c (1 - d^n)
            expected = torch.full((4, 4), 2.0 * (1 - 0.9**n))
            torch.testing.assert_close(ema.module.weight, expected, rtol=1e-6, atol=1e-6)
    assert float((ema.module.weight - 2.0).abs().max()) < 2.0 * 0.9**60 + 1e-6
    # Started at the value itself, the average stays there exactly.
    steady = GeneratorEMA(net, decay=0.999)
    for _ in range(5):
        steady.update(net)
    assert torch.equal(steady.module.weight, net.weight)


def test_buffers_are_copied_and_the_shadow_is_fp32() -> None:
    net = nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2)).to(torch.bfloat16)
    ema = GeneratorEMA(net, decay=0.99)
    assert all(p.dtype == torch.float32 for p in ema.module.parameters())
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert not ema.module.training
    with torch.no_grad():
        net[1].running_mean.fill_(5.0)
        net[1].num_batches_tracked.fill_(7)
    ema.update(net)
    assert torch.equal(ema.module[1].running_mean, torch.full((2,), 5.0))
    assert int(ema.module[1].num_batches_tracked) == 7
    # The (1 - d) = 1% step is taken in fp32 from the bf16 weights.
    before = ema.module[0].weight.clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ema.update(net)
    expected = before + 0.01 * (net[0].weight.float() - before)
    torch.testing.assert_close(ema.module[0].weight, expected, rtol=0, atol=1e-6)
    assert float((ema.module[0].weight - before).abs().min()) > 0.005


def test_wrappers_are_looked_through_and_bad_input_refused() -> None:
    net = nn.Linear(2, 2)
    assert unwrap(nn.DataParallel(net)) is net
    ema = GeneratorEMA(nn.DataParallel(net), decay=0.5)
    ema.update(nn.DataParallel(net))
    assert set(ema.module.state_dict()) == {"weight", "bias"}
    for bad in (0.0, 1.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            GeneratorEMA(net, decay=bad)
    with pytest.raises(ValueError, match="layout"):
        ema.update(nn.Linear(2, 2, bias=False))
    with pytest.raises(ValueError, match="does not fit"):
        ema.load_state_dict({"module": nn.Linear(3, 2).state_dict(), "updates": 1})


def _train(net: nn.Module, ema: GeneratorEMA, opt: torch.optim.Optimizer, steps: range) -> None:
    """A real optimisation of the tiny U-Net on seeded data, the EMA updated per step."""
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        x = torch.rand(1, 1, 8, 8, 8, generator=gen)
        loss = ((net(x) - x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(net)


def test_resumed_ema_equals_the_uninterrupted_one(tmp_path: Path) -> None:
    torch.manual_seed(0)
    whole = build_generator(TINY_UNET, spatial_dims=3, in_channels=1, out_channels=1)
    start = {k: v.clone() for k, v in whole.state_dict().items()}
    ema = GeneratorEMA(whole, decay=0.9)
    _train(whole, ema, torch.optim.Adam(whole.parameters(), lr=1e-2), range(6))

    broken = build_generator(TINY_UNET, spatial_dims=3, in_channels=1, out_channels=1)
    broken.load_state_dict(start)
    opt = torch.optim.Adam(broken.parameters(), lr=1e-2)
    first = GeneratorEMA(broken, decay=0.9)
    _train(broken, first, opt, range(3))
    state = {
        "format": 1,
        "config": {},
        "step": 3,
        "net": broken.state_dict(),
        "opt": opt.state_dict(),
        "ema": first.state_dict(),
    }
    save_checkpoint(tmp_path, 3, state)
    # A fresh process: new networks with other weights, then everything restored.
    loaded = load_checkpoint(tmp_path)
    torch.manual_seed(1)
    resumed = build_generator(TINY_UNET, spatial_dims=3, in_channels=1, out_channels=1)
    resumed.load_state_dict(loaded["net"])
    opt = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    opt.load_state_dict(loaded["opt"])
    second = GeneratorEMA(resumed, decay=0.9)
    second.load_state_dict(loaded["ema"])
    _train(resumed, second, opt, range(3, 6))

    assert second.updates == ema.updates == 6
    a, b = ema.module.state_dict(), second.module.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # ... and the average really differs from the trained weights.
    assert not torch.equal(a["head.weight"], whole.state_dict()["head.weight"])


def test_ema_decay_configuration() -> None:
    assert load_config(ExperimentConfig, None, []).train.ema_decay is None
    cfg = load_config(ExperimentConfig, None, ["train.ema_decay=0.999"])
    assert cfg.train.ema_decay == 0.999
    for bad, msg in (("1.0", "less than 1"), ("0", "greater than 0"), ("-1", "greater than 0")):
        with pytest.raises(ConfigError, match=rf"'train\.ema_decay': Input should be {msg}"):
            load_config(ExperimentConfig, None, [f"train.ema_decay={bad}"])


# --------------------------------------------------------------------------------------
# EMA weights at inference
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ema_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 4-step run with ``train.ema_decay``: its checkpoints carry ``deblur_ema``."""
    run = tmp_path_factory.mktemp("ema") / "run"
    cfg = load_config(
        ExperimentConfig,
        None,
        [
            *TINY_TRAINING,
            f"data.path={tiny_dataset}",
            f"output={run}",
            "method.name=supervised",
            "train.steps=4",
            "train.ckpt_every=2",
            "train.ema_decay=0.5",
        ],
    )
    train(cfg, progress=False)
    return run


def test_auto_takes_the_ema_weights_and_says_so(
    ema_run: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = load_checkpoint(ema_run)
    with caplog.at_level(logging.INFO, logger="hpcdeconv.inference.model"):
        auto = load_model(ema_run)
    assert auto.weights == "ema" and auto.step == 4
    assert "using best checkpoint (step 4, psnr " in caplog.text and "EMA weights" in caplog.text
    raw = load_model(ema_run, weights="raw")
    assert raw.weights == "raw" and "trained (non-EMA) weights" in raw.describe()
    for k, v in state["deblur_ema"].items():
        assert torch.equal(auto.net.state_dict()[k], v)
        assert torch.equal(raw.net.state_dict()[k], state["deblur"][k])
    assert load_model(ema_run, weights="ema").weights == "ema"
    x = np.random.default_rng(1).random((16, 32, 32)).astype(np.float32)
    kw = {"tile": (16, 32, 32), "overlap": 0, "size_multiple": auto.size_multiple}
    assert not np.array_equal(predict_volume(auto.net, x, **kw), predict_volume(raw.net, x, **kw))


def test_ema_refused_when_absent_and_when_not_finite(ema_run: Path, tmp_path: Path) -> None:
    # A checkpoint of a run without train.ema_decay.
    early = tmp_path / "no_ema.pt"
    plain = load_checkpoint(ema_run / CKPT_DIR / "step_00000002.pt")
    del plain["deblur_ema"], plain["ema"]
    torch.save(plain, early)
    assert load_model(early).weights == "raw"  # auto without an EMA: the trained weights
    with pytest.raises(InputError, match=r"holds no EMA weights .* use --weights raw"):
        load_model(early, weights="ema")
    with pytest.raises(InputError, match="weights must be"):
        load_model(early, weights="average")  # type: ignore[arg-type]
    run = tmp_path / "run"
    shutil.copytree(ema_run, run)
    state = load_checkpoint(run)
    state["deblur_ema"]["head.bias"].fill_(float("nan"))
    state["step"] = 5
    save_checkpoint(run, 5, state)
    fifth = run / CKPT_DIR / "step_00000005.pt"
    with pytest.raises(InputError, match="1 EMA generator weight"):
        load_model(fifth)
    assert load_model(fifth, weights="raw").step == 5


def test_best_checkpoint_with_ema_is_described_whole(
    ema_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    shutil.copytree(ema_run, run)
    mark_best(run, latest_checkpoint(run), {"psnr": 27.3, "ssim": 0.91}, metric="psnr")
    with caplog.at_level(logging.INFO, logger="hpcdeconv.inference.model"):
        load_model(run)
    assert "best checkpoint (step 4, psnr 27.30 dB, ssim 0.910)" in caplog.text
    assert caplog.text.rstrip().endswith("EMA weights")


def test_cluster_workers_load_the_weights_the_client_chose(ema_run: Path) -> None:
    """dask workers reload the checkpoint file: they must take the same weights."""
    kw = {"tile": (16, 32, 32), "overlap": 0, "blend": "linear", "batch_size": 1}
    raw = NetworkProcessor.from_model(load_model(ema_run, weights="raw"), precision="fp32", **kw)
    ema = NetworkProcessor.from_model(load_model(ema_run), precision="fp32", **kw)
    assert (raw.weights, ema.weights) == ("raw", "ema")
    assert raw.fingerprint != ema.fingerprint  # one checkpoint file, two results
    state = load_checkpoint(ema_run)
    x = torch.from_numpy(np.random.default_rng(2).random((1, 1, 16, 32, 32), dtype=np.float32))
    for processor, key in ((raw, "deblur"), (ema, "deblur_ema")):
        cpu = torch.device("cpu")
        net = _cached_network(processor.checkpoint, cpu, None, False, processor.weights)
        reference = build_generator(
            load_model(ema_run).config.method.generator,
            spatial_dims=3,
            in_channels=1,
            out_channels=1,
        )
        reference.load_state_dict(state[key])
        with torch.inference_mode():
            assert torch.equal(net(x), reference.eval()(x))
