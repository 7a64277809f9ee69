"""Real microscopy TIFFs (issue 11, sections 2 and 3): axes are read, voxel sizes measured.

Every input is written by tifffile the way ImageJ, Fiji and OME writers store them: ImageJ
hyperstacks with their axes, an RGB image, plain page sequences, OME-TIFF with
``PhysicalSize*`` in each OME length unit. Each reported case asserts the right value.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from hpcdeconv.cli import main
from hpcdeconv.data.ingest import ingest_images
from hpcdeconv.data.layout import volume_meta
from hpcdeconv.data.opener import load, open_image
from hpcdeconv.data.units import micrometres_per
from hpcdeconv.data.zarr_io import read_volume
from hpcdeconv.errors import InputError
from hpcdeconv.inference.output import write_output

SHAPE = (6, 16, 16)


def _imagej(path: Path, data: np.ndarray, axes: str, **calibration: object) -> Path:
    resolution = calibration.pop("resolution", None)
    metadata = {"axes": axes, **calibration}
    tifffile.imwrite(path, data, imagej=True, resolution=resolution, metadata=metadata)
    return path


def _ome(path: Path, data: np.ndarray, axes: str = "ZYX", **sizes: object) -> Path:
    tifffile.imwrite(
        path, data, ome=True, photometric="minisblack", metadata={"axes": axes, **sizes}
    )
    return path


def _volume(shape: tuple[int, ...] = SHAPE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


RL = ["--psf-model", "gaussian", "--set", "psf.shape=[3, 3, 3]", "--set", "psf.sigma=[1, 1, 1]"]
RL += ["--iterations", "1", "--block", "16", "--set", "chunks=[8, 8, 8]"]


# --------------------------------------------------------------------------------------
# Section 2: axes
# --------------------------------------------------------------------------------------


def _non_spatial_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """The three files of the issue, each with the axis that must be named."""
    timelapse = _imagej(tmp_path / "timelapse.tif", _volume((10, 16, 16)), "TYX")
    channels = _imagej(tmp_path / "channels.tif", _volume((3, 16, 16)), "CYX")
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, (_volume((16, 16, 3)) * 255).astype(np.uint8), photometric="rgb")
    return {
        "TYX": (timelapse, "axis T (10 time points) is not spatial"),
        "CYX": (channels, "axis C (3 channels) is not spatial"),
        "YXS": (rgb, "axis S (3 samples per pixel (an RGB image)) is not spatial"),
    }


@pytest.mark.parametrize("axes", ["TYX", "CYX", "YXS"])
def test_non_spatial_axes_are_named_by_the_opener(tmp_path: Path, axes: str) -> None:
    path, message = _non_spatial_inputs(tmp_path)[axes]
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        open_image(path)


@pytest.mark.parametrize(
    ("verb", "axes"),
    [
        (verb, axes)
        for verb in ["ingest", "rl", "deconvolve", "predict", "predict-truth"]
        for axes in ["TYX", "CYX", "YXS"]
        # 2D images with channels are inputs of predict, deconvolve and ingest (2D
        # generators, issue 14; tests/unit/test_predict_2d.py, tests/unit/test_ingest.py).
        if axes == "TYX" or verb == "rl"
    ],
)
def test_every_verb_refuses_non_spatial_axes_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], axes: str, verb: str
) -> None:
    path, message = _non_spatial_inputs(tmp_path)[axes]
    good = _imagej(tmp_path / "good.tif", _volume((16, 16, 16)), "ZYX")
    out = tmp_path / "out.zarr"
    # No checkpoint exists: every input is opened (and refused) before one is needed.
    ckpt = ["--checkpoint", str(tmp_path / "no-run")]
    argv = {
        "ingest": ["ingest", str(path), "--output", str(out), "--voxel-size", "1", "1", "1"],
        "rl": ["rl", str(path), "--output", str(out), *RL],
        "deconvolve": ["deconvolve", str(path), *ckpt, "--output", str(out)],
        "predict": ["predict", str(path), *ckpt, "--output", str(out)],
        "predict-truth": ["predict", str(good), "--truth", str(path), *ckpt, "--output", str(out)],
    }[verb]
    before = path.read_bytes()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    # One plane of these files is 2D: pointing to --time/--channel would lead to a 2nd refusal.
    assert "no Z axis" in err and "--time" not in err and "--channel" not in err
    assert not out.exists() and path.read_bytes() == before


@pytest.mark.parametrize(
    ("axes", "shape", "option"),
    [("TZYX", (2, 8, 16, 16), "--time N"), ("ZCYX", (8, 2, 16, 16), "--channel N")],
)
def test_a_stack_with_a_non_spatial_axis_points_to_the_option_that_takes_one(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    axes: str,
    shape: tuple[int, ...],
    option: str,
) -> None:
    path = _imagej(tmp_path / "stack.tif", _volume(shape), axes)
    out = tmp_path / "out.zarr"
    assert main(["rl", str(path), "--output", str(out), *RL]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and option in err
    flag = option.split()[0]
    assert (
        main(["ingest", str(path), flag, "1", "--output", str(out), "--voxel-size", "1", "1", "1"])
        == 0
    )
    assert open_image(out / "blurred" / "stack").data.shape == (8, 16, 16)


def test_rl_psf_with_a_time_axis_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = _imagej(tmp_path / "beads.tif", _volume(), "ZYX")
    psf = _imagej(tmp_path / "psf.tif", _volume((4, 5, 5)), "TYX")
    out = tmp_path / "out.zarr"
    assert main(["rl", str(image), "--psf", str(psf), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--psf" in err and "axis T (4 time points) is not spatial" in err
    assert not out.exists()


def test_singleton_hyperstack_axes_are_squeezed(tmp_path: Path) -> None:
    data = _volume((1, 6, 1, 16, 16))
    path = _imagej(tmp_path / "tzcyx.tif", data, "TZCYX")
    image = open_image(path)
    assert image.data.shape == (6, 16, 16) and image.plain
    np.testing.assert_array_equal(load(image), data[0, :, 0])


def test_time_and_channel_indices_pick_one_volume(tmp_path: Path) -> None:
    data = _volume((3, 6, 2, 16, 16))
    path = _imagej(tmp_path / "movie.tif", data, "TZCYX", spacing=0.5, unit="um")
    with pytest.raises(InputError, match=r"axis T \(3 time points\)"):
        open_image(path)
    image = open_image(path, select={"T": 2, "C": 1})
    np.testing.assert_array_equal(load(image), data[2, :, 1])
    with pytest.raises(InputError, match="index 3 out of range for axis T of 3"):
        open_image(path, select={"T": 3, "C": 0})

    out = tmp_path / "out.zarr"
    argv = ["ingest", str(path), "--output", str(out), "--time", "1", "--channel", "0"]
    assert main([*argv, "--voxel-size", "0.5", "0.1", "0.1"]) == 0
    volume, meta = read_volume(out, "blurred/movie")
    np.testing.assert_array_equal(volume.compute(scheduler="threads"), data[1, :, 0])
    assert meta.voxel_size == (0.5, 0.1, 0.1)


def test_rgb_channel_is_a_sample(tmp_path: Path) -> None:
    rgb = np.random.default_rng(1).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    path = tmp_path / "rgb_stack.tif"
    tifffile.imwrite(path, rgb, photometric="rgb")
    image = open_image(path, select={"C": 2})
    np.testing.assert_array_equal(load(image), rgb[..., 2])


def test_two_dimensional_and_unnamed_4d_files_are_refused(tmp_path: Path) -> None:
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, _volume((16, 16)))
    with pytest.raises(InputError, match=r"expected a 3D \(Z, Y, X\) stack, got axes YX"):
        open_image(flat)
    four = tmp_path / "four.tif"
    tifffile.imwrite(four, _volume((2, 4, 16, 16)), photometric="minisblack")
    with pytest.raises(InputError, match=r"got axes QQYX .*shape \(2, 4, 16, 16\)"):
        open_image(four)


# --------------------------------------------------------------------------------------
# Section 3: voxel sizes
# --------------------------------------------------------------------------------------


OME_UNITS = [
    ("\u00c5", 1e-4),
    ("nm", 1e-3),
    ("pm", 1e-6),
    ("\u00b5m", 1.0),
    ("mm", 1e3),
    ("cm", 1e4),
    ("dm", 1e5),
    ("m", 1e6),
    ("in", 25_400.0),
    ("thou", 25.4),
    ("ft", 304_800.0),
]


@pytest.mark.parametrize(("unit", "factor"), OME_UNITS)
def test_every_ome_length_unit_converts(tmp_path: Path, unit: str, factor: float) -> None:
    sizes = {"PhysicalSizeZ": 3.0, "PhysicalSizeY": 2.0, "PhysicalSizeX": 1.5}
    sizes |= {f"PhysicalSize{a}Unit": unit for a in "ZYX"}
    path = _ome(tmp_path / "u.ome.tif", np.ones(SHAPE, np.uint16), **sizes)
    assert open_image(path).voxel_size == pytest.approx((3 * factor, 2 * factor, 1.5 * factor))


def test_angstrom_ome_tiff_has_a_voxel_size(tmp_path: Path) -> None:
    """The case of the issue: 2000 x 650 x 650 Å is 0.2 x 0.065 x 0.065 µm."""
    sizes = {"PhysicalSizeZ": 2000, "PhysicalSizeY": 650, "PhysicalSizeX": 650}
    sizes |= {f"PhysicalSize{a}Unit": "\u00c5" for a in "ZYX"}
    path = _ome(tmp_path / "angstrom.ome.tif", np.ones(SHAPE, np.uint16), **sizes)
    out = tmp_path / "out.zarr"
    assert ingest_images([path], out) == ["angstrom"]
    _, meta = read_volume(out, "blurred/angstrom")
    assert meta.voxel_size == pytest.approx((0.2, 0.065, 0.065))


def test_unit_names_of_ngff_and_imagej() -> None:
    assert micrometres_per("angstrom") == pytest.approx(1e-4)
    assert micrometres_per("micrometer") == 1.0
    assert micrometres_per("nanometer") == pytest.approx(1e-3)
    assert micrometres_per("micron") == 1.0
    assert micrometres_per("\\u00B5m") == 1.0
    assert micrometres_per("Mm") == pytest.approx(1e12)  # megametre, not millimetre
    assert micrometres_per("inch") == 25_400.0
    assert micrometres_per("furlong") is None


def test_unsupported_and_non_physical_units(tmp_path: Path) -> None:
    sizes = {"PhysicalSizeX": 2.0, "PhysicalSizeXUnit": "furlong"}
    path = _ome(tmp_path / "f.ome.tif", np.ones(SHAPE, np.uint8), **sizes)
    with pytest.raises(InputError, match=r"unsupported length unit 'furlong'.*--voxel-size"):
        open_image(path)
    # The fix the message names works: sizes given by the user replace the file's.
    assert open_image(path, voxel_size=(0.3, 0.2, 0.1)).voxel_size == (0.3, 0.2, 0.1)
    out = tmp_path / "f.zarr"
    argv = ["ingest", str(path), "--output", str(out), "--voxel-size", "0.3", "0.2", "0.1"]
    assert main(argv) == 0
    sizes = {"PhysicalSizeX": 2.0, "PhysicalSizeXUnit": "pixel", "PhysicalSizeY": 0.1}
    path = _ome(tmp_path / "p.ome.tif", np.ones(SHAPE, np.uint8), **sizes)
    assert open_image(path).voxel_size == (None, pytest.approx(0.1), None)


def test_ome_tiff_with_only_xy_keeps_them(tmp_path: Path) -> None:
    sizes = {"PhysicalSizeX": 0.065, "PhysicalSizeY": 0.07}
    path = _ome(tmp_path / "xy.ome.tif", np.ones(SHAPE, np.uint8), **sizes)
    assert open_image(path).voxel_size == (None, pytest.approx(0.07), pytest.approx(0.065))


def test_imagej_calibration_per_axis(tmp_path: Path) -> None:
    both = _imagej(
        tmp_path / "cal.tif", _volume(), "ZYX", spacing=250, unit="nm", resolution=(1 / 40, 1 / 40)
    )
    assert open_image(both).voxel_size == pytest.approx((0.25, 0.04, 0.04))
    pixels = _imagej(tmp_path / "uncal.tif", _volume(), "ZYX")
    assert open_image(pixels).voxel_size == (None, None, None)


def test_info_on_a_tiff_shows_axes_and_sizes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _ome(tmp_path / "xy.ome.tif", np.ones(SHAPE, np.uint16), PhysicalSizeX=0.1)
    assert main(["info", str(path)]) == 0
    assert "axes ZYX -> ZYX (6, 16, 16) uint16 voxel=?x?x0.1 um" in capsys.readouterr().out


def test_no_metadata_stays_unknown_and_is_told_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "raw.tif"
    tifffile.imwrite(path, _volume())
    with caplog.at_level(logging.WARNING):
        image = open_image(path)
    assert image.voxel_size == (None, None, None)
    warnings = [r for r in caplog.records if "voxel size along Z, Y, X" in r.getMessage()]
    assert len(warnings) == 1
    assert open_image(path, voxel_size=(0.3, 0.1, 0.1)).voxel_size == (0.3, 0.1, 0.1)
    with pytest.raises(InputError, match="three positive sizes"):
        open_image(path, voxel_size=(0.3, 0.0, 0.1))


def test_rl_keeps_unknown_sizes_unknown_and_known_ones(
    tmp_path: Path, scheduler: str, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = tmp_path / "raw.tif"
    tifffile.imwrite(raw, _volume())
    xy = _ome(tmp_path / "xy.ome.tif", _volume(), PhysicalSizeX=0.1, PhysicalSizeY=0.1)
    out = tmp_path / "out.zarr"
    common = [*RL, "--scheduler", scheduler, "--output", str(out)]
    assert main(["rl", str(raw), str(xy), *common]) == 0
    image = zarr.open_group(out / "deconvolved" / "raw", mode="r")
    axes = image.attrs["ome"]["multiscales"][0]["axes"]
    assert all("unit" not in axis for axis in axes)  # nothing claims 1 µm
    assert volume_meta(image["0"]).voxel_size == (None, None, None)
    xy_meta = volume_meta(zarr.open_array(out / "deconvolved" / "xy" / "0", mode="r"))
    assert xy_meta.voxel_size == (None, 0.1, 0.1)

    assert main(["rl", str(raw), *common, "--overwrite", "--voxel-size", "0.3", "0.1", "0.1"]) == 0
    meta = volume_meta(zarr.open_array(out / "deconvolved" / "raw" / "0", mode="r"))
    assert meta.voxel_size == (0.3, 0.1, 0.1)
    capsys.readouterr()


def test_tiff_output_writes_only_known_sizes(tmp_path: Path) -> None:
    data = _volume()
    known = tmp_path / "known.tif"
    write_output(known, data, (0.3, 0.1, 0.1), "v", {}, overwrite=False)
    assert open_image(known).voxel_size == pytest.approx((0.3, 0.1, 0.1))
    part = tmp_path / "part.tif"
    write_output(part, data, (None, 0.1, 0.1), "v", {}, overwrite=False)
    with tifffile.TiffFile(part) as tif:
        assert tif.is_ome and "PhysicalSizeZ" not in tif.ome_metadata
    assert open_image(part).voxel_size == (None, pytest.approx(0.1), pytest.approx(0.1))
    none = tmp_path / "none.tif"
    write_output(none, data, (None, None, None), "v", {}, overwrite=False)
    assert open_image(none).voxel_size == (None, None, None)
    np.testing.assert_array_equal(load(open_image(none)), data)


def test_rl_psf_file_sampling_is_read_and_compared(
    tmp_path: Path, scheduler: str, caplog: pytest.LogCaptureFixture
) -> None:
    image = _imagej(
        tmp_path / "img.tif", _volume(), "ZYX", spacing=0.3, unit="um", resolution=(10, 10)
    )
    psf = np.zeros((3, 3, 3), np.float32)
    psf[1, 1, 1] = 1
    psf_file = _ome(
        tmp_path / "psf.ome.tif",
        psf,
        PhysicalSizeZ=200,
        PhysicalSizeZUnit="nm",
        PhysicalSizeY=50,
        PhysicalSizeYUnit="nm",
        PhysicalSizeX=50,
        PhysicalSizeXUnit="nm",
    )
    out = tmp_path / "out.zarr"
    argv = ["rl", str(image), "--psf", str(psf_file), "--iterations", "1", "--block", "16"]
    argv += ["--set", "chunks=[8, 8, 8]"]
    with caplog.at_level(logging.WARNING):
        assert main([*argv, "--scheduler", scheduler, "--output", str(out)]) == 0
    (warning,) = [r.getMessage() for r in caplog.records if "PSF voxel size" in r.getMessage()]
    # Every axis that differs is named (0.2 vs 0.3, 0.05 vs 0.1 µm), with the flag that fixes it.
    assert "along Z, Y, X" in warning and "--psf-voxel-size" in warning
    provenance = zarr.open_group(out / "deconvolved" / "img", mode="r").attrs["provenance"]
    assert provenance["psf"]["voxel_size"] == pytest.approx([0.2, 0.05, 0.05])

    # A .npy PSF has no sampling of its own: the user is told once.
    caplog.clear()
    npy = tmp_path / "psf.npy"
    np.save(npy, psf)
    argv = ["rl", str(image), "--psf", str(npy), "--iterations", "1", "--block", "16"]
    argv += ["--set", "chunks=[8, 8, 8]", "--scheduler", scheduler]
    with caplog.at_level(logging.WARNING):
        assert main([*argv, "--output", str(tmp_path / "npy.zarr")]) == 0
    unknown = [r for r in caplog.records if "not fully known" in r.getMessage()]
    assert len(unknown) == 1 and "--psf-voxel-size" in unknown[0].getMessage()


def test_psf_file_with_three_x_voxels_reads_back_as_a_volume(tmp_path: Path) -> None:
    # The kind of "RGB guessed from a last axis of 3": every TIFF we write says minisblack.
    out = tmp_path / "thin.tif"
    argv = ["psf", "--model", "gaussian", "--out", str(out), "--set", "psf.shape=[9, 9, 3]"]
    assert main(argv) == 0
    image = open_image(out)
    assert image.data.shape == (9, 9, 3) and "S" not in image.axes
    assert all(size is not None for size in image.voxel_size)


def test_learned_kernel_tiff_keeps_the_voxel_size(tmp_path: Path) -> None:
    from hpcdeconv.models.psf_layer import PSFLayer
    from hpcdeconv.physics.psf_io import export_kernel

    layer = PSFLayer((5, 7, 7), init="gaussian", sigma=1.0)
    export_kernel(layer, tmp_path, (0.2, 0.1, 0.1), None)
    image = open_image(tmp_path / "psf_learned_raw.tif")
    assert image.data.shape == (5, 7, 7)
    assert image.voxel_size == pytest.approx((0.2, 0.1, 0.1))
