"""COMI end to end from the CLI: training on mapped intensities (paired and unpaired),
losses that fall, a checkpoint that carries the intensity mapping, tiled prediction of
raw images equal to whole-image prediction, and a colour image refused by a grey network."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
from scipy.ndimage import gaussian_filter

from hpcdeconv.cli import main
from hpcdeconv.data.intensity import fit_intensity_map
from hpcdeconv.data.zarr_io import create_dataset, set_split, update_root_attrs, write_volume
from hpcdeconv.inference.model import load_model
from hpcdeconv.models.intensity import IntensityMapped
from hpcdeconv.models.vgg import VGG19Features
from hpcdeconv.physics.phantoms import texture_2d
from hpcdeconv.training.checkpoint import load_checkpoint
from hpcdeconv.training.runlog import read_metrics
from tests.conftest import assert_one_line_error

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "comi.yaml")
TORCHRUN = str(REPO / "launch" / "torchrun.sh")
SIDE = 48
#: Small networks; no normalisation in G so that it is strictly local (tiles == whole).
SMALL = [
    "data.patch=[32, 32]",
    "method.generator.channels=4",
    "method.generator.n_blocks=1",
    "method.blur_generator.channels=4",
    "method.blur_generator.n_blocks=1",
    "method.discriminator.channels=4",
    "train.val_tile=[48, 48]",
    "train.val_overlap=8",
    "train.device=cpu",
]


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _raw_fields(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(in-focus, out-of-focus) raw 16-bit-like planes of ``n`` fields of view."""
    rng = np.random.default_rng(4)
    fields = []
    for _ in range(n):
        sharp = 200.0 + 3000.0 * texture_2d((SIDE, SIDE), rng, "cells")
        fields.append((sharp, gaussian_filter(sharp, 2.0, mode="reflect")))
    return fields


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A COMI-layout dataset (ids ``f<i>_z1``) of mapped planes with its mapping."""
    out = tmp_path_factory.mktemp("comi") / "comi.zarr"
    fields = _raw_fields(6)
    mapping = fit_intensity_map([s for s, _ in fields[:4]])
    group = create_dataset(out)
    ids = [f"f{i}_z1" for i in range(len(fields))]
    for vid, (sharp, blurred) in zip(ids, fields, strict=True):
        for domain, plane in (("sharp", sharp), ("blurred", blurred)):
            write_volume(group, f"{domain}/{vid}", mapping.forward(plane), (0.5, 0.5))
    set_split(group, {"train": ids[:4], "val": ids[4:5], "test": ids[5:]})
    update_root_attrs(group, intensity=mapping.record())
    return out


def _train(dataset: Path, run: Path, extra: list[str]) -> list[dict]:
    args = ["train", "--config", CONFIG, "--output", str(run)]
    assert main([*args, *_sets([f"data.path={dataset}", *SMALL, *extra])]) == 0
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_paired_training_lowers_the_generator_losses(dataset: Path, tmp_path: Path) -> None:
    # Paired planes, content weighted up: G must learn the out-of-focus → in-focus map
    # (it starts as the identity, with content ‖y − x‖²). The cycle term starts at 0
    # (identity generators) and is not expected to fall.
    steps = 150
    lines = _train(
        dataset,
        tmp_path / "run",
        [
            "data.kind=paired",
            "data.patch=[32, 32]",
            "method.loss.content_weight=10",
            "method.loss.adversarial_weight=0.05",
            f"train.steps={steps}",
            "train.log_every=1",
            f"train.val_every={steps}",
            f"train.ckpt_every={steps}",
            f"train.image_every={steps}",
            "optim.lr=1e-3",
            f"optim.decay_start={steps}",
        ],
    )
    train = [x for x in lines if x.get("kind") == "train"]
    assert len(train) == steps
    for term in ("content", "loss_g"):
        first = np.mean([x[term] for x in train[:25]])
        last = np.mean([x[term] for x in train[-25:]])
        assert last < 0.7 * first, (term, first, last)
    val = [x for x in lines if x.get("kind") == "val"]
    assert val[-1]["psnr"] > val[-1]["psnr_input"]


@pytest.fixture(scope="module")
def unpaired_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("comi_run") / "run"
    extra = [
        "method.generator.norm=none",
        "train.steps=4",
        "train.val_every=2",
        "train.ckpt_every=2",
        "train.image_every=2",
    ]
    _train(dataset, run, extra)
    return run


def test_checkpoint_carries_the_mapping_and_predict_works_on_raw_values(
    dataset: Path, unpaired_run: Path, tmp_path: Path
) -> None:
    model = load_model(unpaired_run)
    assert isinstance(model.net, IntensityMapped)
    mapping = model.net.intensity
    _, blurred = _raw_fields(6)[5]
    raw = np.pad(blurred, ((0, 40), (0, 24))).astype(np.float32)  # 88 x 72, any size
    tifffile.imwrite(tmp_path / "raw.tif", raw)
    # Whole image in one tile vs 64-px tiles whose kept cores see only real data: the
    # overlap covers G's receptive field (radius <= overlap // 2) and tiles start on
    # multiples of its down-sampling factor 4.
    rf = model.receptive_field
    overlap = rf + 1 if rf % 2 else rf
    assert (64 - overlap) % 4 == 0
    whole = ["--set", "tile=[88, 72]", "--set", "overlap=0", "--set", "blend=constant"]
    tiled = ["--set", "tile=[64, 64]", "--set", f"overlap={overlap}", "--set", "blend=constant"]
    outputs = {}
    for name, settings in (("whole", whole), ("tiled", tiled)):
        out = tmp_path / f"{name}.tif"
        args = ["predict", str(tmp_path / "raw.tif"), "--checkpoint", str(unpaired_run)]
        assert main([*args, "--output", str(out), *settings]) == 0
        outputs[name] = tifffile.imread(out)
    np.testing.assert_allclose(outputs["tiled"], outputs["whole"], rtol=1e-5, atol=1e-2)
    # Raw in, raw out: the mapping is applied around the trained generator.
    with torch.inference_mode():
        mapped = torch.from_numpy(mapping.forward(raw))[None, None]
        expected = mapping.inverse(model.net.net(mapped)[0, 0].numpy())
    np.testing.assert_allclose(outputs["whole"], expected, rtol=1e-5, atol=1e-2)
    assert outputs["whole"].mean() > 100  # camera units, not the network's (-1, 1)


def test_a_colour_image_is_refused_by_a_grey_network(
    unpaired_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "colour.tif", rgb, photometric="rgb")
    out = tmp_path / "out.tif"
    args = ["predict", str(tmp_path / "colour.tif"), "--checkpoint", str(unpaired_run)]
    code = main([*args, "--output", str(out)])
    assert_one_line_error(code, capsys.readouterr().err, "an RGB image")
    assert not out.exists()


def test_deconvolve_runs_a_folder_of_raw_images_like_the_whole_network(
    unpaired_run: Path, tmp_path: Path, scheduler: str
) -> None:
    # Two raw images of different sizes through the dask driver, in blocks: each equals
    # the mapped generator on the whole (mirror-padded) image.
    net = load_model(unpaired_run).net
    halo = 24  # >= the receptive-field radius, a multiple of G's down-sampling factor 4
    fields = _raw_fields(6)
    a = np.pad(fields[5][1], ((0, 40), (0, 24)), mode="reflect")  # 88 x 72: 2 x 2 blocks
    images = {"a": a, "b": fields[4][1][:40, :44]}
    for name, image in images.items():
        tifffile.imwrite(tmp_path / f"{name}.tif", image.astype(np.float32))
    out = tmp_path / "out.zarr"
    args = ["deconvolve", str(tmp_path / "a.tif"), str(tmp_path / "b.tif")]
    args += ["--checkpoint", str(unpaired_run), "--output", str(out), "--scheduler", scheduler]
    settings = ["--block", "48", "--halo", str(halo), "--set", "chunks=[24, 24]"]
    settings += ["--set", "tile=[96, 96]", "--set", "overlap=0", "--set", "blend=constant"]
    assert main([*args, *settings]) == 0
    for name, image in images.items():
        result = zarr.open_group(str(out / "deconvolved" / name), mode="r")["0"][...]
        padded = np.pad(image, halo, mode="symmetric").astype(np.float32)
        with torch.inference_mode():
            whole = net(torch.from_numpy(padded)[None, None])[0, 0].numpy()
        expected = whole[halo:-halo, halo:-halo]
        np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-2)


def test_a_vgg_file_of_another_layout_is_one_line_before_the_run_exists(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "vgg16.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, bad)
    run = tmp_path / "run"
    items = [f"data.path={dataset}", *SMALL, f"method.content.vgg_weights={bad}"]
    code = main(["train", "--config", CONFIG, "--output", str(run), *_sets(items)])
    assert_one_line_error(code, capsys.readouterr().err, "features.0.bias")
    assert not run.exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_two_ranks_train_comi_with_a_frozen_vgg(
    dataset: Path, tmp_path: Path, launch_env: dict[str, str]
) -> None:
    # Two DeepSpeed engines (G, D) over 2 ranks, the VGG-19 a frozen loss network on each
    # rank: it trains, checkpoints its groups as ZeRO shards and keeps the VGG out of them.
    weights = tmp_path / "vgg19.pth"
    torch.manual_seed(0)
    torch.save(VGG19Features().state_dict(), weights)
    run = tmp_path / "run"
    items = [
        f"data.path={dataset}",
        *SMALL,
        "data.kind=paired",
        "data.patch=[32, 32]",
        f"method.content.vgg_weights={weights}",
        f"output={run}",
        "train.steps=3",
        "train.val_every=3",
        "train.ckpt_every=3",
        "train.log_every=1",
        "strategy.name=deepspeed",
        "strategy.deepspeed.zero_stage=1",
    ]
    extensions = Path.home() / ".cache" / "hpcdeconv" / "torch_extensions"
    env = {"TORCH_EXTENSIONS_DIR": str(extensions)} | launch_env
    command = [TORCHRUN, "2", "--", sys.executable, "-m", "hpcdeconv.cli", "train"]
    command += ["--config", CONFIG, *_sets(items)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("trained comi for 3 steps") == 1
    state = load_checkpoint(run)
    assert state["groups"]["G"]["deepspeed"]["group"] == "G"
    assert not [k for k in state if "vgg" in k or "content" in k]
    train = read_metrics(run, "train")
    assert len(train) == 3 and all(np.isfinite(r["content"]) for r in train)


def test_make_dataset_then_train_reads_its_store_paired_and_unpaired(tmp_path: Path) -> None:
    # The store `comi make-dataset` writes is what both training feeds read, as is.
    data = tmp_path / "comi.zarr"
    config = str(REPO / "configs" / "comi_data_synthetic.yaml")
    small = ["source.phantoms.count=6", "source.phantoms.shape=[48, 48]", "source.draws=2"]
    assert main(["comi", "make-dataset", "--config", config, str(data), *_sets(small)]) == 0
    for kind in ("domains", "paired"):
        run = tmp_path / kind
        extra = [f"data.kind={kind}", "data.patch=[32, 32]", "train.steps=2", "train.val_every=2"]
        _train(data, run, extra)
        model = load_model(run)
        assert isinstance(model.net, IntensityMapped)
        assert model.net.intensity.target == (-1.0, 1.0)
