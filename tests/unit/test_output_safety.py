"""No verb deletes or overwrites what a user owns: an output may not be, contain or lie inside
an input, and ``--overwrite`` replaces only what hpcdeconv wrote. Every refusal is one error
line with exit status 2, and every input is byte-identical afterwards."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from hpcdeconv.cli import main
from hpcdeconv.config import ExperimentConfig, SimulateConfig, load_config
from hpcdeconv.data.safety import (
    check_disjoint,
    check_replaceable,
    empty_output,
    input_extent,
)
from hpcdeconv.data.simulate import simulate
from hpcdeconv.data.zarr_io import create_dataset, read_volume, write_volume
from hpcdeconv.errors import InputError, OutputExistsError
from hpcdeconv.training.engine import train
from hpcdeconv.training.rundir import prepare_run_dir
from tests.conftest import TINY_SIMULATION, TINY_TRAINING

# --------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------


def digest(path: Path) -> dict[str, str]:
    """SHA-256 of every file below ``path`` (or of ``path`` itself), by relative name."""
    path = Path(path)
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], *fragments: str) -> str:
    """Run the CLI, expect exit 2 with one ``hpcdeconv <verb>: error:`` line holding
    every fragment; return that line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith(f"hpcdeconv {argv[0]}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def source_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("source") / "data.zarr"
    simulate(load_config(SimulateConfig, None, TINY_SIMULATION), out)
    return out


@pytest.fixture
def dataset(source_dataset: Path, tmp_path: Path) -> Path:
    """A fresh copy of a simulated dataset (sharp/, blurred/, psf, split) per test."""
    return Path(shutil.copytree(source_dataset, tmp_path / "data.zarr"))


@pytest.fixture(scope="module")
def run_dir(source_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-step supervised run (depth-2 U-Net) to predict and deconvolve with."""
    run = tmp_path_factory.mktemp("checkpoint") / "run"
    overrides = [*TINY_TRAINING, f"data.path={source_dataset}", f"output={run}"]
    overrides += ["method.name=supervised", "train.steps=1"]
    train(load_config(ExperimentConfig, None, overrides), progress=False)
    return run


def user_folder(path: Path) -> Path:
    """A folder of a user's files: a TIFF stack and unrelated notes."""
    path.mkdir()
    volume = np.arange(4 * 8 * 8, dtype=np.uint16).reshape(4, 8, 8)
    tifffile.imwrite(path / "stack.tif", volume, imagej=True, metadata={"axes": "ZYX"})
    (path / "notes.txt").write_text("lab notebook, not a copy anywhere else")
    return path


# --------------------------------------------------------------------------------------
# The two reported cases
# --------------------------------------------------------------------------------------


def test_predict_over_the_store_holding_its_input_keeps_the_store(
    dataset: Path, run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before, run_before = digest(dataset), digest(run_dir)
    argv = ["predict", "--checkpoint", str(run_dir), f"{dataset}/blurred/test000"]
    refused([*argv, "--output", str(dataset), "--overwrite"], capsys, "contains the input")
    assert digest(dataset) == before
    assert digest(run_dir) == run_before
    assert {"sharp", "blurred", "psf"} <= {p.name for p in dataset.iterdir()}


def test_ingest_into_the_folder_holding_its_input_keeps_every_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exp = user_folder(tmp_path / "exp")
    before = digest(exp)
    argv = ["ingest", str(exp / "stack.tif"), "--output", str(exp), "--overwrite"]
    refused([*argv, "--voxel-size", "1", "1", "1"], capsys, "contains the input")
    assert digest(exp) == before


# --------------------------------------------------------------------------------------
# Every verb: outputs overlapping inputs
# --------------------------------------------------------------------------------------


def _predict_cases(data: Path, run: Path, tmp: Path) -> list[tuple[list[str], str]]:
    src = f"{data}/blurred/test000"
    predict = ["predict", "--checkpoint", str(run), src, "--overwrite"]
    (tmp / "link.zarr").symlink_to(data, target_is_directory=True)
    return [
        ([*predict, "--output", src], "is the input"),
        ([*predict, "--output", f"{data}/blurred/new.tif"], "the zarr store holding the input"),
        ([*predict, "--output", f"{data}/out.zarr"], "lies inside"),
        ([*predict, "--output", str(tmp / "link.zarr")], "contains the input"),
        ([*predict, "--output", str(run)], "the --checkpoint input"),
        ([*predict, "--output", f"{run}/pred.tif"], "lies inside the --checkpoint input"),
        (
            [*predict, "--output", str(tmp / "p.tif"), "--truth", f"{data}/sharp/test000"],
            "",
        ),
        (
            [*predict, "--output", str(tmp / "p.tif"), "--png", f"{data}/sharp/fig.png"],
            "--png",
        ),
        ([*predict, "--output", str(tmp / "p.tif"), "--png", str(tmp / "p.tif")], "--png"),
    ]


def test_predict_refuses_every_output_that_overlaps_an_input(
    dataset: Path, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before, run_before = digest(dataset), digest(run_dir)
    for argv, fragment in _predict_cases(dataset, run_dir, tmp_path):
        if fragment:
            refused(argv, capsys, fragment)
        else:  # --truth lies in the same store as the input, the output elsewhere: fine
            assert main(argv) == 0
            capsys.readouterr()
        assert digest(dataset) == before
        assert digest(run_dir) == run_before


def test_predict_refuses_to_write_over_its_truth(
    dataset: Path, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truth = tmp_path / "truth.tif"
    tifffile.imwrite(truth, np.asarray(read_volume(dataset, "sharp/test000")[0]))
    before = digest(truth)
    argv = ["predict", "--checkpoint", str(run_dir), f"{dataset}/blurred/test000"]
    argv += ["--truth", str(truth), "--output", str(truth), "--overwrite"]
    refused(argv, capsys, "is the --truth input")
    assert digest(truth) == before


def test_deconvolve_and_rl_refuse_outputs_over_their_inputs(
    dataset: Path, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = f"{dataset}/blurred/test000"
    psf_dir = tmp_path / "psfs.zarr"
    psf_dir.mkdir()
    np.save(psf_dir / "psf.npy", np.asarray(read_volume(dataset, "psf")[0]))
    config = tmp_path / "cfg.zarr" / "rl.yaml"
    config.parent.mkdir()
    config.write_text("iterations: 2\n")
    deconvolve = ["deconvolve", "--checkpoint", str(run_dir), src, "--overwrite"]
    rl = ["rl", src, "--psf", str(psf_dir / "psf.npy"), "--overwrite"]
    cases = [
        ([*deconvolve, "--output", str(dataset)], "overlap"),
        ([*deconvolve, "--output", f"{dataset}/d.zarr"], "the zarr store holding the input"),
        ([*deconvolve, "--output", f"{run_dir}/out.zarr"], "the --checkpoint input"),
        ([*rl, "--output", str(dataset)], "overlap"),
        ([*rl, "--output", str(psf_dir)], "contains the --psf input"),
        ([*rl, "--output", str(config.parent), "--config", str(config)], "the --config input"),
    ]
    protected = [dataset, run_dir, psf_dir, config.parent]
    before = [digest(p) for p in protected]
    for argv, fragment in cases:
        refused(argv, capsys, fragment)
        assert [digest(p) for p in protected] == before


def test_train_refuses_to_write_its_run_over_its_data(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = digest(dataset)
    train_args = ["train", *[a for o in TINY_TRAINING for a in ("--set", o)]]
    train_args += ["--set", f"data.path={dataset}", "--set", "train.steps=1", "--overwrite"]
    refused([*train_args, "--output", str(dataset)], capsys, "is the data.path input")
    refused([*train_args, "--output", f"{dataset}/run"], capsys, "lies inside the data.path")
    refused([*train_args, "--output", str(tmp_path)], capsys, "contains the data.path input")
    assert digest(dataset) == before


# --------------------------------------------------------------------------------------
# --overwrite replaces only what hpcdeconv wrote
# --------------------------------------------------------------------------------------


def test_overwrite_never_replaces_a_folder_of_foreign_files(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exp = user_folder(tmp_path / "exp")
    foreign = user_folder(tmp_path / "foreign.zarr")
    tif = user_folder(tmp_path / "in") / "stack.tif"
    before = {p: digest(p) for p in (exp, foreign)}
    ingest = ["ingest", str(tif), "--voxel-size", "1", "1", "1", "--overwrite"]
    simulate_args = ["simulate", *[a for o in TINY_SIMULATION for a in ("--set", o)]]
    train_args = ["train", *[a for o in TINY_TRAINING for a in ("--set", o)]]
    train_args += ["--set", f"data.path={dataset}", "--overwrite"]
    what = "is not a zarr store written by hpcdeconv"
    cases = [
        ([*ingest, "--output", str(exp)], what),
        ([*simulate_args, str(exp), "--overwrite"], what),
        ([*simulate_args, str(tmp_path / "x.zarr"), "--png", str(exp), "--overwrite"], "a file"),
        (["psf", "--out", str(exp / "notes.tif"), "--overwrite"], ""),
        (["psf", "--out", str(tmp_path / "p.tif"), "--png", str(exp), "--overwrite"], "a file"),
        ([*train_args, "--output", str(exp)], "is not a training run directory"),
        (
            ["rl", str(tif), "--psf-model", "gaussian", "--output", str(foreign), "--overwrite"],
            what,
        ),
    ]
    # A text file named like an output is not a file of that kind either.
    (exp / "notes.tif").write_text("not a TIFF")
    before[exp] = digest(exp)
    for argv, fragment in cases:
        refused(argv, capsys, "--overwrite refused", fragment or "is not a tif file")
        assert {p: digest(p) for p in (exp, foreign)} == before


def test_overwrite_refuses_our_store_or_run_once_it_holds_foreign_files(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tif = user_folder(tmp_path / "in") / "stack.tif"
    ingest = ["ingest", str(tif), "--voxel-size", "1", "1", "1", "--output"]
    out = tmp_path / "out.zarr"
    assert main([*ingest, str(out)]) == 0
    (out / "blurred" / "README.txt").write_text("my notes about this dataset")
    before = digest(out)
    refused([*ingest, str(out), "--overwrite"], capsys, "holds blurred/README.txt")
    assert digest(out) == before

    run = tmp_path / "run"
    train_args = ["train", *[a for o in TINY_TRAINING for a in ("--set", o)]]
    train_args += ["--set", f"data.path={dataset}", "--set", "train.steps=1"]
    train_args += ["--set", "method.name=supervised", "--output", str(run)]
    assert main(train_args) == 0
    (run / "analysis.ipynb").write_text("{}")
    before = digest(run)
    refused([*train_args, "--overwrite"], capsys, "holds analysis.ipynb")
    assert digest(run) == before
    (run / "analysis.ipynb").unlink()
    assert main([*train_args, "--overwrite"]) == 0
    # The run's own config.yaml is no foreign input: resuming from it is allowed.
    resume = ["train", "--config", str(run / "config.yaml"), "--resume"]
    assert main([*resume, "--set", "train.steps=2"]) == 0


def test_overwrite_replaces_what_hpcdeconv_wrote(
    dataset: Path, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = f"{dataset}/blurred/test000"
    for name in ("p.tif", "p.npy", "p.zarr"):
        argv = ["predict", "--checkpoint", str(run_dir), src, "--output", str(tmp_path / name)]
        assert main(argv) == 0
        refused(argv, capsys, "exists; pass --overwrite")
        assert main([*argv, "--overwrite", "--png", str(tmp_path / "p.png")]) == 0
        assert main([*argv, "--overwrite", "--png", str(tmp_path / "p.png")]) == 0
    out = zarr.open_array(tmp_path / "p.zarr" / "deconvolved" / "test000" / "0", mode="r")
    assert out.shape == (16, 32, 32)
    assert tifffile.imread(tmp_path / "p.tif").shape == (16, 32, 32)


def test_overwrite_never_replaces_a_users_tiff_or_png(
    dataset: Path, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A valid TIFF/PNG is not enough: only files carrying our Software tag are replaced.
    import matplotlib.pyplot as plt

    user_tif = tmp_path / "stack.tif"
    tifffile.imwrite(user_tif, np.ones((4, 8, 8), np.float32), imagej=True)
    user_png = tmp_path / "figure.png"
    plt.imsave(user_png, np.ones((4, 4)))
    before = {**digest(user_tif), **{"png": digest(user_png)["."]}}
    src = f"{dataset}/blurred/test000"
    argv = ["predict", "--checkpoint", str(run_dir), src, "--overwrite"]
    refused([*argv, "--output", str(user_tif)], capsys, "was not written by hpcdeconv")
    out = str(tmp_path / "ours.tif")
    refused([*argv, "--output", out, "--png", str(user_png)], capsys, "not written by hpcdeconv")
    refused(["psf", "--out", str(user_tif), "--overwrite"], capsys, "not written by hpcdeconv")
    assert {**digest(user_tif), **{"png": digest(user_png)["."]}} == before
    assert not Path(out).exists()


def test_predict_never_writes_a_non_finite_prediction(
    dataset: Path, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from hpcdeconv.training.checkpoint import latest_checkpoint

    state = torch.load(latest_checkpoint(run_dir), weights_only=True)
    for tensor in state["deblur"].values():
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
    poisoned = tmp_path / "poisoned.pt"
    torch.save(state, poisoned)
    out = tmp_path / "p.tif"
    argv = ["predict", "--checkpoint", str(poisoned), f"{dataset}/blurred/test000"]
    # Refused when loaded: the frozen CPU path turns NaN weights into an all-zero volume.
    refused([*argv, "--output", str(out)], capsys, "weight(s) are NaN or Inf")
    assert not out.exists()
    refused(["deconvolve", *argv[1:], "--output", str(tmp_path / "d.zarr")], capsys, "NaN or Inf")
    assert not (tmp_path / "d.zarr").exists()


# --------------------------------------------------------------------------------------
# The rules themselves, for callers of the library
# --------------------------------------------------------------------------------------


def test_input_extent_is_the_whole_zarr_store(dataset: Path, tmp_path: Path) -> None:
    assert input_extent(dataset / "blurred" / "test000") == dataset.resolve()
    assert input_extent(dataset / "psf") == dataset.resolve()
    tif = user_folder(tmp_path / "exp") / "stack.tif"
    assert input_extent(tif) == tif.resolve()
    assert input_extent(tmp_path / "missing.tif") == (tmp_path / "missing.tif").resolve()


def test_check_disjoint_resolves_symbolic_links(tmp_path: Path) -> None:
    exp = user_folder(tmp_path / "exp")
    (tmp_path / "alias").symlink_to(exp, target_is_directory=True)
    inputs = [("input", exp / "stack.tif")]
    with pytest.raises(InputError, match="contains the input"):
        check_disjoint([("--output", tmp_path / "alias")], inputs)
    with pytest.raises(InputError, match="is the input"):
        check_disjoint([("--output", tmp_path / "alias" / "stack.tif")], inputs)
    check_disjoint([("--output", tmp_path / "out.zarr")], inputs)


def test_library_writers_refuse_foreign_folders(dataset: Path, tmp_path: Path) -> None:
    exp = user_folder(tmp_path / "exp")
    before = digest(exp)
    with pytest.raises(OutputExistsError, match="not a zarr store written by hpcdeconv"):
        create_dataset(exp, overwrite=True)
    with pytest.raises(OutputExistsError, match="not a training run directory"):
        prepare_run_dir(exp, resume=False, overwrite=True)
    assert digest(exp) == before
    # A file at a store's path is nobody's store: it is refused, not unlinked.
    (tmp_path / "file.zarr").write_text("keep")
    with pytest.raises(OutputExistsError, match="is a file"):
        create_dataset(tmp_path / "file.zarr", overwrite=True)
    assert (tmp_path / "file.zarr").read_text() == "keep"
    # Our own dataset is replaced.
    group = create_dataset(dataset, overwrite=True)
    write_volume(group, "blurred/v", np.ones((2, 3, 4), np.float32), (1.0, 1.0, 1.0))
    assert sorted(p.name for p in dataset.iterdir()) == ["blurred", "zarr.json"]


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda p: p.mkdir(), None),
        (lambda p: (p.mkdir(), (p / ".DS_Store").write_bytes(b"x")), "holds .DS_Store"),
        (lambda p: p.symlink_to(p.parent / "nowhere"), "dangling"),
    ],
)
def test_check_replaceable_edge_cases(
    tmp_path: Path, make: Callable[[Path], object], fragment: str | None
) -> None:
    path = tmp_path / "out.zarr"
    make(path)
    if fragment is None:
        check_replaceable(path, "zarr")  # an empty directory loses nothing
        return
    if "holds" in fragment:  # our marker, plus a file zarr did not write
        zarr.open_group(path, mode="a", zarr_format=3, attributes={"hpcdeconv": {"format": 1}})
    with pytest.raises(OutputExistsError, match=fragment):
        check_replaceable(path, "zarr")


def test_emptying_a_linked_output_keeps_the_link(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch" / "out.zarr"
    create_dataset(scratch)
    link = tmp_path / "out.zarr"
    link.symlink_to(scratch, target_is_directory=True)
    empty_output(link, "zarr")
    assert link.is_symlink() and scratch.is_dir() and not any(scratch.iterdir())
    create_dataset(link, overwrite=True)
    assert (scratch / "zarr.json").is_file()
