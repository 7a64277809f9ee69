"""The trainer keeps the best checkpoint by validation and an EMA of G_Θ, both resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hpcdeconv.config import ExperimentConfig, load_config
from hpcdeconv.errors import ConfigError
from hpcdeconv.inference.model import load_model
from hpcdeconv.training.checkpoint import CKPT_DIR, latest_checkpoint, load_checkpoint
from hpcdeconv.training.engine import train
from hpcdeconv.training.runlog import read_metrics
from tests.conftest import TINY_TRAINING


def config(data: Path, run: Path, *extra: str) -> ExperimentConfig:
    return load_config(
        ExperimentConfig,
        None,
        [
            *TINY_TRAINING,
            f"data.path={data}",
            f"output={run}",
            "method.name=supervised",
            "method.generator.final_activation=none",
            "optim.lr=3e-3",
            "train.val_every=1",
            "train.ckpt_every=1000",
            "train.keep_checkpoints=1",
            *extra,
        ],
    )


def test_best_checkpoint_is_the_highest_validation_psnr_and_survives_pruning(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    summary = train(config(tiny_dataset, run, "train.steps=6"), progress=False)
    scores = {r["step"]: r["psnr"] for r in read_metrics(run, "val")}
    assert sorted(scores) == list(range(1, 7))
    top = max(scores, key=lambda s: (scores[s], -s))
    pointer = json.loads((run / CKPT_DIR / "best").read_text())
    assert pointer["step"] == top
    assert pointer["metrics"]["psnr"] == pytest.approx(scores[top])
    best_file = run / CKPT_DIR / f"step_{top:08d}.pt"
    assert best_file.is_file() and latest_checkpoint(run).name == "step_00000006.pt"
    assert load_checkpoint(best_file)["step"] == top
    # Inference on the run directory takes the best checkpoint.
    model = load_model(run)
    assert model.checkpoint == best_file and model.step == top
    assert summary.validation["psnr"] == pytest.approx(scores[6])


def test_ema_is_validated_exported_and_resumed_exactly(tiny_dataset: Path, tmp_path: Path) -> None:
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    ema = ("train.ema_decay=0.5", "train.deterministic=true")
    train(config(tiny_dataset, whole, "train.steps=4", *ema), progress=False)
    train(config(tiny_dataset, parts, "train.steps=2", *ema), progress=False)
    train(config(tiny_dataset, parts, "train.steps=4", *ema), resume=True, progress=False)
    a, b = (
        load_checkpoint(whole / CKPT_DIR / "step_00000004.pt"),
        load_checkpoint(parts / CKPT_DIR / "step_00000004.pt"),
    )
    assert a["ema"]["updates"] == b["ema"]["updates"] == 4
    for key in a["deblur_ema"]:
        torch.testing.assert_close(a["deblur_ema"][key], b["deblur_ema"][key], rtol=0, atol=0)
    # The average differs from the last weights (it remembers earlier steps).
    assert any(
        not torch.equal(a["deblur_ema"][k], a["deblur"][k])
        for k in a["deblur"]
        if a["deblur"][k].is_floating_point()
    )
    raw = {r["step"]: r["psnr"] for r in read_metrics(whole, "val")}
    averaged = {r["step"]: r["psnr"] for r in read_metrics(whole, "val_ema")}
    assert sorted(raw) == sorted(averaged) == [1, 2, 3, 4]
    # The best pointer scores the weights inference uses by default: the average.
    pointer = json.loads((whole / CKPT_DIR / "best").read_text())
    assert pointer["metrics"]["psnr"] == pytest.approx(max(averaged.values()))
    assert load_model(whole).weights == "ema" and load_model(whole, weights="raw").weights == "raw"


def test_ema_with_zero_3_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ZeRO stage 3"):
        load_config(
            ExperimentConfig,
            None,
            [
                "train.ema_decay=0.99",
                "strategy.name=deepspeed",
                "strategy.deepspeed.zero_stage=3",
            ],
        )


def test_a_changed_learning_rate_is_applied_on_resume_and_recorded(
    tiny_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    train(config(tiny_dataset, run, "train.steps=2", "optim.lr=1e-3"), progress=False)
    with caplog.at_level("WARNING"):
        train(
            config(tiny_dataset, run, "train.steps=4", "optim.lr=5e-4"), resume=True, progress=False
        )
    assert "resume: optim.lr 0.001 -> 0.0005 (applied" in caplog.text
    rates = {r["step"]: r["lr"] for r in read_metrics(run, "train")}
    assert rates[2] == pytest.approx(1e-3) and rates[3] == rates[4] == pytest.approx(5e-4)
    assert load_checkpoint(run)["config"]["optim"]["lr"] == pytest.approx(5e-4)
    assert "lr: 0.0005" in (run / "config.yaml").read_text()
    # A batch size shaped the saved state: refused, listing the key, nothing changed.
    before = latest_checkpoint(run)
    with pytest.raises(ConfigError, match=r"changed data\.batch_size 1 -> 2"):
        train(
            config(tiny_dataset, run, "train.steps=6", "data.batch_size=2"),
            resume=True,
            progress=False,
        )
    assert latest_checkpoint(run) == before


def test_resume_without_config_continues_the_runs_own_configuration(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    from hpcdeconv.cli import main

    run = tmp_path / "run"
    sets = [a for item in [*TINY_TRAINING, f"data.path={tiny_dataset}"] for a in ("--set", item)]
    sets += ["--set", "method.name=supervised", "--set", "train.steps=2"]
    assert main(["train", "--output", str(run), *sets]) == 0
    # Only the budget is given: everything else comes from RUN/config.yaml, not the defaults.
    argv = ["train", "--output", str(run), "--resume", "--set", "train.steps=3"]
    assert main(argv) == 0
    state = load_checkpoint(run)
    assert state["step"] == 3 and state["config"]["data"]["patch"] == [16, 16, 16]
    assert state["config"]["method"]["name"] == "supervised"
