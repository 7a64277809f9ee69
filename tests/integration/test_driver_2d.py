"""``hpcdeconv deconvolve`` with a 2D generator on a local dask cluster: a stack of planes
runs one plane per task with the halo in Y and X only, and the stitched result equals the
generator on each whole (symmetrically padded) plane; 2D images and images with channels
too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
from distributed import Client

from hpcdeconv.cli import main
from hpcdeconv.data.zarr_io import create_dataset, write_volume
from hpcdeconv.inference.driver import deconvolve_volumes
from hpcdeconv.inference.model import load_model
from hpcdeconv.inference.plan import image_plan
from hpcdeconv.inference.processors import NetworkProcessor
from hpcdeconv.inference.sources import open_sources
from tests.unit.test_predict_2d import save_generator, save_validated_run

RADIUS = 9  # receptive-field radius of the depth-1 U-Net of save_generator
#: One tile per padded block and no blending: blocks can be compared with whole planes.
EXACT = ["--block", "24", "--set", "chunks=[8, 8]", "--set", "tile=[64, 64]"]
EXACT += ["--set", "overlap=0", "--set", "blend=constant"]


def whole_plane(net: torch.nn.Module, plane: np.ndarray) -> np.ndarray:
    """G on a whole plane padded symmetrically by the halo, cropped back."""
    padded = np.pad(plane, RADIUS, mode="symmetric")
    with torch.inference_mode():
        out = net(torch.from_numpy(padded)[None, None])[0, 0].numpy()
    return out[RADIUS:-RADIUS, RADIUS:-RADIUS]


@pytest.fixture(scope="module")
def gray(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    run = tmp_path_factory.mktemp("gray2d") / "run"
    return run, save_generator(run, spatial_dims=2, channels=1)


def test_stack_of_planes_runs_one_plane_per_task_and_equals_whole_planes(
    gray: tuple[Path, torch.nn.Module],
    scheduler: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run, net = gray
    stack = np.random.default_rng(5).random((3, 40, 48), dtype=np.float32)
    group = create_dataset(tmp_path / "in.zarr")
    write_volume(group, "blurred/stack", stack, (0.5, 0.1, 0.1), chunks=(1, 16, 16))
    source = tmp_path / "in.zarr" / "blurred" / "stack"
    args = ["deconvolve", "--checkpoint", str(run), str(source), "--output"]
    assert main([*args, str(tmp_path / "out.zarr"), "--scheduler", scheduler, *EXACT]) == 0
    # 3 planes x 2 x 2 blocks of 24 x 24 in Y and X.
    assert "12 block(s) computed" in capsys.readouterr().out
    image = zarr.open_group(str(tmp_path / "out.zarr" / "deconvolved" / "stack"), mode="r")
    out = image["0"]
    assert out.shape == stack.shape and out.chunks == (1, 8, 8)
    expected = np.stack([whole_plane(net, plane) for plane in stack])
    assert np.abs(out[...] - expected).max() <= 1e-5
    scale = image.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert scale[0]["scale"] == pytest.approx([0.5, 0.1, 0.1])


def test_plan_of_a_stack_has_no_halo_in_z(
    gray: tuple[Path, torch.nn.Module], client: Client, tmp_path: Path
) -> None:
    run, net = gray
    stack = np.random.default_rng(6).random((2, 40, 40), dtype=np.float32)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    sources = open_sources([tmp_path / "stack.tif"], any_rank=True)
    plan = image_plan(sources, (24, 24), (RADIUS, RADIUS), (8, 8), retries=0)
    assert (plan.block, plan.halo, plan.chunks, plan.axes) == (
        (1, 24, 24),
        (0, RADIUS, RADIUS),
        (1, 8, 8),
        "ZYX",
    )
    blocks = plan.grid(stack.shape)
    assert len(blocks) == 8
    assert all(b.read[0] == b.write[0] and b.pad[0] == (0, 0) for b in blocks)
    processor = NetworkProcessor.from_model(load_model(run), (64, 64), 0, "constant", 1, "fp32")
    report = deconvolve_volumes(
        client, sources, tmp_path / "out.zarr", processor, plan, progress=False
    )
    assert report.complete and report.processed == 8
    out = zarr.open_array(str(tmp_path / "out.zarr" / "deconvolved" / "stack" / "0"), mode="r")
    expected = np.stack([whole_plane(net, plane) for plane in stack])
    assert np.abs(out[...] - expected).max() <= 1e-5


def test_2d_image(
    gray: tuple[Path, torch.nn.Module],
    scheduler: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run, net = gray
    plane = np.random.default_rng(7).random((40, 48), dtype=np.float32)
    zarr.create_array(str(tmp_path / "plane.zarr"), shape=plane.shape, dtype="float32")[:] = plane
    args = ["deconvolve", "--checkpoint", str(run), "--scheduler", scheduler, *EXACT]
    assert main([*args, str(tmp_path / "plane.zarr"), "--output", str(tmp_path / "o.zarr")]) == 0
    assert "4 block(s) computed" in capsys.readouterr().out
    out = zarr.open_array(str(tmp_path / "o.zarr" / "deconvolved" / "plane" / "0"), mode="r")
    assert np.abs(out[...] - whole_plane(net, plane)).max() <= 1e-5


def test_unset_tile_is_the_runs_validation_tiling(scheduler: str, tmp_path: Path) -> None:
    # As predict: the checkpoint's train.val_tile / val_overlap, recorded in the output.
    run = tmp_path / "run"
    save_validated_run(run)
    plane = np.random.default_rng(8).random((40, 48), dtype=np.float32)
    zarr.create_array(str(tmp_path / "plane.zarr"), shape=plane.shape, dtype="float32")[:] = plane
    args = ["deconvolve", "--checkpoint", str(run), "--scheduler", scheduler, "--block", "64"]
    assert main([*args, str(tmp_path / "plane.zarr"), "--output", str(tmp_path / "o.zarr")]) == 0
    image = zarr.open_group(str(tmp_path / "o.zarr" / "deconvolved" / "plane"), mode="r")
    ran = dict(image.attrs)["provenance"]["config"]
    assert (ran["tile"], ran["overlap"]) == ([48, 48], 8)


@pytest.mark.parametrize("channels", [1, 3])
def test_channels_run_whole_or_one_per_task(
    scheduler: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], channels: int
) -> None:
    """A 3-channel generator takes the channels of a block together; a 1-channel one runs
    a task per channel. The output keeps the channel axis ("c")."""
    net = save_generator(tmp_path / "run", spatial_dims=2, channels=channels, seed=channels)
    image = np.random.default_rng(9).random((3, 40, 48), dtype=np.float32)
    tifffile.imwrite(tmp_path / "cyx.tif", image, imagej=True, metadata={"axes": "CYX"})
    args = ["deconvolve", "--checkpoint", str(tmp_path / "run"), "--scheduler", scheduler]
    args += [str(tmp_path / "cyx.tif"), "--output", str(tmp_path / "o.zarr"), *EXACT]
    assert main(args) == 0
    blocks = 4 if channels == 3 else 12
    assert f"{blocks} block(s) computed" in capsys.readouterr().out
    group = zarr.open_group(str(tmp_path / "o.zarr" / "deconvolved" / "cyx"), mode="r")
    out = group["0"]
    assert out.shape == image.shape and out.chunks == (channels, 8, 8)
    assert [a["name"] for a in group.attrs["ome"]["multiscales"][0]["axes"]] == ["c", "y", "x"]
    padded = np.pad(image, ((0, 0), (RADIUS, RADIUS), (RADIUS, RADIUS)), mode="symmetric")
    with torch.inference_mode():
        if channels == 3:
            whole = net(torch.from_numpy(padded)[None])[0].numpy()
        else:
            whole = net(torch.from_numpy(padded)[:, None])[:, 0].numpy()
    expected = whole[:, RADIUS:-RADIUS, RADIUS:-RADIUS]
    assert np.abs(out[...] - expected).max() <= 1e-5
