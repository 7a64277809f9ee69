"""``hpcdeconv rl --psf-map``: spatially-variant TV-RL of 2D images through the dask driver,
stitched blocks against whole-image SV-RL, provenance and resume, and the bad inputs
(map grid != image, a volume, a map together with a PSF) refused with one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from hpcdeconv.classical.sv_rl import crop_size, node_psfs, sv_richardson_lucy
from hpcdeconv.cli import main
from hpcdeconv.config.psfnet import PSFModelConfig, PSFOptics
from hpcdeconv.data.zarr_io import create_dataset, write_volume
from hpcdeconv.psfnet.psf_map import PSFMap, window_starts, write_psf_map
from hpcdeconv.psfnet.psf_models import build_psf_model
from tests.conftest import assert_one_line_error, run_cli

SHAPE = (256, 256)
ITERATIONS, TV = 6, 0.002
# Blocks of 96 px in 32 px chunks: a 3 x 3 block grid with the automatic halo.
PLAN = ["--block", "96", "--set", "chunks=[32, 32, 32]"]
RUN = ["--iterations", str(ITERATIONS), "--tv", str(TV), *PLAN]


def _psf_map(shape: tuple[int, int], seed: int = 0) -> PSFMap:
    """A Gaussian-2 map (15 px PSFs, 0.2-1.5 px widths), window 128, stride 64."""
    model = build_psf_model(PSFModelConfig(model="gaussian2", optics=PSFOptics(psf_size=15)))
    gy, gx = (len(window_starts(n, 128, 64)) for n in shape)
    params = np.random.default_rng(seed).uniform(0.07, 0.5, (2, gy, gx)).astype(np.float32)
    return PSFMap(
        model,
        params,
        np.zeros((gy, gx), np.float32),
        np.ones((gy, gx), bool),
        128,
        64,
        shape,
        (0.325, 0.325),
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, np.ndarray]:
    """The map, the image as a TIFF and as an OME-Zarr image, and the image itself."""
    root = tmp_path_factory.mktemp("svrl")
    image = (np.random.default_rng(1).random(SHAPE) * 100).astype(np.float32)
    write_psf_map(root / "map.zarr", _psf_map(SHAPE))
    tifffile.imwrite(root / "image.tif", image, photometric="minisblack")
    group = create_dataset(root / "in.zarr")
    write_volume(group, "blurred/plane", image, (0.325, 0.325), chunks=(64, 64))
    return root / "map.zarr", root / "image.tif", root / "in.zarr" / "blurred" / "plane", image


def _whole(image: np.ndarray) -> np.ndarray:
    psf_map = _psf_map(SHAPE)
    size = crop_size(node_psfs(psf_map), 1e-4)
    return sv_richardson_lucy(image, node_psfs(psf_map, size), psf_map.centres, ITERATIONS, tv=TV)


def test_stitched_tiff_and_zarr_runs_equal_whole_image_sv_rl(
    inputs: tuple[Path, Path, Path, np.ndarray],
    scheduler: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    psf_map, tif, plane, image = inputs
    whole = _whole(image)
    for name, source in (("tif", tif), ("zarr", plane)):
        out = tmp_path / f"{name}.zarr"
        args = ["rl", "--psf-map", str(psf_map), str(source), "--output", str(out)]
        code, stdout, _ = run_cli([*args, *RUN, "--scheduler", scheduler], capsys)
        assert code == 0 and "9 block(s) computed" in stdout
        array = zarr.open_group(out / "deconvolved" / source.stem, mode="r")
        result = np.asarray(array["0"])
        assert result.shape == SHAPE
        assert np.abs(result - whole).max() <= 1e-4 * whole.max()
        provenance = array.attrs["provenance"]
        assert provenance["psf_map"]["path"] == str(psf_map.absolute())
        assert provenance["processor"]["kind"] == "sv_richardson_lucy"
        assert provenance["processor"]["iterations"] == ITERATIONS
        assert provenance["halo"] == [6 * (provenance["psf_map"]["psf_size"] // 2)] * 2
    code, stdout, _ = run_cli([*args, *RUN, "--scheduler", scheduler, "--resume"], capsys)
    assert code == 0 and "0 block(s) computed, 9 already done" in stdout


def test_2d_blocks_come_from_map_block_not_the_3d_block(
    inputs: tuple[Path, Path, Path, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The 3D RL default block (256³) must not size 2D blocks: the default map_block
    # (1024²) holds this image in one block, and --set map_block shapes the grid.
    psf_map, _, plane, _ = inputs
    args = ["rl", "--psf-map", str(psf_map), str(plane), "--iterations", "1"]
    code, stdout, _ = run_cli([*args, "--output", str(tmp_path / "a.zarr")], capsys)
    assert code == 0 and "1 block(s) computed" in stdout
    code, stdout, _ = run_cli(
        [*args, "--output", str(tmp_path / "b.zarr"), "--set", "map_block=[128, 256]"], capsys
    )
    assert code == 0 and "2 block(s) computed" in stdout


def test_a_map_of_another_grid_is_refused_before_the_output_exists(
    inputs: tuple[Path, Path, Path, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    psf_map, _, _, image = inputs
    small = tmp_path / "small.tif"
    tifffile.imwrite(small, image[:200], photometric="minisblack")
    out = tmp_path / "out.zarr"
    code, _, err = run_cli(
        ["rl", "--psf-map", str(psf_map), str(small), "--output", str(out), *RUN], capsys
    )
    assert_one_line_error(code, err, "estimated on a [256, 256] image")
    assert not out.exists()


def test_a_volume_and_a_map_with_a_psf_are_refused(
    inputs: tuple[Path, Path, Path, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    psf_map, tif, _, _ = inputs
    volume = tmp_path / "volume.tif"
    tifffile.imwrite(volume, np.ones((4, 256, 256), np.float32), photometric="minisblack")
    out = tmp_path / "out.zarr"
    code, _, err = run_cli(
        ["rl", "--psf-map", str(psf_map), str(volume), "--output", str(out)], capsys
    )
    assert_one_line_error(code, err, "deconvolves 2D (Y, X) images")
    assert not out.exists()
    np.save(tmp_path / "psf.npy", np.ones((3, 3, 3), np.float32))
    with pytest.raises(SystemExit) as exit_info:
        main(["rl", "--psf-map", str(psf_map), "--psf", str(tmp_path / "psf.npy"), str(tif),
              "--output", str(out)])  # fmt: skip
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert not out.exists()
