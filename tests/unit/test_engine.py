"""The training engine: outputs, bad input, non-finite losses, checkpoints, inference model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hpcdeconv.config import ExperimentConfig, ImageDomainsData, PairedImagesData, load_config
from hpcdeconv.data.datasets import PairedPatches, UnpairedPatches
from hpcdeconv.data.zarr_io import create_dataset, set_split, write_volume
from hpcdeconv.errors import ConfigError, InputError, OutputExistsError
from hpcdeconv.inference.model import load_model
from hpcdeconv.inference.predict import predict_volume
from hpcdeconv.training.agreement import TrainingDivergedError
from hpcdeconv.training.checkpoint import latest_checkpoint, load_checkpoint
from hpcdeconv.training.engine import Trainer, default_strategy, train
from hpcdeconv.training.feed import TrainingFeed, make_feed
from hpcdeconv.training.runlog import read_metrics
from tests.conftest import TINY_TRAINING


def config(data: Path, run: Path, *extra: str) -> ExperimentConfig:
    overrides = [*TINY_TRAINING, f"data.path={data}", f"output={run}", *extra]
    return load_config(ExperimentConfig, None, overrides)


def test_blind_run_writes_everything(tiny_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    summary = train(
        config(
            tiny_dataset, run, "train.steps=4", "method.kernel.size=[7, 7, 7]", "train.val_every=4"
        ),
        progress=False,
    )
    assert summary.steps == 4
    assert (run / "config.yaml").is_file()
    assert [r["step"] for r in read_metrics(run, "train")] == [1, 2, 3, 4]
    assert {"psnr", "ssim", "psnr_input", "ssim_input"} <= set(summary.validation)
    assert latest_checkpoint(run).name == "step_00000004.pt"
    assert len(list((run / "checkpoints").glob("step_*.pt"))) == 2  # keep_checkpoints
    for name in ("psf_learned_raw.tif", "psf_learned_smoothed.npy", "psf_learned.png"):
        assert (run / "psf" / name).is_file()
    assert any((run / "tensorboard").iterdir())
    smoothed = np.load(run / "psf" / "psf_learned_smoothed.npy")
    assert smoothed.shape == (7, 7, 7) and abs(float(smoothed.sum()) - 1) < 1e-5


@pytest.mark.parametrize("method", ["nonblind_cyclegan", "cyclegan", "supervised"])
def test_every_method_trains(tiny_dataset: Path, tmp_path: Path, method: str) -> None:
    extra = [f"method.name={method}", "train.steps=2"]
    if method == "nonblind_cyclegan":
        extra.append("method.kernel.size=[7, 7, 7]")
    summary = train(config(tiny_dataset, tmp_path / method, *extra), progress=False)
    assert all(np.isfinite(v) for v in summary.losses.values())
    state = load_checkpoint(tmp_path / method)
    assert state["method"] == method and state["step"] == 2


def test_nonblind_uses_the_dataset_psf_and_keeps_it_fixed(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    cfg = config(
        tiny_dataset,
        tmp_path / "nb",
        "method.name=nonblind_cyclegan",
        "method.kernel.size=[7, 7, 7]",
        "train.steps=2",
    )
    train(cfg, progress=False)
    state = load_checkpoint(tmp_path / "nb")
    kernel = [v for k, v in state["groups"]["G"]["module"].items() if k.startswith("blur.")]
    from hpcdeconv.data.zarr_io import read_volume

    truth = np.asarray(read_volume(tiny_dataset, "psf")[0])
    assert len(kernel) == 1
    np.testing.assert_allclose(kernel[0].numpy(), truth, rtol=1e-6, atol=1e-8)
    assert "D" in state["groups"] and list(state["method_state"]["pools"]) == ["x"]


def test_bf16_and_gradient_checkpointing_paths_run(tiny_dataset: Path, tmp_path: Path) -> None:
    """A real bf16 step computes G_Θ's convolutions in bf16 and recomputes them in backward."""
    cfg = config(
        tiny_dataset,
        tmp_path / "bf16",
        "train.steps=1",
        "train.precision=bf16",
        "train.grad_checkpointing=true",
        "method.kernel.size=[7, 7, 7]",
    )
    trainer = Trainer(cfg, default_strategy(cfg), progress=False)
    convs = [m for m in trainer.artefact.network.modules() if isinstance(m, nn.Conv3d)]
    dtypes: list[torch.dtype] = []

    def record(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        if module.training:  # the training step, not validation (eval mode)
            dtypes.append(output.dtype)

    hooks = [conv.register_forward_hook(record) for conv in convs]
    try:
        summary = trainer.fit()
    finally:
        for hook in hooks:
            hook.remove()
    assert all(np.isfinite(v) for v in summary.losses.values())
    assert convs and set(dtypes) == {torch.bfloat16}
    # G_Θ runs twice per step (G(y) and G(blur(x))); checkpointing runs it again in backward.
    assert len(dtypes) > 2 * len(convs)


def test_checkpoint_records_the_artefact_and_older_checkpoints_resume(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    extra = ("method.name=supervised", "train.ema_decay=0.5")
    train(config(tiny_dataset, run, "train.steps=2", *extra), progress=False)
    path = latest_checkpoint(run)
    state = load_checkpoint(path)
    assert (state["artefact"]["kind"], state["artefact"]["key"]) == ("image_to_image", "deblur")
    assert set(state["deblur"]) == set(state["deblur_ema"]) == set(state["groups"]["G"]["module"])
    # A checkpoint written before the artefact record resumes as it always did.
    del state["artefact"]
    torch.save(state, path)
    train(config(tiny_dataset, run, "train.steps=3", *extra), resume=True, progress=False)
    assert load_checkpoint(run)["step"] == 3
    # One of another artefact does not.
    path = latest_checkpoint(run)
    state = load_checkpoint(path)
    state["artefact"] = {"kind": "psf_parameters", "key": "regressor"}
    torch.save(state, path)
    with pytest.raises(InputError, match="holds a psf_parameters artefact under 'regressor'"):
        train(config(tiny_dataset, run, "train.steps=4", *extra), resume=True, progress=False)


def test_the_feed_follows_the_data_kind(tiny_dataset: Path) -> None:
    patch = (16, 16, 16)
    unpaired = make_feed(ImageDomainsData(path=tiny_dataset, patch=patch), seed=0)
    paired = make_feed(PairedImagesData(path=tiny_dataset, patch=patch), seed=0)
    assert isinstance(unpaired, TrainingFeed) and isinstance(paired, TrainingFeed)
    assert isinstance(unpaired.dataset(0, 1), UnpairedPatches)
    assert isinstance(paired.dataset(0, 1), PairedPatches)
    info = paired.info()
    assert (info.spatial_dims, info.channels, len(info.voxel_size)) == (3, 1, 3)
    batch = next(paired.loader(start_step=0))
    assert batch["x"].shape == batch["y"].shape == (1, 1, *patch)
    validation = paired.validation((11, 16, 16))
    assert validation is not None and [v.vid for v in validation.volumes] == ["val000"]
    assert validation.volumes[0].sharp.shape == (11, 16, 16)
    none = make_feed(ImageDomainsData(path=tiny_dataset, patch=patch, val_volumes=0), seed=0)
    assert none.validation() is None
    with pytest.raises(InputError, match=r"data\.patch has 2 axes but the stored images have 3"):
        make_feed(ImageDomainsData(path=tiny_dataset, patch=(16, 16)), seed=0)


def test_fp16_on_cpu_is_refused(tiny_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        train(config(tiny_dataset, tmp_path / "r", "train.precision=fp16"), progress=False)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    run = tmp_path / "nan"
    # An absurd learning rate on an unbounded generator overflows within a few steps.
    cfg = config(
        tiny_dataset,
        run,
        "method.name=supervised",
        "train.steps=40",
        "method.generator.final_activation=none",
        "optim.lr=1.0e+30",
        "train.ckpt_every=1",
    )
    with pytest.raises(TrainingDivergedError, match="non-finite loss at step") as info:
        train(cfg, progress=False)
    last = latest_checkpoint(run)
    assert last is not None and str(last) in str(info.value)
    state = load_checkpoint(last)
    assert all(torch.isfinite(v).all() for v in state["deblur"].values())


def test_run_dir_protection_and_resume_errors(tiny_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(InputError, match="no checkpoint"):
        train(config(tiny_dataset, run, "train.steps=2"), resume=True, progress=False)
    train(
        config(tiny_dataset, run, "train.steps=2", "method.kernel.size=[7, 7, 7]"), progress=False
    )
    with pytest.raises(OutputExistsError, match="--resume"):
        train(config(tiny_dataset, run, "train.steps=2"), progress=False)
    with pytest.raises(InputError, match="from method 'blind_cyclegan'"):
        train(
            config(tiny_dataset, run, "train.steps=4", "method.name=cyclegan"),
            resume=True,
            progress=False,
        )
    with pytest.raises(
        ConfigError, match=r"changed method\.kernel\.size \[7, 7, 7\] -> \[5, 5, 5\]"
    ):
        train(
            config(tiny_dataset, run, "train.steps=4", "method.kernel.size=[5, 5, 5]"),
            resume=True,
            progress=False,
        )


def test_psf_file_of_the_wrong_size(tiny_dataset: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "psf.npy", np.ones((5, 5, 5), np.float32) / 125)
    cfg = config(
        tiny_dataset,
        tmp_path / "r",
        "method.kernel.init=file",
        f"method.kernel.file={tmp_path / 'psf.npy'}",
        "method.kernel.size=[7, 7, 7]",
    )
    with pytest.raises(InputError, match="size"):
        train(cfg, progress=False)


def test_patch_larger_than_volume(tiny_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="larger than volume"):
        train(config(tiny_dataset, tmp_path / "r", "data.patch=[32, 32, 32]"), progress=False)


def _dataset(path: Path, domains: dict[str, list[str]], nan: bool = False) -> Path:
    group = create_dataset(path)
    rng = np.random.default_rng(0)
    ids = sorted({i for v in domains.values() for i in v})
    for domain, vids in domains.items():
        for vid in vids:
            data = rng.random((16, 32, 32)).astype(np.float32)
            if nan:
                data[...] = np.nan
            write_volume(group, f"{domain}/{vid}", data, (0.1, 0.1, 0.1))
    set_split(group, {"train": ids, "val": [], "test": []})
    return path


def test_supervised_needs_pairs(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "u.zarr", {"sharp": ["a", "b"], "blurred": ["c", "d"]})
    with pytest.raises(InputError, match="both a sharp and a blurred"):
        train(config(data, tmp_path / "r", "method.name=supervised"), progress=False)


def test_cyclegan_needs_both_domains(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "b.zarr", {"blurred": ["c", "d"]})
    with pytest.raises(InputError, match="needs both domains"):
        train(config(data, tmp_path / "r"), progress=False)


def test_nan_voxels_are_reported(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "n.zarr", {"sharp": ["a", "b"], "blurred": ["a", "b"]}, nan=True)
    with pytest.raises(InputError, match="NaN or Inf"):
        train(config(data, tmp_path / "r", "method.name=supervised"), progress=False)


def test_checkpoint_generator_tiles_exactly_when_local(tiny_dataset: Path, tmp_path: Path) -> None:
    """A norm-free U-Net from a checkpoint: constant-blend tiling equals whole-volume output."""
    run = tmp_path / "local"
    train(
        config(
            tiny_dataset,
            run,
            "method.name=supervised",
            "train.steps=2",
            "method.generator.norm=none",
            "method.generator.depth=1",
            # PyTorch's head: the data-mean start's small head makes a too-small halo's
            # error after 2 steps smaller than the 1e-4 asserted below.
            "method.generator.head_init=default",
        ),
        progress=False,
    )
    model = load_model(run)
    radius = model.receptive_field // 2
    rng = np.random.default_rng(3)
    volume = rng.random((24, 40, 56)).astype(np.float32)
    tiled = predict_volume(
        model.net,
        volume,
        tile=(24, 24, 24),
        overlap=2 * radius,
        blend="constant",
        size_multiple=model.size_multiple,
    )
    with torch.inference_mode():
        whole = model.net(torch.from_numpy(volume)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(tiled, whole, atol=2e-6)
    too_small = predict_volume(
        model.net,
        volume,
        tile=(24, 24, 24),
        overlap=2,
        blend="constant",
        size_multiple=model.size_multiple,
    )
    assert np.abs(too_small - whole).max() > 1e-4


def test_load_model_rejects_non_checkpoints(tmp_path: Path) -> None:
    bogus = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(2)}, bogus)
    with pytest.raises(InputError, match="not an hpcdeconv checkpoint"):
        load_model(bogus)
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a readable"):
        load_model(tmp_path / "junk.pt")
    with pytest.raises(InputError, match="no checkpoint"):
        load_model(tmp_path / "empty_dir_that_does_not_exist")


def test_predict_command_writes_output_metrics_and_figure(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hpcdeconv.cli import main

    run = tmp_path / "run"
    train(config(tiny_dataset, run, "method.name=supervised", "train.steps=1"), progress=False)
    source = f"{tiny_dataset}/blurred/test000"
    out, png = tmp_path / "out.tif", tmp_path / "out.png"
    argv = ["predict", "--checkpoint", str(run), source, "--output", str(out)]
    assert main([*argv, "--truth", f"{tiny_dataset}/sharp/test000", "--png", str(png)]) == 0
    stdout = capsys.readouterr().out
    assert "PSNR input" in stdout and "SSIM input" in stdout
    import tifffile

    assert tifffile.imread(out).shape == (16, 32, 32)
    assert png.stat().st_size > 10_000
    assert main(argv) == 2  # the output exists
    assert "--overwrite" in capsys.readouterr().err
    same = ["predict", "--checkpoint", str(run), str(out), "--output", str(out), "--overwrite"]
    assert main(same) == 2
    assert "is the input" in capsys.readouterr().err
