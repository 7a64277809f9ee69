"""PSF-parameter regression: eq. 11 by hand, the ResNet regressors, learning Gaussian-1
widths on a toy set, and the regressor loader."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.signal import fftconvolve

from hpcdeconv.config import ExperimentConfig, PSFOptics, RegressorConfig, load_config
from hpcdeconv.data.samples import write_psf_samples
from hpcdeconv.data.zarr_io import update_root_attrs
from hpcdeconv.errors import ConfigError, InputError
from hpcdeconv.losses.psf_regression import psf_regression_loss
from hpcdeconv.methods.base import DataInfo
from hpcdeconv.methods.psf_regression import PSFRegression
from hpcdeconv.models.regressor import Regressor, build_regressor
from hpcdeconv.psfnet.psf_models import PSFModel
from hpcdeconv.psfnet.regressor import load_regressor
from hpcdeconv.training.checkpoint import load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[2]


def write_toy_store(
    path: Path, n: int = 1024, size: int = 32, seed: int = 0, model_name: str = "gaussian1"
) -> PSFModel:
    """Samples of random bright dots blurred by the model's PSF (every 8th patch flat,
    invalid), split 4:1:1 into train/val/test; records the model in the store."""
    model = PSFModel(model_name, PSFOptics(psf_size=31))  # type: ignore[arg-type]
    rng = np.random.default_rng(seed)
    params = model.sample(rng, n)
    psfs = model.render(torch.from_numpy(params)).numpy()
    margin = 15
    patches = np.empty((n, 1, size, size), np.float32)
    valid = np.array(model.defined(params), dtype=bool)
    for i in range(n):
        if i % 8 == 7:
            patches[i, 0] = rng.uniform(0, 1) + 0.01 * rng.standard_normal((size, size))
            valid[i] = False
            continue
        big = size + 2 * margin
        sharp = (rng.random((big, big)) < 0.03) * rng.uniform(0.5, 1.0, (big, big))
        blurred = fftconvolve(sharp, psfs[i], mode="same")[margin:-margin, margin:-margin]
        patches[i, 0] = blurred + 0.002 * rng.standard_normal((size, size))
    k = n // 6
    ids = list(range(n))
    split = {"train": ids[: n - 2 * k], "val": ids[n - 2 * k : n - k], "test": ids[n - k :]}
    group = write_psf_samples(
        path, patches, params, model.names, model.units, (0.325, 0.325), valid, split
    )
    update_root_attrs(group, psf_model=model.record())
    return model


def test_loss_is_eq_11_by_hand() -> None:
    # Three parameters (focus, cylinder, axis); sample 1's axis is undefined (NaN target),
    # sample 2 is invalid (no parameter defined: a0 = 1).
    target = torch.tensor([[0.2, 0.4, 0.6], [0.5, 0.1, math.nan], [0.3, 0.3, 0.3]])
    valid = torch.tensor([[True, True, True], [True, True, False], [False, False, False]])
    output = torch.tensor([[0.1, 0.5, 0.9, 0.2], [0.7, 0.0, 0.8, -0.1], [0.9, 0.9, 0.9, 0.6]])
    gamma = 2.0
    # L_i = γ (a0 − â0)² + (1 − a0)/(2N) Σ_n v_n (a_n − â_n)², N = 3
    l0 = gamma * (0 - 0.2) ** 2 + (0.1**2 + 0.1**2 + 0.3**2) / 6
    l1 = gamma * (0 + 0.1) ** 2 + (0.2**2 + 0.1**2) / 6
    l2 = gamma * (1 - 0.6) ** 2
    loss, validity, params = psf_regression_loss(output, target, valid, gamma)
    assert loss.item() == pytest.approx((l0 + l1 + l2) / 3, rel=1e-6)
    assert validity.item() == pytest.approx(gamma * (0.04 + 0.01 + 0.16) / 3, rel=1e-6)
    assert params.item() == pytest.approx((l0 + l1 + l2) / 3 - validity.item(), rel=1e-5)
    with pytest.raises(ValueError, match=r"eq\. 11"):
        psf_regression_loss(output[:, :3], target, valid)


@pytest.mark.parametrize("kind", ["resnet34", "resnext50"])
def test_regressor_shapes_blocks_and_standardisation(kind: str) -> None:
    torch.manual_seed(0)
    net = Regressor(RegressorConfig(kind=kind, width=16), outputs=3).eval()
    blocks = [len(getattr(net, f"layer{i}")) for i in range(1, 5)]
    assert blocks == [3, 4, 6, 3]
    x = torch.rand(2, 1, 48, 40)
    out = net(x)
    assert out.shape == (2, 3)
    # Raw intensities: an affine change of a patch changes nothing.
    torch.testing.assert_close(net(7.0 * x + 3.0), out, rtol=1e-4, atol=1e-4)
    # A flat patch is seen as zeros, whatever its level.
    flat = torch.full((1, 1, 32, 32), 5.0)
    torch.testing.assert_close(net(flat), net(torch.zeros_like(flat)))
    with pytest.raises(ValueError, match=">= 32"):
        net(torch.rand(1, 1, 16, 64))
    if kind == "resnext50":
        grouped = net.layer1[0].body[2][0]
        assert grouped.groups == 32 and net.head.in_features == 16 * 8 * 4


def test_resnet34_at_width_64_has_the_papers_size() -> None:
    net = Regressor(RegressorConfig(kind="resnet34", width=64), outputs=2)
    count = sum(p.numel() for p in net.parameters())
    # torchvision's ResNet-34 has 21.80 M parameters with a 3-channel stem and 1000 outputs;
    # ours has a 1-channel stem (-6272) and 2 outputs (-511,974).
    assert count == 21_797_672 - 6272 - (512 * 998 + 998)


def test_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(1)
    cfg = RegressorConfig(width=8)
    plain = build_regressor(cfg, 2)
    ckpt = build_regressor(cfg, 2, checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.rand(4, 1, 32, 32)
    for net in (plain, ckpt):
        net(x).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_method_refuses_samples_without_psf_model_or_of_the_wrong_shape() -> None:
    cfg = load_config(ExperimentConfig, REPO / "configs" / "psfnet_train_g1.yaml", []).method
    record = PSFModel("gaussian1", PSFOptics()).record()
    with pytest.raises(ConfigError, match="names its PSF model"):
        PSFRegression(cfg, DataInfo(2, 1, (0.3, 0.3), patch_shape=(64, 64)), checkpointing=False)
    info = DataInfo(2, 1, (0.3, 0.3), psf_model=record, patch_shape=(64, 48))
    with pytest.raises(ConfigError, match="square 2D"):
        PSFRegression(cfg, info, checkpointing=False)


def test_small_network_learns_gaussian1_widths(tmp_path: Path) -> None:
    from hpcdeconv.training.engine import train

    write_toy_store(tmp_path / "g1.zarr")
    cfg = load_config(
        ExperimentConfig,
        REPO / "configs" / "psfnet_train_g1.yaml",
        [
            f"data.path={tmp_path / 'g1.zarr'}",
            f"output={tmp_path / 'run'}",
            "method.network.width=8",
            "train.steps=300",
            "train.val_every=300",
            "train.ckpt_every=300",
            "train.device=cpu",
        ],
    )
    # About 15 s on 2 idle cores (the brief's budget: 40 s).
    summary = train(cfg, progress=False)
    # Validation: R² of the width on the 170 validation samples (independent of training).
    assert summary.validation["r2"] > 0.5
    assert summary.validation["r2_width"] == summary.validation["r2"]
    assert summary.validation["a0_accuracy"] > 0.9
    state = load_checkpoint(tmp_path / "run")
    assert state["artefact"]["kind"] == "psf_regressor"
    assert state["artefact"]["window"] == 32 and state["artefact"]["names"] == ["width"]

    loaded = load_regressor(tmp_path / "run")
    assert loaded.model.name == "gaussian1" and loaded.window == 32
    from hpcdeconv.data.samples import PSFSampleStore

    store = PSFSampleStore(tmp_path / "g1.zarr")
    test = store.read(store.split("test"))
    params, invalid = loaded.predict(torch.from_numpy(test.patches))
    assert params.shape == (len(test.patches), 1) and invalid.shape == (len(test.patches),)
    low, high = loaded.model.parameters[0].low, loaded.model.parameters[0].high
    assert float(params.min()) >= low and float(params.max()) <= high
    assert float(invalid.min()) >= 0.0 and float(invalid.max()) <= 1.0
    ok = test.valid[:, 0]
    r2 = 1 - np.sum((params[ok, 0].numpy() - test.params[ok, 0]) ** 2) / np.sum(
        (test.params[ok, 0] - test.params[ok, 0].mean()) ** 2
    )
    assert r2 > 0.5
    with pytest.raises(ValueError, match=r"\(B, 1, 32, 32\)"):
        loaded.predict(torch.rand(2, 1, 48, 48))


def test_loader_refuses_other_checkpoints(tmp_path: Path) -> None:
    save_checkpoint(
        tmp_path,
        1,
        {"format": 2, "config": {}, "step": 1, "artefact": {"kind": "image_to_image"}},
    )
    with pytest.raises(InputError, match="not a PSF-parameter regressor"):
        load_regressor(tmp_path)
