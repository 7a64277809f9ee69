"""Sizes the networks constrain are checked when the configuration is loaded (training) or
right after the checkpoint is read (predict, deconvolve): one error line, exit status 2, and
no folder or output left behind. Sizes that already work (tiles that inference pads) stay
accepted."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcdeconv.cli import main
from hpcdeconv.config import ExperimentConfig, load_config
from hpcdeconv.errors import ConfigError, InputError
from hpcdeconv.training.engine import train
from tests.conftest import TINY_TRAINING


def tiny(*extra: str) -> list[str]:
    """TINY_TRAINING (depth-2 U-Net, 2-layer 2-scale discriminator) plus ``extra``."""
    return [*TINY_TRAINING, *extra]


def as_flags(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def one_error_line(capsys: pytest.CaptureFixture[str], verb: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"hpcdeconv {verb}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-step supervised run with a depth-2 U-Net (size multiple 4)."""
    run = tmp_path_factory.mktemp("checkpoint") / "run"
    overrides = tiny(f"data.path={tiny_dataset}", f"output={run}", "method.name=supervised")
    train(load_config(ExperimentConfig, None, [*overrides, "train.steps=1"]), progress=False)
    return run


# --------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------


def test_patch_not_a_multiple_of_the_unet_is_refused_before_the_run_dir_exists(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The reported case: depth-2 U-Net, data.patch [14, 18, 18]."""
    run = tmp_path / "run"
    args = ["train", *as_flags(tiny(f"data.path={tiny_dataset}", "train.steps=1"))]
    args += ["--set", "method.name=supervised", "--output", str(run)]
    assert main([*args, "--set", "data.patch=[14, 18, 18]"]) == 2
    line = one_error_line(capsys, "train")
    assert "data.patch [14, 18, 18] must be a multiple of 4" in line
    assert "method.generator.depth=2" in line and "[16, 20, 20]" in line
    assert not run.exists()
    # The corrected command needs no --overwrite: nothing was left behind.
    assert main([*args, "--set", "data.patch=[16, 20, 20]"]) == 0
    assert (run / "config.yaml").is_file()


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["data.patch=[14, 18, 18]"], "data.patch [14, 18, 18] must be a multiple of 4"),
        (
            ["method.generator.depth=3", "data.patch=[20, 32, 32]"],
            "multiple of 8 along every axis (method.generator.depth=3",
        ),
        (
            ["method.name=cyclegan", "method.blur_generator.depth=3", "data.patch=[20, 32, 32]"],
            "(method.blur_generator.depth=3",
        ),
        (
            ["method.name=supervised", "data.patch=[4, 4, 4]"],
            "leaves one voxel at the bottleneck of method.generator",
        ),
        (
            ["data.patch=[8, 16, 16]", "method.discriminator.n_scales=3"],
            "too small for method.discriminator (n_layers=2, n_scales=3 reduce it 16x)",
        ),
        (["data.patch=[8, 8, 8]"], "every side must be >= 8 and one >= 16"),
        (["train.val_overlap=16"], "train.val_overlap 16 must be smaller than every side"),
        # Adam's float32 states overflow (1e39) or the run is meaningless (inf, nan).
        (["optim.lr=1e39"], "'optim.lr': Input should be less than"),
        (["optim.lr=inf"], "'optim.lr': Input should be a finite number"),
        (["optim.lr=nan"], "'optim.lr': Input should be a finite number"),
        (
            ["train.val_tile=[6, 32, 32]", "train.val_overlap=8"],
            "rounded up to multiples of 4: [8, 32, 32]",
        ),
    ],
)
def test_sizes_the_networks_cannot_take_are_config_errors(extra: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(ExperimentConfig, None, tiny(*extra))
    assert fragment in str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    "extra",
    [
        ["data.patch=[16, 20, 24]"],
        # The instance-norm bottleneck keeps two voxels; no discriminator without a GAN term.
        ["method.name=supervised", "data.patch=[4, 4, 8]"],
        ["method.name=supervised", "data.patch=[8, 8, 8]"],
        # Validation pads tiles to the U-Net's multiple: only the overlap must fit.
        ["train.val_tile=[6, 30, 30]", "train.val_overlap=7"],
        ["method.name=cyclegan", "method.blur_generator.depth=1", "data.patch=[16, 16, 16]"],
    ],
)
def test_sizes_that_work_are_accepted(extra: list[str]) -> None:
    load_config(ExperimentConfig, None, tiny(*extra))


def test_padded_validation_tiles_and_small_patches_really_train(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    """What the checks accept runs: a 1-step run with a [4, 4, 8] patch and validation
    tiles [6, 30, 30] (padded to [8, 32, 32]) with overlap 7."""
    overrides = tiny(f"data.path={tiny_dataset}", f"output={tmp_path / 'run'}")
    overrides += ["method.name=supervised", "data.patch=[4, 4, 8]", "train.steps=1"]
    overrides += ["train.val_tile=[6, 30, 30]", "train.val_overlap=7", "train.val_every=1"]
    summary = train(load_config(ExperimentConfig, None, overrides), progress=False)
    assert summary.steps == 1 and "psnr" in summary.validation


def test_patch_larger_than_the_volumes_leaves_no_run_dir(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    overrides = tiny(f"data.path={tiny_dataset}", f"output={run}", "data.patch=[32, 32, 32]")
    with pytest.raises(InputError, match="larger than volume"):
        train(load_config(ExperimentConfig, None, overrides), progress=False)
    assert not run.exists()


# --------------------------------------------------------------------------------------
# predict and deconvolve: the network comes from the checkpoint
# --------------------------------------------------------------------------------------


def test_predict_checks_the_tile_against_the_checkpoint_before_writing(
    run_dir: Path, tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.tif"
    argv = ["predict", "--checkpoint", str(run_dir), f"{tiny_dataset}/blurred/test000"]
    argv += ["--output", str(out), "--png", str(tmp_path / "out.png")]
    # Tile [6, 30, 30] is padded to the U-Net's multiple 4, i.e. [8, 32, 32]: overlap 8 cannot fit.
    assert main([*argv, "--set", "tile=[6, 30, 30]", "--set", "overlap=8"]) == 2
    assert "overlap 8 must lie in [0, 8)" in one_error_line(capsys, "predict")
    assert not out.exists() and not (tmp_path / "out.png").exists()
    # Overlap 7 fits the padded tile: accepted, and it runs.
    assert main([*argv, "--set", "tile=[6, 30, 30]", "--set", "overlap=7"]) == 0
    assert out.is_file()


def test_deconvolve_checks_the_tile_against_the_checkpoint_before_writing(
    run_dir: Path, tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.zarr"
    argv = ["deconvolve", "--checkpoint", str(run_dir), f"{tiny_dataset}/blurred/test000"]
    argv += ["--output", str(out), "--set", "tile=[6, 30, 30]", "--set", "overlap=8"]
    assert main(argv) == 2
    assert "overlap 8 must lie in [0, 8)" in one_error_line(capsys, "deconvolve")
    assert not out.exists()


# --------------------------------------------------------------------------------------
# spatial_dims: every shape of an experiment has len(data.patch) axes
# --------------------------------------------------------------------------------------


def test_3d_defaults_the_user_did_not_set_follow_2d_data() -> None:
    cfg = load_config(ExperimentConfig, None, ["data.patch=[64, 64]"])
    assert cfg.train.val_tile == (64, 64)
    assert cfg.method.kernel.size == (31, 31)
    assert cfg.train.val_crop is None
    paired = load_config(ExperimentConfig, None, ["data.patch=[64, 64]", "method.name=supervised"])
    assert paired.train.val_tile == (64, 64)
    # Models built in code: only fields outside model_fields_set are adapted.
    from hpcdeconv.config import BlindCycleGANConfig, TrainConfig

    built = ExperimentConfig(
        data={"patch": [64, 64]}, train=TrainConfig(steps=3), method=BlindCycleGANConfig()
    )
    assert built.train.val_tile == (64, 64) and built.train.steps == 3
    assert built.method.kernel.size == (31, 31)
    # 3D data keeps today's defaults.
    default = ExperimentConfig()
    assert default.train.val_tile == (64, 64, 64) and default.method.kernel.size == (31, 31, 31)
    two = load_config(ExperimentConfig, None, ["data.patch=[64, 64]", "train.val_crop=[20, 24]"])
    assert two.train.val_crop == (20, 24)


@pytest.mark.parametrize(
    ("overrides", "key", "shape", "patch"),
    [
        (["data.patch=[64, 64]", "train.val_tile=[16, 32, 32]"], "train.val_tile", 3, 2),
        (["data.patch=[64, 64]", "train.val_crop=[16, 32, 32]"], "train.val_crop", 3, 2),
        (["data.patch=[64, 64]", "method.kernel.size=[9, 9, 9]"], "method.kernel.size", 3, 2),
        (["train.val_tile=[32, 32]"], "train.val_tile", 2, 3),
        (["train.val_crop=[32, 32]"], "train.val_crop", 2, 3),
        (["method.kernel.size=[9, 9]"], "method.kernel.size", 2, 3),
    ],
)
def test_shapes_with_other_axes_than_the_patch_are_one_error_line(
    overrides: list[str],
    key: str,
    shape: int,
    patch: int,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(ConfigError, match=rf"{key} .* has {shape} axes but data.patch"):
        load_config(ExperimentConfig, None, overrides)
    run = tmp_path / "run"
    assert main(["train", *as_flags(overrides), "--output", str(run)]) == 2
    line = one_error_line(capsys, "train")
    assert key in line and "data.patch" in line
    assert not run.exists()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("method.generator.kind=vit", "method.generator.kind 'vit' is not one of unet, resnet"),
        (
            "method.name=pix2pix",
            "method.name 'pix2pix' is not one of blind_cyclegan, nonblind_cyclegan, cyclegan, "
            "comi, supervised, psf_regression",
        ),
        ("data.kind=pairs", "data.kind 'pairs' is not one of domains, paired, psf_samples"),
    ],
)
def test_an_unknown_tag_names_its_key_and_the_known_tags(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(ExperimentConfig, None, [override])
    assert str(info.value) == expected


def test_an_unknown_psf_model_names_its_key() -> None:
    from hpcdeconv.config import SimulateConfig

    with pytest.raises(ConfigError) as info:
        load_config(SimulateConfig, None, ["psf.model=airy"])
    assert str(info.value) == (
        "psf.model 'airy' is not one of born_wolf, richards_wolf, gibson_lanni, gaussian, zernike"
    )
