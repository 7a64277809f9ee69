"""Frozen loss networks: on the device, never optimised, never checkpointed.

A small real method defined here (a 3D generator trained with MSE plus a feature loss
through a frozen convolutional network, validated by MSE, lower is better) is trained by
the real Trainer for a few steps.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpcdeconv.config import ExperimentConfig, load_config
from hpcdeconv.methods.base import Artefact, DataKind, Method, ValidationSettings
from hpcdeconv.training.checkpoint import CKPT_DIR, latest_checkpoint, load_checkpoint
from hpcdeconv.training.engine import Trainer, default_strategy
from hpcdeconv.training.runlog import read_metrics
from tests.conftest import TINY_TRAINING

#: The frozen network's weight shape, found nowhere else in the method.
FEATURES = (5, 1, 3, 3, 3)


class FeatureLossMethod(Method):
    """G_Θ trained on pairs with ‖x − G(y)‖² + ‖φ(G(y)) − φ(x)‖₁, φ a frozen network."""

    data_kind: ClassVar[DataKind] = "paired"
    metrics: ClassVar[Mapping[str, bool]] = {"mse": False}

    def __init__(self, share: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.generator = nn.Sequential(
            nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 1, 3, padding=1)
        )
        self.features = nn.Sequential(nn.Conv3d(1, FEATURES[0], 3, padding=1), nn.ReLU())
        # A method that wrongly puts the loss network inside its trained group.
        self.share = share

    def groups(self) -> dict[str, nn.Module]:
        if self.share:
            return {"G": nn.ModuleList([self.generator, self.features])}
        return {"G": self.generator}

    def loss_networks(self) -> dict[str, nn.Module]:
        return {"features": self.features}

    def step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = batch["x"], batch["y"]
        G = self.t["G"]
        x_hat = G(y)
        mse = F.mse_loss(x_hat.float(), x.float())
        perceptual = F.l1_loss(self.features(x_hat).float(), self.features(x).float())
        G.backward(mse + perceptual)
        G.step()
        return {"mse": mse.detach(), "perceptual": perceptual.detach()}

    def artefact(self) -> Artefact:
        return Artefact("image_to_image", "deblur", self.generator, {})

    def validate(
        self, network: nn.Module, data: Any, device: torch.device, settings: ValidationSettings
    ) -> dict[str, float]:
        errors = []
        for volume in data.volumes:
            blurred = torch.from_numpy(volume.blurred)[None, None].to(device)
            sharp = torch.from_numpy(volume.sharp)[None, None]
            errors.append(float(F.mse_loss(network(blurred).cpu(), sharp)))
        return {"mse": float(np.mean(errors))}


def _config(data: Path, run: Path) -> ExperimentConfig:
    return load_config(
        ExperimentConfig,
        None,
        [
            *TINY_TRAINING,
            f"data.path={data}",
            f"output={run}",
            "method.name=supervised",
            "optim.lr=1e-2",
            "train.steps=4",
            "train.val_every=1",
            "train.ckpt_every=1000",
            "train.keep_checkpoints=1",
            "train.best_metric=mse",
        ],
    )


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, Mapping):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, list | tuple):
        for value in tree:
            yield from _tensors(value)


def test_loss_network_is_frozen_on_the_device_and_not_checkpointed(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    cfg = _config(tiny_dataset, run)
    method = FeatureLossMethod()
    before = {k: v.clone() for k, v in method.features.state_dict().items()}
    assert method.features.training
    trainer = Trainer(cfg, default_strategy(cfg), progress=False, method=method)
    features = list(method.features.parameters())
    assert not method.features.training
    assert all(not p.requires_grad and p.device == trainer.strategy.device for p in features)
    optimised = {id(p) for g in trainer.trainables["G"].optimizer.param_groups for p in g["params"]}
    assert optimised and not optimised & {id(p) for p in features}
    start = [p.detach().clone() for p in method.generator.parameters()]
    summary = trainer.fit()

    assert summary.losses["perceptual"] > 0
    assert all(p.grad is None for p in features)
    for key, value in method.features.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert any(
        not torch.equal(a, b) for a, b in zip(start, method.generator.parameters(), strict=True)
    )
    state = load_checkpoint(latest_checkpoint(run))
    assert state["artefact"] == {"kind": "image_to_image", "key": "deblur"}
    assert set(state["groups"]) == {"G"}
    assert not any(tuple(t.shape) == FEATURES for t in _tensors(state))
    for key, value in method.generator.state_dict().items():
        assert torch.equal(state["deblur"][key], value)
    # The best checkpoint is the lowest validation MSE (the method's direction).
    scores = {r["step"]: r["mse"] for r in read_metrics(run, "val")}
    assert sorted(scores) == [1, 2, 3, 4] and len(set(scores.values())) > 1
    pointer = json.loads((run / CKPT_DIR / "best").read_text())
    assert pointer["step"] == min(scores, key=lambda s: (scores[s], s))
    assert pointer["metric"] == "mse"


def test_a_loss_network_inside_a_trained_group_is_refused(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    cfg = _config(tiny_dataset, run)
    with pytest.raises(ValueError, match="loss network 'features' shares parameters"):
        Trainer(cfg, default_strategy(cfg), progress=False, method=FeatureLossMethod(share=True))
    assert not run.exists()
