"""The ``best`` checkpoint: pointer, pruning, resolution, selection and loading for inference."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcdeconv.config import ExperimentConfig, load_config
from hpcdeconv.errors import ConfigError, InputError
from hpcdeconv.inference.model import load_model
from hpcdeconv.inference.predict import predict_volume
from hpcdeconv.training.checkpoint import (
    BEST,
    CKPT_DIR,
    best_checkpoint,
    choose_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    mark_best,
    prune_unreferenced,
    read_best,
    resolve_checkpoint,
    save_checkpoint,
)
from hpcdeconv.training.engine import train
from hpcdeconv.training.selection import BestTracker, best_tracker
from tests.conftest import TINY_TRAINING

STEPS = 4


@pytest.fixture(scope="module")
def trained(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 4-step supervised run with a checkpoint after every step (all kept).

    No ``best`` of its own (``best_metric=none``): the pointer tests below write theirs.
    """
    run = tmp_path_factory.mktemp("best") / "run"
    cfg = load_config(
        ExperimentConfig,
        None,
        [
            *TINY_TRAINING,
            f"data.path={tiny_dataset}",
            f"output={run}",
            "method.name=supervised",
            f"train.steps={STEPS}",
            "train.ckpt_every=1",
            f"train.keep_checkpoints={STEPS}",
            "train.best_metric=none",
        ],
    )
    train(cfg, progress=False)
    return run


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    """A private copy of :func:`trained`, free to modify."""
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def names(run_dir: Path) -> list[str]:
    return [p.name for p in list_checkpoints(run_dir)]


def test_mark_best_writes_a_pointer_beside_latest(run: Path) -> None:
    assert best_checkpoint(run) is None and read_best(run) is None
    second = run / CKPT_DIR / "step_00000002.pt"
    record = mark_best(run, second, {"psnr": 27.3, "ssim": 0.91}, metric="psnr")
    assert record.step == 2 and record.path == second
    stored = json.loads((run / CKPT_DIR / BEST).read_text())
    assert stored == {
        "checkpoint": "step_00000002.pt",
        "step": 2,
        "metric": "psnr",
        "metrics": {"psnr": 27.3, "ssim": 0.91},
    }
    assert best_checkpoint(run) == second
    assert read_best(run).summary() == "step 2, psnr 27.30 dB, ssim 0.910"
    # ``latest`` is untouched: resuming continues from the newest state.
    assert latest_checkpoint(run).name == f"step_{STEPS:08d}.pt"
    assert not list((run / CKPT_DIR).glob(".*.tmp"))  # atomic: no temporary left


def test_mark_best_refuses_foreign_files_and_non_finite_metrics(run: Path, tmp_path: Path) -> None:
    first = run / CKPT_DIR / "step_00000001.pt"
    with pytest.raises(ValueError, match="non-finite"):
        mark_best(run, first, {"psnr": float("nan")})
    stray = tmp_path / "step_00000001.pt"
    shutil.copy(first, stray)
    with pytest.raises(ValueError, match="not a written checkpoint"):
        mark_best(run, stray, {"psnr": 20.0})
    with pytest.raises(ValueError, match="not a written checkpoint"):
        mark_best(run, run / CKPT_DIR / "step_00000099.pt", {"psnr": 20.0})
    with pytest.raises(ValueError, match="'ssim' is not among"):
        mark_best(run, first, {"psnr": 20.0}, metric="ssim")
    assert best_checkpoint(run) is None


def test_pruning_never_deletes_the_best_checkpoint(run: Path) -> None:
    state = load_checkpoint(run)
    mark_best(run, run / CKPT_DIR / "step_00000002.pt", {"psnr": 25.0}, metric="psnr")
    for step in (5, 6, 7):
        save_checkpoint(run, step, state, keep=2)
    assert names(run) == ["step_00000002.pt", "step_00000006.pt", "step_00000007.pt"]
    assert best_checkpoint(run).name == "step_00000002.pt"
    # A new best moves the pointer in the same save; the old best goes at the next pruning.
    save_checkpoint(run, 8, state, keep=2, best={"psnr": 26.0, "ssim": 0.5}, metric="psnr")
    assert names(run) == ["step_00000007.pt", "step_00000008.pt"]
    assert read_best(run).step == 8 and read_best(run).metrics["psnr"] == 26.0
    save_checkpoint(run, 9, state, keep=1)
    assert names(run) == ["step_00000008.pt", "step_00000009.pt"]
    assert latest_checkpoint(run).name == "step_00000009.pt"


def test_deepspeed_shards_of_the_best_checkpoint_survive_pruning(run: Path) -> None:
    """Shard directories are pruned by what list_checkpoints lists: the best is listed."""
    state = load_checkpoint(run)
    shard_root = run / CKPT_DIR / "deepspeed"
    mark_best(run, run / CKPT_DIR / "step_00000001.pt", {"psnr": 25.0}, metric="psnr")
    for step in range(5, 8):
        tag = f"step_{step:08d}"
        (shard_root / tag / "G").mkdir(parents=True)
        prune_unreferenced(run, shard_root, keep=tag)
        save_checkpoint(run, step, state, keep=1)
    for step in (1, 2, 3, 4):
        (shard_root / f"step_{step:08d}").mkdir(exist_ok=True)
    prune_unreferenced(run, shard_root, keep="step_00000008")
    assert sorted(p.name for p in shard_root.iterdir()) == ["step_00000001", "step_00000007"]


def test_run_directory_resolves_to_best_and_says_so(
    run: Path, caplog: pytest.LogCaptureFixture
) -> None:
    latest = choose_checkpoint(run)
    assert latest.kind == "latest" and latest.step == STEPS and latest.best is None
    assert latest.describe() == f"latest checkpoint (step {STEPS}) {latest.path}"
    second = run / CKPT_DIR / "step_00000002.pt"
    mark_best(run, second, {"psnr": 27.3, "ssim": 0.91}, metric="psnr")
    for where in (run, run / CKPT_DIR):
        choice = choose_checkpoint(where)
        assert (choice.kind, choice.path, choice.step) == ("best", second, 2)
    assert choice.describe() == f"best checkpoint (step 2, psnr 27.30 dB, ssim 0.910) {second}"
    with caplog.at_level(logging.INFO, logger="hpcdeconv.training.checkpoint"):
        assert resolve_checkpoint(run) == second
    assert "using best checkpoint (step 2, psnr 27.30 dB" in caplog.text
    # Resuming (and load_checkpoint of a run directory) keeps taking ``latest``.
    assert choose_checkpoint(run, prefer="latest").path == latest.path
    assert load_checkpoint(run)["step"] == STEPS
    # A file given explicitly is used as given, and recognised as the best when it is.
    assert choose_checkpoint(second).describe().startswith("checkpoint (the run's best) (step 2")
    first = choose_checkpoint(run / CKPT_DIR / "step_00000001.pt")
    assert (first.kind, first.step, first.best) == ("file", 1, None)


def test_dangling_best_pointer_falls_back_to_latest(
    run: Path, caplog: pytest.LogCaptureFixture
) -> None:
    second = run / CKPT_DIR / "step_00000002.pt"
    mark_best(run, second, {"psnr": 27.3}, metric="psnr")
    second.unlink()
    with caplog.at_level(logging.WARNING):
        choice = choose_checkpoint(run)
    assert choice.kind == "latest" and choice.step == STEPS
    assert "does not exist" in caplog.text
    (run / CKPT_DIR / BEST).write_text("{not json")
    assert choose_checkpoint(run).kind == "latest"
    with pytest.raises(InputError, match="no checkpoint found"):
        choose_checkpoint(run.parent / "no" / "run")


def test_load_model_uses_the_best_checkpoint_and_logs_it(
    run: Path, tiny_dataset: Path, caplog: pytest.LogCaptureFixture
) -> None:
    second = run / CKPT_DIR / "step_00000002.pt"
    mark_best(run, second, {"psnr": 27.3, "ssim": 0.91}, metric="psnr")
    with caplog.at_level(logging.INFO, logger="hpcdeconv.inference.model"):
        model = load_model(run)
    assert model.checkpoint == second and model.step == 2 and model.weights == "raw"
    assert model.choice.kind == "best"
    assert "using best checkpoint (step 2, psnr 27.30 dB, ssim 0.910)" in caplog.text
    assert "trained (non-EMA) weights" in caplog.text
    # The network is the best checkpoint's, not the latest's.
    head = load_checkpoint(second)["deblur"]["head.weight"]
    assert torch.equal(model.net.state_dict()["head.weight"], head)
    latest = load_model(latest_checkpoint(run))
    x = np.random.default_rng(0).random((16, 32, 32)).astype(np.float32)
    kw = {"tile": (16, 32, 32), "overlap": 0, "size_multiple": model.size_multiple}
    assert not np.array_equal(
        predict_volume(model.net, x, **kw), predict_volume(latest.net, x, **kw)
    )


# --------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------


def test_best_tracker_keeps_the_highest_score() -> None:
    tracker = BestTracker("psnr")
    swings = [(100, 25.7), (200, 27.3), (300, 26.7), (400, 27.3), (500, 27.4)]
    improved = [tracker.update(step, {"psnr": v, "ssim": 0.5}) for step, v in swings]
    assert improved == [True, True, False, False, True]  # a tie keeps the earlier step
    assert (tracker.step, tracker.value) == (500, 27.4)
    assert not tracker.update(600, {"psnr": float("nan"), "ssim": 0.9})
    assert not tracker.update(700, {})  # nothing evaluated (e.g. not rank 0)
    with pytest.raises(KeyError, match="not 'psnr'"):
        tracker.update(800, {"ssim": 0.9})
    by_ssim = BestTracker("ssim")
    assert [
        by_ssim.update(s, {"psnr": 30 - i, "ssim": v})
        for i, (s, v) in enumerate([(1, 0.64), (2, 0.91), (3, 0.58)])
    ] == [True, True, False]
    assert by_ssim.step == 2


def test_best_tracker_none_never_improves_and_resumes_exactly() -> None:
    none = BestTracker("none")
    assert not none.enabled and not none.update(1, {"psnr": 99.0})
    a = BestTracker("psnr")
    a.update(100, {"psnr": 27.3})
    state = json.loads(json.dumps(a.state_dict()))  # plain numbers and strings
    b = BestTracker("psnr")
    b.load_state_dict(state)
    assert (b.step, b.value) == (100, 27.3)
    assert not b.update(200, {"psnr": 27.0}) and b.update(300, {"psnr": 27.5})
    c = BestTracker("ssim")  # another metric: the old record cannot be compared
    c.load_state_dict(state)
    assert c.value is None and c.update(400, {"ssim": 0.1})


def test_a_lower_is_better_metric_keeps_the_lowest_score() -> None:
    tracker = BestTracker("loss", higher_is_better=False)
    swings = [(1, 0.5), (2, 0.3), (3, 0.4), (4, 0.3), (5, 0.1)]
    assert [tracker.update(s, {"loss": v}) for s, v in swings] == [True, True, False, False, True]
    assert (tracker.step, tracker.value) == (5, 0.1)


def test_best_metric_is_one_the_method_reports(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert load_config(ExperimentConfig, None, []).train.best_metric == "psnr"
    assert load_config(ExperimentConfig, None, ["train.best_metric=none"]).train.best_metric == (
        "none"
    )
    tracker = best_tracker("ssim", {"psnr": True, "ssim": True}, "supervised")
    assert (tracker.metric, tracker.higher_is_better) == ("ssim", True)
    assert not best_tracker("none", {"r2": True}, "psf_regression").enabled
    assert best_tracker("mae", {"mae": False}, "m").higher_is_better is False
    # Refused at build time with one line, before the run directory exists.
    from hpcdeconv.cli import main

    run = tmp_path / "run"
    sets = [*TINY_TRAINING, f"data.path={tiny_dataset}", "train.best_metric=r2"]
    argv = ["train", "--output", str(run), *[a for item in sets for a in ("--set", item)]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "hpcdeconv train: error: train.best_metric 'r2' is not a validation metric of method "
        "blind_cyclegan (one of psnr, ssim, none)"
    ]
    assert not run.exists()
    with pytest.raises(ConfigError, match="best_metric"):
        best_tracker("loss", {"psnr": True}, "supervised")
