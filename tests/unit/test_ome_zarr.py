"""OME-Zarr in and out (issue 11, section 4).

Inputs are written by the OME-Zarr libraries themselves: ``ome-zarr`` (NGFF 0.4 on zarr v2,
0.5 on zarr v3) and ``ome-zarr-models`` (0.5 with levels ``0``, ``1``), plus bare zarr v2 and
v3 arrays. Every store hpcdeconv writes is validated with ``ome-zarr-models`` and read back
with the ``ome-zarr`` reader (the one napari-ome-zarr uses) at the right scale.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from ome_zarr.format import FormatV04, FormatV05
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from ome_zarr.writer import write_image
from ome_zarr_models.v05.axes import Axis
from ome_zarr_models.v05.image import Image as ImageV05
from pydantic_zarr.v3 import ArraySpec

from hpcdeconv.cli import main
from hpcdeconv.config import ExperimentConfig, load_config
from hpcdeconv.data.layout import array_layout, volume_meta
from hpcdeconv.data.ngff import pyramid_factors
from hpcdeconv.data.opener import load, open_image
from hpcdeconv.data.summary import describe
from hpcdeconv.data.zarr_io import create_dataset, image_names, read_volume, write_volume
from hpcdeconv.errors import InputError
from hpcdeconv.training.engine import train
from tests.conftest import TINY_TRAINING

SHAPE = (6, 16, 20)
VOXEL = (0.5, 0.2, 0.25)


def _volume(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(3).random(shape).astype(np.float32)


def _ome_zarr_py(path: Path, data: np.ndarray, axes: str, fmt: object, zarr_format: int) -> Path:
    """An image written by ome-zarr-py (levels ``s0``, ``s1``), sizes in micrometres."""
    group = zarr.open_group(path, mode="w", zarr_format=zarr_format)
    spatial = dict(zip("zyx", VOXEL, strict=True))
    write_image(
        data,
        group,
        axes=axes,
        fmt=fmt,
        scale_factors=[2],
        scale={a: spatial.get(a, 1.0) for a in axes},
        axes_units={a: "micrometer" for a in "zyx"},
    )
    return path


def _ome_zarr_models(path: Path, data: np.ndarray) -> Path:
    """A 0.5 image built by ome-zarr-models with levels ``0``, ``1`` and sizes in nanometres."""
    specs = [
        ArraySpec.from_array(data, dimension_names=("z", "y", "x")),
        ArraySpec.from_array(data[:, ::2, ::2], dimension_names=("z", "y", "x")),
    ]
    nm = [v * 1000 for v in VOXEL]
    image = ImageV05.new(
        array_specs=specs,
        paths=["0", "1"],
        axes=[Axis(name=a, type="space", unit="nanometer") for a in "zyx"],
        scales=[nm, [nm[0], nm[1] * 2, nm[2] * 2]],
        translations=[None, None],
        name="cells",
    )
    group = image.to_zarr(zarr.storage.LocalStore(path), path="")
    group["0"][...] = data
    group["1"][...] = data[:, ::2, ::2]
    return path


def _inputs(tmp_path: Path, data: np.ndarray) -> dict[str, Path]:
    five = data[None, None]
    return {
        "0.4 on zarr v2, tczyx": _ome_zarr_py(
            tmp_path / "v04.ome.zarr", five, "tczyx", FormatV04(), 2
        ),
        "0.5 on zarr v3, zyx": _ome_zarr_py(tmp_path / "v05.ome.zarr", data, "zyx", FormatV05(), 3),
        "0.5, levels 0/1, nm": _ome_zarr_models(tmp_path / "models.zarr", data),
    }


@pytest.mark.parametrize(
    "kind", ["0.4 on zarr v2, tczyx", "0.5 on zarr v3, zyx", "0.5, levels 0/1, nm"]
)
@pytest.mark.parametrize("level", [False, True])
def test_ome_zarr_images_are_read_with_axes_and_scale(
    tmp_path: Path, kind: str, level: bool
) -> None:
    data = _volume()
    path = _inputs(tmp_path, data)[kind]
    if level:  # IMAGE.zarr/0 (or /s0): the full-resolution array itself
        path = path / sorted(p.name for p in path.iterdir() if p.is_dir())[0]
    image = open_image(path)
    assert image.voxel_size == pytest.approx(VOXEL)
    assert image.data.shape == SHAPE
    np.testing.assert_array_equal(load(image), data)
    assert image.name in ("v04", "v05", "models")


def test_a_time_series_ome_zarr_names_its_time_axis(tmp_path: Path) -> None:
    path = _ome_zarr_py(tmp_path / "movie.zarr", _volume((3, 1, *SHAPE)), "tczyx", FormatV05(), 3)
    with pytest.raises(InputError, match=r"axis T \(3 time points\) is not spatial"):
        open_image(path)
    image = open_image(path, select={"T": 1})
    assert image.data.shape == SHAPE
    # ingest converts the chosen time point of a foreign OME-Zarr into a dataset volume.
    out = tmp_path / "t1.zarr"
    assert main(["ingest", str(path), "--time", "1", "--output", str(out)]) == 0
    volume, meta = read_volume(out, "blurred/movie")
    assert meta.voxel_size == pytest.approx(VOXEL) and volume.shape == SHAPE


def test_bare_zarr_arrays_v2_and_v3(tmp_path: Path) -> None:
    data = _volume()
    v3 = zarr.create_array(
        tmp_path / "v3.zarr", shape=SHAPE, dtype="f4", dimension_names=("z", "y", "x")
    )
    v3[...] = data
    v2 = zarr.create_array(tmp_path / "v2.zarr", shape=SHAPE, dtype="f4", zarr_format=2)
    v2[...] = data
    assert (tmp_path / "v2.zarr" / ".zarray").is_file()
    xr = zarr.create_array(
        tmp_path / "xr.zarr",
        shape=(1, *SHAPE),
        dtype="f4",
        zarr_format=2,
        attributes={"_ARRAY_DIMENSIONS": ["time", "z", "y", "x"]},
    )
    xr[0] = data
    for name in ("v3", "v2", "xr"):
        image = open_image(tmp_path / f"{name}.zarr")
        assert image.voxel_size == (None, None, None)
        np.testing.assert_array_equal(load(image), data)


def test_info_describes_v2_and_v3_stores(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _volume()
    inputs = _inputs(tmp_path, data)
    assert main(["info", str(inputs["0.4 on zarr v2, tczyx"])]) == 0
    out = capsys.readouterr().out
    assert "zarr v2 OME-NGFF image" in out and "OME-NGFF 0.4 axes=tczyx" in out
    assert "voxel=1x1x0.5x0.2x0.25 um" not in out  # t and c are not lengths
    assert "voxel=?x?x0.5x0.2x0.25 um" in out and "levels=2" in out
    plain_v2 = zarr.open_group(tmp_path / "plain2.zarr", mode="w", zarr_format=2)
    plain_v2.create_array("a", shape=(4, 4, 4), dtype="u2")
    assert main(["info", str(tmp_path / "plain2.zarr")]) == 0
    out = capsys.readouterr().out
    assert "zarr v2 group, 1 volumes" in out and "a: shape=(4, 4, 4) uint16" in out
    assert main(["info", str(inputs["0.5, levels 0/1, nm"])]) == 0
    assert "voxel=0.5x0.2x0.25 um" in capsys.readouterr().out


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def check_image(path: Path, voxel: tuple[float | None, ...], levels: int = 1) -> dict:
    """Validate ``path`` with ome-zarr-models and read it with the ome-zarr reader."""
    ImageV05.from_zarr(zarr.open_group(path, mode="r"))  # raises on invalid metadata
    nodes = list(Reader(parse_url(str(path)))())
    node = nodes[0]
    assert len(node.data) == levels
    scale = node.metadata["coordinateTransformations"][0][0]["scale"]
    assert scale == pytest.approx([1.0 if v is None else v for v in voxel])
    units = [axis.get("unit") for axis in node.metadata["axes"]]
    assert units == [None if v is None else "micrometer" for v in voxel]
    return node.metadata


def test_written_volumes_are_valid_ome_zarr_with_a_pyramid(tmp_path: Path) -> None:
    data = _volume((8, 150, 140))
    group = create_dataset(tmp_path / "ds.zarr")
    write_volume(group, "blurred/big", data, VOXEL, chunks=(8, 32, 32))
    write_volume(group, "sharp/partial", _volume(), (None, 0.1, 0.1))
    assert image_names(group) == ["blurred/big", "sharp/partial"]
    check_image(tmp_path / "ds.zarr" / "blurred" / "big", VOXEL, levels=3)
    check_image(tmp_path / "ds.zarr" / "sharp" / "partial", (None, 0.1, 0.1))
    assert pyramid_factors((8, 150, 140)) == [(1, 1, 1), (1, 2, 2), (1, 4, 4)]
    level1 = zarr.open_array(tmp_path / "ds.zarr" / "blurred" / "big" / "1", mode="r")
    expected = data.reshape(8, 75, 2, 70, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(level1[...], expected, rtol=1e-6)
    assert volume_meta(level1).voxel_size == pytest.approx((0.5, 0.4, 0.5))
    # Our own readers take the full resolution and its sizes.
    volume, meta = read_volume(tmp_path / "ds.zarr", "blurred/big")
    assert volume.shape == data.shape and meta.voxel_size == pytest.approx(VOXEL)
    _, partial = read_volume(tmp_path / "ds.zarr", "sharp/partial")
    assert partial.voxel_size == (None, 0.1, 0.1)
    text = describe(tmp_path / "ds.zarr")
    assert "levels=3 (8, 75, 70) (8, 37, 35)" in text and "voxel=?x0.1x0.1 um" in text


def test_simulated_datasets_are_ome_zarr(tiny_dataset: Path) -> None:
    for name in image_names(zarr.open_group(tiny_dataset, mode="r")):
        check_image(tiny_dataset / name, (0.1, 0.1, 0.1))


@pytest.fixture(scope="module")
def run_dir(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ckpt") / "run"
    overrides = [*TINY_TRAINING, f"data.path={tiny_dataset}", f"output={run}"]
    overrides += ["method.name=supervised", "train.steps=2", "method.generator.depth=1"]
    train(load_config(ExperimentConfig, None, overrides), progress=False)
    return run


def test_rl_and_deconvolve_read_ome_zarr_and_write_it(
    tmp_path: Path, scheduler: str, run_dir: Path
) -> None:
    data = _volume((16, 16, 16))
    source = _inputs(tmp_path, data)["0.4 on zarr v2, tczyx"]
    common = ["--scheduler", scheduler, "--block", "16", "--set", "chunks=[8, 8, 8]"]
    rl = ["rl", str(source), "--psf-model", "gaussian", "--set", "psf.shape=[3, 3, 3]"]
    rl += [
        "--set",
        "psf.sigma=[1, 1, 1]",
        "--iterations",
        "1",
        "--set",
        "psf.voxel_size=[0.5, 0.2, 0.25]",
    ]
    assert main([*rl, *common, "--output", str(tmp_path / "rl.zarr")]) == 0
    check_image(tmp_path / "rl.zarr" / "deconvolved" / "v04", VOXEL)
    deconvolve = ["deconvolve", str(source / "s0"), "--checkpoint", str(run_dir), "--halo", "8"]
    assert main([*deconvolve, *common, "--output", str(tmp_path / "dec.zarr")]) == 0
    meta = check_image(tmp_path / "dec.zarr" / "deconvolved" / "v04", VOXEL)
    group = zarr.open_group(tmp_path / "dec.zarr" / "deconvolved" / "v04", mode="r")
    assert group.attrs["provenance"]["command"] == "deconvolve"  # beside the NGFF metadata
    assert meta["name"] == "v04"
    # A TIFF without spatial metadata: the output claims no size at all.
    import tifffile

    raw = tmp_path / "raw.tif"
    tifffile.imwrite(raw, data)
    deconvolve = ["deconvolve", str(raw), "--checkpoint", str(run_dir), "--halo", "8"]
    assert main([*deconvolve, *common, "--output", str(tmp_path / "raw.zarr")]) == 0
    check_image(tmp_path / "raw.zarr" / "deconvolved" / "raw", (None, None, None))


def test_predict_reads_and_writes_ome_zarr(
    tmp_path: Path, run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _volume((16, 16, 16))
    inputs = _inputs(tmp_path, data)
    truth = inputs["0.5 on zarr v3, zyx"]
    out = tmp_path / "pred.zarr"
    argv = ["predict", str(inputs["0.5, levels 0/1, nm"]), "--truth", str(truth)]
    assert main([*argv, "--checkpoint", str(run_dir), "--output", str(out)]) == 0
    assert "PSNR input" in capsys.readouterr().out
    check_image(out / "deconvolved" / "models", VOXEL)
    # A TIFF without metadata and --voxel-size: the given sizes are written.
    import tifffile

    raw = tmp_path / "raw.tif"
    tifffile.imwrite(raw, data)
    out2 = tmp_path / "raw.zarr"
    argv = ["predict", str(raw), "--checkpoint", str(run_dir), "--output", str(out2)]
    assert main(argv) == 0
    check_image(out2 / "deconvolved" / "raw", (None, None, None))
    out3 = tmp_path / "raw3.zarr"
    argv = ["predict", str(raw), "--checkpoint", str(run_dir), "--output", str(out3)]
    assert main([*argv, "--voxel-size", "0.3", "0.1", "0.1"]) == 0
    check_image(out3 / "deconvolved" / "raw", (0.3, 0.1, 0.1))


@pytest.mark.parametrize(
    ("shape", "voxel", "axes"),
    [
        ((3, 8, 150, 140), VOXEL, ("c", "z", "y", "x")),
        ((2, 150, 70), (0.2, 0.25), ("c", "y", "x")),
        ((150, 70), (0.2, 0.25), ("y", "x")),
    ],
)
def test_channel_axes_are_written_c_first_and_valid(
    tmp_path: Path, shape: tuple[int, ...], voxel: tuple[float, ...], axes: tuple[str, ...]
) -> None:
    data = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    group = create_dataset(tmp_path / "ds.zarr")
    write_volume(group, "sharp/img", data, voxel, chunks=(8, 32, 32))
    path = tmp_path / "ds.zarr" / "sharp" / "img"
    image = ImageV05.from_zarr(zarr.open_group(path, mode="r"))  # the community's validator
    ngff_axes = image.ome_attributes.multiscales[0].axes
    assert tuple(a.name for a in ngff_axes) == axes
    channel = axes[0] == "c"
    if channel:
        assert ngff_axes[0].type == "channel" and ngff_axes[0].unit is None
    level0 = zarr.open_array(path / "0", mode="r")
    assert level0.metadata.dimension_names == axes
    if channel:  # every channel of a place in one chunk; only space is downsampled
        assert level0.chunks[0] == shape[0]
        level1 = zarr.open_array(path / "1", mode="r")
        assert level1.shape[0] == shape[0] and level1.shape[-1] == shape[-1] // 2
    volume, meta = read_volume(tmp_path / "ds.zarr", "sharp/img")
    np.testing.assert_array_equal(volume.compute(), data)
    assert meta.axes == axes and meta.has_channels == channel
    assert meta.spatial_voxel_size == pytest.approx(voxel)
    assert meta.voxel_size == ((None,) if channel else ()) + voxel
    assert array_layout(level0) == (len(voxel), shape[0] if channel else 1)
    # The ome-zarr reader (napari's) sees the same axes.
    node = next(iter(Reader(parse_url(str(path)))()))
    assert [a["name"] for a in node.metadata["axes"]] == list(axes)


def test_layout_of_legacy_and_foreign_arrays(tmp_path: Path) -> None:
    root = zarr.open_group(tmp_path / "bare.zarr", mode="w")
    assert array_layout(root.create_array("flat", shape=(4, 5), dtype="f4")) == (2, 1)
    assert array_layout(root.create_array("vol", shape=(4, 5, 6), dtype="f4")) == (3, 1)
    with pytest.raises(InputError, match="4 spatial axes"):
        array_layout(root.create_array("hyper", shape=(2, 4, 5, 6), dtype="f4"))
    data = _volume()
    inputs = _inputs(tmp_path, data)
    timed = zarr.open_array(inputs["0.4 on zarr v2, tczyx"] / "s0", mode="r")
    with pytest.raises(InputError, match="has axes tczyx"):
        array_layout(timed)
    rgb = _ome_zarr_py(tmp_path / "rgb.ome.zarr", data[:3], "cyx", FormatV05(), 3)
    assert array_layout(zarr.open_array(rgb / "s0", mode="r")) == (2, 3)
