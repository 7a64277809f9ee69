"""COMI (Zhang et al., CSBJ 2022): its loss weighting, content targets, 70×70 PatchGAN,
frozen VGG, 2D-only rule, and the intensity mapping a checkpoint carries to inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hpcdeconv.config import (
    COMIConfig,
    DiscriminatorConfig,
    ExperimentConfig,
    OptimConfig,
    ResNetConfig,
    load_config,
)
from hpcdeconv.data.intensity import IntensityMap, fit_intensity_map
from hpcdeconv.errors import ConfigError, InputError
from hpcdeconv.inference.predict import PredictSettings, predict_array
from hpcdeconv.methods import build_method
from hpcdeconv.methods.base import DataInfo
from hpcdeconv.methods.comi import COMI
from hpcdeconv.methods.cycle import CycleOutputs
from hpcdeconv.models.discriminators import PatchGAN
from hpcdeconv.models.intensity import IntensityMapped
from hpcdeconv.models.vgg import VGG19Features
from hpcdeconv.training.loss_networks import place_loss_networks
from hpcdeconv.training.strategy import SingleStrategy

ROOT = Path(__file__).resolve().parents[2]
GEN = ResNetConfig(channels=4, n_blocks=1, final_activation="tanh", global_residual=True)
DISC = DiscriminatorConfig(channels=4, n_layers=3, n_scales=1, head_kernel=4)
PATCH = 32


def _config(tmp_path: Path | None = None, **loss: float) -> COMIConfig:
    content = {}
    if tmp_path is not None:
        weights = tmp_path / "vgg19.pth"
        torch.manual_seed(5)
        torch.save(VGG19Features().state_dict(), weights)
        content = {"vgg_weights": weights}
    return COMIConfig(
        generator=GEN, blur_generator=GEN, discriminator=DISC, loss=loss, content=content
    )


def _data(channels: int = 1, paired: bool = False, dims: int = 2) -> DataInfo:
    return DataInfo(
        spatial_dims=dims,
        channels=channels,
        voxel_size=(0.5,) * dims,
        means={"x": 0.0, "y": 0.0},
        intensity=IntensityMap(100.0, 4000.0),
        paired=paired,
    )


def _bound(cfg: COMIConfig, data: DataInfo) -> COMI:
    torch.manual_seed(0)
    method = build_method(cfg, data, seed=3, checkpointing=False)
    assert isinstance(method, COMI)
    strategy = SingleStrategy(torch.device("cpu"), "fp32")
    method.bind(
        {n: strategy.wrap(g, OptimConfig(), 10, name=n) for n, g in method.groups().items()}
    )
    place_loss_networks(method, torch.device("cpu"))
    return method


def _batch(channels: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (1, channels, PATCH, PATCH)
    return {
        "x": torch.rand(shape, generator=g) * 2 - 1,
        "y": torch.rand(shape, generator=g) * 2 - 1,
    }


def test_paper_defaults() -> None:
    cfg = COMIConfig()
    assert (cfg.loss.adversarial_weight, cfg.loss.content_weight, cfg.loss.cycle_weight) == (
        1.0,
        1.0,
        0.001,
    )
    assert cfg.loss.adversarial == "gan"
    assert cfg.generator.kind == "resnet" and cfg.generator.n_blocks == 9
    assert cfg.generator.final_activation == "tanh" and cfg.generator.global_residual
    assert (cfg.discriminator.n_scales, cfg.discriminator.head_kernel) == (1, 4)
    assert cfg.content.layers == ("relu3_3",)
    paper = load_config(ExperimentConfig, ROOT / "configs/comi_paper.yaml", [])
    assert paper.optim.betas == (0.5, 0.99) and paper.optim.lr == 1e-4
    assert paper.optim.decay_start == paper.train.steps // 2 and paper.data.batch_size == 1


@pytest.mark.parametrize(("head_kernel", "field"), [(3, 54), (4, 70)])
def test_patchgan_receptive_field_by_gradient_footprint(head_kernel: int, field: int) -> None:
    # Isola et al.'s 70×70 PatchGAN: one score depends on exactly a 70×70 input window.
    torch.manual_seed(0)
    disc = PatchGAN(2, 1, 4, 3, head_kernel).eval()
    # Instance normalisation couples every position through its mean: take it out, so the
    # gradient shows the convolutions' footprint alone.
    for module in disc.modules():
        for name, child in module.named_children():
            if isinstance(child, torch.nn.InstanceNorm2d):
                setattr(module, name, torch.nn.Identity())
    with torch.no_grad():
        for p in disc.parameters():
            p.copy_(p.abs() + 0.01)  # positive weights: no accidental cancellation
    disc = disc.double()
    x = torch.rand(1, 1, 160, 160, dtype=torch.float64, requires_grad=True)
    scores = disc(x)
    cy, cx = (s // 2 for s in scores.shape[2:])
    scores[0, 0, cy, cx].backward()
    assert x.grad is not None
    rows, cols = (np.flatnonzero(x.grad[0, 0].abs().sum(axis=a).numpy()) for a in (1, 0))
    assert rows[-1] - rows[0] + 1 == field == cols[-1] - cols[0] + 1
    assert disc.receptive_field() == field


def test_generator_loss_is_the_lambda_weighted_sum(tmp_path: Path) -> None:
    weights = {"adversarial_weight": 0.7, "content_weight": 2.5, "cycle_weight": 0.001}
    # Paired: the content of G(y) is compared with x (G starts as the identity, so the
    # unpaired term, G(y) against y, would start at exactly 0).
    method = _bound(_config(tmp_path, **weights), _data(paired=True))
    losses = method.step(_batch())
    expected = 0.7 * losses["adv_g"] + 2.5 * losses["content"] + 0.001 * losses["cycle"]
    assert torch.isclose(losses["loss_g"], expected, rtol=1e-5)
    assert losses["content"] > 0
    # λ2 = 0 (the plain cycleGAN baseline) does not compute the content term.
    plain = _bound(_config(tmp_path, content_weight=0.0), _data())
    assert "content" not in plain.step(_batch())


@pytest.mark.parametrize("paired", [False, True])
def test_content_targets_paired_and_unpaired(paired: bool) -> None:
    method = _bound(_config(), _data(paired=paired))
    batch = _batch()
    x, y = batch["x"], batch["y"]
    # Generators that return the image they were given: G(y) = y, F(x) = x.
    out = CycleOutputs(x_fake=y, y_fake=x, x_rec=x, y_rec=y)
    terms = method.generator_terms(x, y, out, method.t["D"].module.discs)
    # Unpaired: each output against its own input (identical here, so 0). Paired: against
    # the other domain's image of the same field, ‖y − x‖² both ways (pixel L2 fallback).
    expected = 2 * torch.mean((x - y) ** 2) if paired else torch.tensor(0.0)
    assert torch.isclose(terms["content"], expected, atol=1e-7)


def test_vgg_is_frozen_and_outside_groups_and_checkpoints(tmp_path: Path) -> None:
    method = _bound(_config(tmp_path), _data(channels=3))
    vgg = method.loss_networks()["content"]
    assert all(not p.requires_grad for p in vgg.parameters())
    grouped = {id(p) for g in method.groups().values() for p in g.parameters()}
    assert not grouped & {id(p) for p in vgg.parameters()}
    before = [p.clone() for p in vgg.parameters()]
    method.step(_batch(channels=3))
    assert all(torch.equal(a, b) for a, b in zip(before, vgg.parameters(), strict=True))
    keys = {k for g in method.groups().values() for k in g.state_dict()}
    assert not any("vgg" in k or "content" in k for k in keys)


def test_comi_refuses_volumes() -> None:
    with pytest.raises(ConfigError, match="COMI corrects 2D images"):
        build_method(_config(), _data(dims=3), seed=0, checkpointing=False)


def test_paired_and_domains_are_both_accepted_others_refused() -> None:
    base = load_config(ExperimentConfig, ROOT / "configs/comi.yaml", [])
    assert base.data.kind == "domains" and base.method.name == "comi"
    data = {**base.data.model_dump(), "kind": "paired"}
    raw = {**base.model_dump(), "data": data}
    assert ExperimentConfig.model_validate(raw).data.kind == "paired"
    raw["data"] = {"kind": "psf_samples", "path": "x.zarr"}
    with pytest.raises(ValueError, match="'domains' or 'paired'"):
        ExperimentConfig.model_validate(raw)


def test_intensity_mapped_generator_works_on_raw_values() -> None:
    mapping = fit_intensity_map([np.array([100.0, 500.0, 4000.0])], (0, 100), (-1.0, 1.0))
    assert (mapping.low, mapping.high) == (100.0, 4000.0)
    net = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        net.weight.fill_(1 / 9)
    net.receptive_field = lambda: 3  # type: ignore[attr-defined,method-assign]
    wrapped = IntensityMapped(net, mapping)
    raw = torch.full((1, 1, 8, 8), 2050.0)  # maps to 0; a mean filter keeps a constant
    assert torch.allclose(wrapped(raw), raw)
    ramp = torch.linspace(100, 4000, 64).reshape(1, 1, 8, 8)
    manual = mapping.inverse(net(torch.from_numpy(mapping.forward(ramp.numpy()))).detach().numpy())
    np.testing.assert_allclose(wrapped(ramp).detach().numpy(), manual, rtol=1e-5)
    assert wrapped.receptive_field() == 3
    assert set(wrapped.state_dict()) == {f"net.{k}" for k in net.state_dict()}


def test_intensity_record_round_trip_and_bad_records() -> None:
    mapping = IntensityMap(12.5, 900.0, (0.0, 1.0))
    assert IntensityMap.from_record(mapping.record()) == mapping
    for bad in ({"low": 1.0}, {"low": 1, "high": 2, "target": [0]}, {"low": "a", "high": 2}):
        with pytest.raises(InputError, match="malformed intensity mapping"):
            IntensityMap.from_record(bad)
    with pytest.raises(InputError, match="high > low"):
        IntensityMap(5.0, 5.0)
    with pytest.raises(InputError, match="flat images"):
        fit_intensity_map([np.full((4, 4), 7.0)])


@pytest.mark.parametrize("channels", [1, 3])
def test_generators_and_discriminators_on_odd_sizes_and_1_or_3_channels(channels: int) -> None:
    # Training patches are multiples of 4 (checked by the config); whole images of any
    # size go through tiled prediction, which pads to the generator's multiple and crops.
    method = build_method(_config(), _data(channels=channels), seed=0, checkpointing=False)
    assert isinstance(method, COMI)
    x = torch.rand(1, channels, 32, 48) * 2 - 1
    out = method.generators(x, x)
    assert out.x_fake.shape == out.y_fake.shape == out.x_rec.shape == x.shape
    for disc in method.discriminators.discs.values():
        # 70×70 PatchGAN: Y // 8 − 2 scores per axis, also for odd sides.
        assert disc(torch.rand(1, channels, 37, 45))[0].shape == (1, 1, 37 // 8 - 2, 45 // 8 - 2)
    settings = PredictSettings((32, 32), 8, "linear", size_multiple=4)
    image = np.random.default_rng(0).random((channels, 37, 45)).astype(np.float32)
    with torch.no_grad():
        result = predict_array(method.generator.eval(), image, settings, channels, lead=1)
    assert result.shape == image.shape and np.isfinite(result).all()
