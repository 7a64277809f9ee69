"""The method layer in 2D, end to end from the CLI (issue 14).

``hpcdeconv simulate`` writes a 2D dataset (2D filaments blurred by the in-focus plane of a
widefield PSF); ``supervised`` and ``cyclegan`` train on it with a U-Net and with a ResNet
generator; the trained checkpoints then run through ``predict`` (a 2D TIFF, a 3-channel
TIFF, a 2D zarr array) and ``deconvolve`` (a stack of 2D planes through the dask driver),
whose stitched output equals ``predict`` of each whole plane.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

from hpcdeconv.cli import main
from hpcdeconv.data.zarr_io import BLURRED, SHARP, create_dataset, open_dataset, write_volume
from hpcdeconv.inference.model import load_model
from hpcdeconv.training.checkpoint import load_checkpoint, resolve_checkpoint

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

SIMULATION = [
    "shape=[48, 48]",
    "psf.shape=[9, 9]",
    "split={train: 3, val: 1, test: 1}",
    "storage.chunks=[48, 48]",
]
TRAINING = [
    "data.patch=[32, 32]",
    "data.batch_size=1",
    "train.steps=4",
    "train.log_every=1",
    "train.val_every=2",
    "train.ckpt_every=2",
    "train.image_every=2",
    "train.val_tile=[48, 48]",
    "train.val_overlap=8",
    "train.device=cpu",
    "method.discriminator.channels=4",
    "method.discriminator.n_layers=2",
    "method.discriminator.n_scales=2",
]
UNET = ["method.generator.kind=unet", "method.generator.channels=4", "method.generator.depth=2"]
RESNET = [
    "method.generator.kind=resnet",
    "method.generator.channels=4",
    "method.generator.n_blocks=2",
    "method.generator.upsample=resize",
]
#: Depth 1 without normalisation: strictly local (receptive field 19, radius 9), so the
#: driver's stitched blocks can equal the network on the whole (mirror-padded) plane.
LOCAL_UNET = [*UNET[:2], "method.generator.depth=1", "method.generator.norm=none"]
HALO = 10
#: One tile per whole 48x48 image and no blending: the output is G on the whole image.
WHOLE = ["--set", "tile=[48, 48]", "--set", "overlap=0", "--set", "blend=constant"]


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module")
def data2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data2d") / "data2d.zarr"
    config = str(CONFIGS / "simulate_2d.yaml")
    assert main(["simulate", "--config", config, str(out), *_sets(SIMULATION)]) == 0
    return out


def _train(config: str, generator: list[str], data: Path, run: Path) -> None:
    items = [*TRAINING, f"data.path={data}", *generator]
    if config == "cyclegan_2d":
        # The blur generator F follows G's kind in this test.
        items += [item.replace("method.generator", "method.blur_generator") for item in generator]
    args = ["train", "--config", str(CONFIGS / f"{config}.yaml"), "--output", str(run)]
    assert main([*args, *_sets(items)]) == 0


@pytest.fixture(scope="module")
def supervised_unet(data2d: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("sup_unet") / "run"
    _train("supervised_2d", LOCAL_UNET, data2d, run)
    return run


def test_simulate_writes_2d_images_and_a_2d_psf(data2d: Path) -> None:
    group = open_dataset(data2d)
    sharp, blurred = group[f"{SHARP}/train000/0"], group[f"{BLURRED}/train000/0"]
    assert sharp.shape == blurred.shape == (48, 48)
    psf = np.asarray(group["psf/0"][...])
    assert psf.shape == (9, 9) and psf.sum() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("config", "generator", "kind"),
    [
        ("supervised_2d", RESNET, "resnet"),
        ("cyclegan_2d", RESNET, "resnet"),
        ("cyclegan_2d", UNET, "unet"),
    ],
    ids=["supervised-resnet", "cyclegan-resnet", "cyclegan-unet"],
)
def test_2d_training_with_either_generator_records_it(
    data2d: Path, tmp_path: Path, config: str, generator: list[str], kind: str
) -> None:
    run = tmp_path / "run"
    _train(config, generator, data2d, run)
    state = load_checkpoint(resolve_checkpoint(run), map_location="cpu")
    artefact = state["artefact"]
    assert artefact["kind"] == "image_to_image" and artefact["generator"]["kind"] == kind
    assert (artefact["spatial_dims"], artefact["in_channels"]) == (2, 1)
    # Validation scored the 2D validation image.
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [x for x in lines if x.get("kind") == "val"]
    assert val and np.isfinite(val[-1]["psnr"]) and np.isfinite(val[-1]["psnr_input"])
    model = load_model(run)
    assert (model.spatial_dims, model.channels) == (2, 1)


def _whole(run: Path, image: np.ndarray, pad: int = 0) -> np.ndarray:
    """The trained generator on one whole (Y, X) image, mirror-padded by ``pad``."""
    net = load_model(run).net
    padded = np.pad(image, pad, mode="symmetric")
    with torch.inference_mode():
        out = net(torch.from_numpy(padded)[None, None])[0, 0].numpy()
    return out[pad : out.shape[0] - pad, pad : out.shape[1] - pad]


def test_predict_takes_2d_tiff_3_channel_tiff_and_2d_zarr(
    data2d: Path, supervised_unet: Path, tmp_path: Path
) -> None:
    image = np.asarray(open_dataset(data2d)[f"{BLURRED}/test000/0"][...])
    expected = _whole(supervised_unet, image)
    ckpt = ["--checkpoint", str(supervised_unet), *WHOLE]

    tifffile.imwrite(tmp_path / "plane.tif", image)
    assert (
        main(["predict", str(tmp_path / "plane.tif"), "--output", str(tmp_path / "a.tif"), *ckpt])
        == 0
    )
    np.testing.assert_allclose(tifffile.imread(tmp_path / "a.tif"), expected, atol=1e-5)

    # Three channels through the 1-channel generator: one channel at a time.
    rgb = np.stack([image, image[::-1], image[:, ::-1]])
    tifffile.imwrite(tmp_path / "cyx.tif", rgb, imagej=True, metadata={"axes": "CYX"})
    assert (
        main(["predict", str(tmp_path / "cyx.tif"), "--output", str(tmp_path / "b.tif"), *ckpt])
        == 0
    )
    out = tifffile.imread(tmp_path / "b.tif")
    assert out.shape == (3, 48, 48)
    np.testing.assert_allclose(out[0], expected, atol=1e-5)
    np.testing.assert_allclose(out[1], _whole(supervised_unet, rgb[1].copy()), atol=1e-5)

    source = data2d / BLURRED / "test000" / "0"
    assert main(["predict", str(source), "--output", str(tmp_path / "c.tif"), *ckpt]) == 0
    np.testing.assert_allclose(tifffile.imread(tmp_path / "c.tif"), expected, atol=1e-5)


def test_deconvolve_runs_a_stack_of_2d_planes_like_predict_of_each_plane(
    data2d: Path, supervised_unet: Path, tmp_path: Path, scheduler: str
) -> None:
    group = open_dataset(data2d)
    stack = np.stack([np.asarray(group[f"{BLURRED}/{v}/0"][...]) for v in ("test000", "val000")])
    inputs = create_dataset(tmp_path / "stack.zarr")
    write_volume(inputs, "blurred/stack", stack, (1.0, 0.1, 0.1), chunks=(1, 48, 48))
    source = tmp_path / "stack.zarr" / "blurred" / "stack"
    output = tmp_path / "out.zarr"
    args = ["deconvolve", str(source), "--checkpoint", str(supervised_unet), "--output"]
    # 3 x 3 blocks of 20 x 20 per plane, one tile per block and its halo, no blending.
    block = 2 * HALO
    settings = ["--block", str(block), "--halo", str(HALO), "--set", "chunks=[20, 20]"]
    settings += ["--set", f"tile=[{2 * block}, {2 * block}]", *WHOLE[2:]]
    assert main([*args, str(output), "--scheduler", scheduler, *settings]) == 0
    out = zarr.open_group(str(output / "deconvolved" / "stack"), mode="r")["0"][...]
    assert out.shape == stack.shape
    for plane, result in zip(stack, out, strict=True):
        np.testing.assert_allclose(result, _whole(supervised_unet, plane, HALO), atol=1e-5)
