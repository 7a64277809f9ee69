"""COMI training sets: the BBBC006 folder reader, pairs split by field of view, plane choice,
registration, synthetic defocus, the intensity mapping and colour planes."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from scipy import ndimage

from hpcdeconv.comi.bbbc006 import bbbc006_series
from hpcdeconv.comi.dataset import make_dataset, split_fields
from hpcdeconv.comi.defocus import blur, defocus_psfs
from hpcdeconv.config import build_config
from hpcdeconv.config.comi_data import BBBC006Source, COMIDatasetConfig, COMISplit
from hpcdeconv.config.psfnet import PSFOptics
from hpcdeconv.data.intensity import IntensityMap
from hpcdeconv.data.registration import apply_shift, estimate_shift
from hpcdeconv.data.zarr_io import get_intensity, get_split, open_array, volume_ids
from hpcdeconv.errors import InputError
from hpcdeconv.physics.phantoms import texture_2d

WELLS = ("a01", "b07", "h12", "p24")
SITES = (1, 2)
STAINS = ("w1", "w2")
PLANES = range(12, 21)  # the focus 16 and offsets up to ±4 of BBBC006's 0…33
SHAPE = (24, 32)  # (Y, X): BBBC006's 520 × 696, shrunk


def plane_values(well: str, site: int, stain: str, plane: int) -> np.ndarray:
    """The 16-bit image of one file: texture shared by a field, brightness by plane."""
    seed = [WELLS.index(well), site, STAINS.index(stain)]
    texture = texture_2d(SHAPE, np.random.default_rng(seed), "cells")
    return (500 + 40 * plane + 3000 * texture).astype(np.uint16)


def write_bbbc006(root: Path, planes: range = PLANES) -> Path:
    """A folder laid out as BBBC006: one folder per plane, one TIFF per well, site, stain
    (a made-up uuid after the stain, as in the real file names)."""
    for plane in planes:
        folder = root / f"BBBC006_v1_images_z_{plane:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, (well, site, stain) in enumerate(
            (w, s, c) for w in WELLS for s in SITES for c in STAINS
        ):
            uuid = f"{i:08x}-6432-4f7e-bf58-{plane:012x}"
            name = f"mcf-z-stacks-03212011_{well}_s{site}_{stain}{uuid}.tif"
            tifffile.imwrite(folder / name, plane_values(well, site, stain, plane))
    (root / "BBBC006_v1_counts.csv").write_text("not an image\n")
    return root


@pytest.fixture(scope="module")
def bbbc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bbbc006(tmp_path_factory.mktemp("bbbc") / "BBBC006")


def bbbc_config(root: Path, **source: object) -> COMIDatasetConfig:
    data = {"kind": "bbbc006", "root": str(root), "voxel_size": [0.65, 0.65], **source}
    return build_config(COMIDatasetConfig, {"source": data, "split": {"test": 0.25}})


@pytest.fixture(scope="module")
def bbbc_store(bbbc: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("store") / "bbbc.zarr"
    make_dataset(bbbc_config(bbbc), out)
    return out


def test_bbbc006_reader_finds_fields_planes_stains_and_the_focus(bbbc: Path) -> None:
    cfg = bbbc_config(bbbc)
    assert isinstance(cfg.source, BBBC006Source)
    series = bbbc006_series(cfg.source)
    assert len(series) == len(WELLS) * len(SITES) * len(STAINS)
    assert {s.field for s in series} == {f"{w}_s{s}" for w in WELLS for s in SITES}
    assert {s.name.rsplit("_", 1)[1] for s in series} == set(STAINS)
    first = series[0]
    assert (first.name, first.field, first.focus) == ("a01_s1_w1", "a01_s1", 16)
    assert sorted(first.planes) == [13, 14, 15, 16, 17, 18, 19]  # only what the pairs need
    np.testing.assert_array_equal(first.target(), plane_values("a01", 1, "w1", 16))
    assert first.planes[16].source.endswith(".tif")
    assert "BBBC006_v1_images_z_16" in first.planes[16].source
    only_w2 = bbbc006_series(bbbc_config(bbbc, stains=["w2"]).source)
    assert {s.name.rsplit("_", 1)[1] for s in only_w2} == {"w2"}


def test_bbbc006_missing_plane_is_one_error_line(tmp_path: Path) -> None:
    root = write_bbbc006(tmp_path / "BBBC006", planes=range(13, 20))
    victim = next((root / "BBBC006_v1_images_z_19").glob("*_b07_s2_w2*.tif"))
    victim.unlink()
    with pytest.raises(InputError) as err:
        bbbc006_series(bbbc_config(root).source)
    message = str(err.value)
    assert "\n" not in message
    assert "field b07_s2 stain w2" in message and "no plane 19" in message
    assert "planes present: 13-18" in message
    with pytest.raises(InputError, match="no file of stain"):
        bbbc006_series(bbbc_config(root, stains=["w3"]).source)


def test_a_custom_pattern_reads_another_naming(tmp_path: Path) -> None:
    for field in ("fa", "fb"):
        for plane in range(3):
            tifffile.imwrite(tmp_path / f"{field}-p{plane}.tif", np.full((8, 8), plane, np.uint16))
    cfg = bbbc_config(
        tmp_path, pattern=r"(?P<field>f\w)-p(?P<plane>\d)\.tif", focus=1, offsets=[-1, 1]
    )
    series = bbbc006_series(cfg.source)
    assert [s.name for s in series] == ["fa", "fb"]
    np.testing.assert_array_equal(series[1].target(), np.ones((8, 8)))


def test_split_by_field_never_mixes_fields(bbbc_store: Path) -> None:
    group = zarr.open_group(bbbc_store, mode="r")
    split = get_split(group)
    fields_of: dict[str, set[str]] = {}
    for name, ids in split.items():
        fields_of[name] = set()
        for vid in ids:
            for domain in ("sharp", "blurred"):
                record = group[f"{domain}/{vid}"].attrs["comi"]
                assert record["split"] == name
                fields_of[name].add(record["field"])
            assert vid.startswith(record["field"])  # the id names its field
    assert fields_of["train"] and fields_of["test"]
    assert not fields_of["train"] & fields_of["test"]
    assert not fields_of["train"] & fields_of["val"]
    assert not fields_of["val"] & fields_of["test"]
    # Both stains and every offset of a field are in its split.
    for name, ids in split.items():
        for field in fields_of[name]:
            assert {f"{field}_{c}_z{k}" for c in STAINS for k in (-3, -2, -1, 1, 2, 3)} <= set(ids)
    recorded = group.attrs["hpcdeconv"]["comi_dataset"]["fields"]
    assert {k: set(v) for k, v in recorded.items()} == fields_of
    assert volume_ids(group, "sharp") == volume_ids(group, "blurred")


def test_split_fields_is_seeded_and_keeps_a_training_field() -> None:
    names = [f"f{i:02d}" for i in range(12)]
    split = split_fields(names, COMISplit(), seed=3)
    assert [len(split[k]) for k in ("train", "val", "test")] == [9, 1, 2]
    assert sorted(f for fields in split.values() for f in fields) == names
    assert split == split_fields(list(reversed(names)), COMISplit(), seed=3)
    assert split != split_fields(names, COMISplit(), seed=4)
    with pytest.raises(InputError, match="none for training"):
        split_fields(["a"], COMISplit(test=0.6), seed=0)


def test_a_share_that_rounds_to_no_field_is_said(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="hpcdeconv.comi.dataset"):
        split = split_fields(["a", "b", "c"], COMISplit(test=0.2, val=0.1), seed=0)
    assert [len(split[k]) for k in ("train", "val", "test")] == [2, 0, 1]
    assert [r.getMessage() for r in caplog.records] == [
        "split.val 0.1 of 3 field(s) of view rounds to no val field; give more fields or a "
        "larger share"
    ]


def test_stored_planes_are_the_mapped_source_planes(bbbc: Path, bbbc_store: Path) -> None:
    group = zarr.open_group(bbbc_store, mode="r")
    mapping = get_intensity(group)
    assert mapping is not None
    for vid, plane in (("h12_s2_w2_z-3", 13), ("h12_s2_w2_z2", 18), ("a01_s1_w1_z1", 17)):
        well, site, stain = vid.split("_")[:3]
        raw = plane_values(well, int(site[1:]), stain, plane)
        stored = np.asarray(open_array(group, f"blurred/{vid}")[...])
        np.testing.assert_allclose(stored, mapping.forward(raw), rtol=0, atol=1e-6)
        focus = np.asarray(open_array(group, f"sharp/{vid}")[...])
        np.testing.assert_allclose(
            focus, mapping.forward(plane_values(well, int(site[1:]), stain, 16)), atol=1e-6
        )
        record = group[f"blurred/{vid}"].attrs["comi"]
        assert record["plane"] == plane and record["offset"] == plane - 16
        assert f"BBBC006_v1_images_z_{plane}" in record["source"]
        assert record["shift_yx"] is None  # registration off


def test_recorded_mapping_sends_the_train_focus_percentiles_to_the_target(
    bbbc_store: Path,
) -> None:
    group = zarr.open_group(bbbc_store, mode="r")
    mapping = get_intensity(group)
    assert mapping == IntensityMap.from_record(group.attrs["hpcdeconv"]["intensity"])
    # One stored copy of each training series' focus plane (they repeat per offset).
    train = [v for v in get_split(group)["train"] if v.endswith("_z-3")]
    values = np.concatenate([np.ravel(open_array(group, f"sharp/{v}")[...]) for v in train])
    np.testing.assert_allclose(np.percentile(values, (0.1, 99.9)), (-1.0, 1.0), atol=1e-5)
    test = [v for v in get_split(group)["test"] if v.endswith("_z-3")]
    others = np.concatenate([np.ravel(open_array(group, f"sharp/{v}")[...]) for v in test])
    assert not np.allclose(np.percentile(others, (0.1, 99.9)), (-1.0, 1.0), atol=1e-3)


def textured(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (100 + 1000 * texture_2d(shape, rng, "cells")).astype(np.float64)


def fourier_shifted(image: np.ndarray, shift: tuple[float, float]) -> np.ndarray:
    spectrum = ndimage.fourier_shift(np.fft.fftn(image), shift)
    return np.fft.ifftn(spectrum).real


def test_registration_recovers_a_subpixel_shift() -> None:
    reference = textured((96, 112))
    true = (1.35, -2.7)
    moving = fourier_shifted(reference, true)
    dy, dx = estimate_shift(reference, moving, upsample_factor=20)
    assert abs(dy + true[0]) < 0.1 and abs(dx + true[1]) < 0.1
    registered = apply_shift(moving, (dy, dx))
    inner = (slice(8, -8), slice(8, -8))
    error = np.abs(registered[inner] - reference[inner]).mean()
    assert error < 0.02 * np.abs(reference[inner] - reference.mean()).mean()
    # Channels move together, registered on their sum.
    colour = np.stack([moving, 0.5 * moving, 2.0 * moving])
    assert np.allclose(estimate_shift(np.stack([reference] * 3), colour), (dy, dx), atol=0.05)


def write_stack(path: Path, planes: list[np.ndarray], rgb: bool = False) -> Path:
    data = np.stack(planes).astype(np.uint16)
    if rgb:
        tifffile.imwrite(path, data, photometric="rgb", metadata={"axes": "ZYXS"})
    else:
        tifffile.imwrite(
            path,
            data,
            imagej=True,
            resolution=(1 / 0.5, 1 / 0.5),
            metadata={"spacing": 1.0, "unit": "um", "axes": "ZYX"},
        )
    return path


def test_stacks_register_drifted_planes_and_record_the_shifts(tmp_path: Path) -> None:
    reference = textured((64, 80), seed=5)
    drift = {-1: (0.6, -1.2), 1: (-1.4, 0.8)}
    planes = [fourier_shifted(reference, drift[k]) if k else reference for k in (-1, 0, 1)]
    stack = write_stack(tmp_path / "drift.tif", planes)
    cfg = build_config(
        COMIDatasetConfig,
        {
            "source": {
                "kind": "stacks",
                "stacks": [{"path": str(stack)}, {"path": str(stack), "focus": 1}],
                "focus": 1,
                "offsets": [-1, 1],
                "registration": {"enabled": True},
            },
            "split": {"test": 0.0, "val": 0.0},
        },
    )
    with pytest.raises(InputError, match="would both be field 'drift'"):
        make_dataset(cfg, tmp_path / "out.zarr")
    cfg = cfg.model_copy(
        update={"source": cfg.source.model_copy(update={"stacks": cfg.source.stacks[:1]})}
    )
    make_dataset(cfg, tmp_path / "out.zarr")
    group = zarr.open_group(tmp_path / "out.zarr", mode="r")
    mapping = get_intensity(group)
    assert mapping is not None
    for k in (-1, 1):
        record = group[f"blurred/drift_z{k}"].attrs["comi"]
        assert np.allclose(record["shift_yx"], [-drift[k][0], -drift[k][1]], atol=0.1)
        stored = mapping.inverse(np.asarray(open_array(group, f"blurred/drift_z{k}")[...]))
        inner = (slice(8, -8), slice(8, -8))
        assert np.abs(stored[inner] - reference[inner]).mean() < 5.0  # 16-bit rounding
    assert open_array(group, "sharp/drift_z1").attrs is not None
    assert group["sharp/drift_z1"].attrs["comi"]["plane"] == 1
    # The voxel size comes from the ImageJ metadata.
    assert group["sharp/drift_z1"].attrs["ome"]["multiscales"][0]["datasets"][0][
        "coordinateTransformations"
    ][0]["scale"] == [0.5, 0.5]


def test_rgb_stack_is_stored_with_a_channel_axis(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    planes = [rng.integers(0, 255, (20, 28, 3)) for _ in range(5)]
    stack = write_stack(tmp_path / "rgb.ome.tif", planes, rgb=True)
    cfg = build_config(
        COMIDatasetConfig,
        {
            "source": {
                "kind": "stacks",
                "stacks": [{"path": str(stack), "focus": 2}],
                "offsets": [-2, 2],
                "voxel_size": [0.3, 0.3],
            },
            "split": {"test": 0.0, "val": 0.0},
        },
    )
    make_dataset(cfg, tmp_path / "rgb.zarr")
    group = zarr.open_group(tmp_path / "rgb.zarr", mode="r")
    mapping = get_intensity(group)
    assert mapping is not None
    for domain, plane in (("sharp", 2), ("blurred", 4)):
        stored = np.asarray(open_array(group, f"{domain}/rgb_z2")[...])
        assert stored.shape == (3, 20, 28)
        expected = mapping.forward(np.moveaxis(planes[plane], -1, 0))
        np.testing.assert_allclose(stored, expected, atol=1e-6)
    axes = group["sharp/rgb_z2"].attrs["ome"]["multiscales"][0]["axes"]
    assert [a["name"] for a in axes] == ["c", "y", "x"]


def high_frequency_energy(image: np.ndarray) -> float:
    # A Hann window: the periodic FFT would otherwise see the image's edges as detail.
    window = np.outer(np.hanning(image.shape[0]), np.hanning(image.shape[1]))
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2((image - image.mean()) * window))) ** 2
    ky, kx = np.meshgrid(*(np.fft.fftshift(np.fft.fftfreq(n)) for n in image.shape), indexing="ij")
    return float(spectrum[np.hypot(ky, kx) > 0.15].sum())


def test_stronger_defocus_leaves_less_high_frequency_energy() -> None:
    image = texture_2d((128, 128), np.random.default_rng(1), "cells")
    optics = PSFOptics(psf_size=63)
    strengths = [0.0, 0.3, 0.6, 1.0]
    energies = [high_frequency_energy(blur(image, psf)) for psf in defocus_psfs(optics, strengths)]
    assert all(a > 1.5 * b for a, b in itertools.pairwise(energies)), energies


def test_zero_defocus_reproduces_the_image() -> None:
    image = texture_2d((64, 72), np.random.default_rng(2), "cells")
    optics = PSFOptics(psf_size=31)
    # Strength 0 among others gives the in-focus PSF: the stored target exactly.
    psfs = defocus_psfs(optics, [0.7, 0.0])
    np.testing.assert_allclose(blur(image, psfs[1]), blur(image, defocus_psfs(optics, [0.0])[0]))
    # Sampled coarser than the aperture passes (pixel 1.3 µm at NA 0.45), the in-focus PSF
    # is a single pixel, and strength 0 gives the image back.
    coarse = PSFOptics(psf_size=31, magnification=5.0)
    psf = defocus_psfs(coarse, [0.0])[0]
    assert psf[15, 15] == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(blur(image, psf), image, atol=1e-5)
    rgb = np.stack([image, 2 * image, 3 * image])
    np.testing.assert_allclose(blur(rgb, psf), rgb, atol=1e-5)


def test_synthetic_set_pairs_the_in_focus_target_with_its_defocused_planes(
    tmp_path: Path,
) -> None:
    cfg = build_config(
        COMIDatasetConfig,
        {
            "source": {
                "kind": "synthetic",
                "phantoms": {"count": 3, "shape": [48, 56], "kinds": ["cells", "points"]},
                "draws": 2,
                "strength": [0.5, 1.0],
                "optics": {"psf_size": 31},
                "noise": {"snr_db": 30.0},
            },
            "split": {"test": 0.34, "val": 0.0},
        },
    )
    report = make_dataset(cfg, tmp_path / "syn.zarr")
    assert report.pairs == {"train": 4, "val": 0, "test": 2}
    group = zarr.open_group(tmp_path / "syn.zarr", mode="r")
    assert volume_ids(group, "sharp") == [f"phantom{j:03d}_d{d}" for j in range(3) for d in (0, 1)]
    record = group["blurred/phantom001_d1"].attrs["comi"]
    assert 0.5 <= record["defocus_waves"] <= 1.0 and record["snr_db"] == 30.0
    assert record["source"] == "phantom 1 (points)"
    sharp = np.asarray(open_array(group, "sharp/phantom001_d1")[...])
    blurred = np.asarray(open_array(group, "blurred/phantom001_d1")[...])
    assert sharp.shape == blurred.shape == (48, 56)
    assert high_frequency_energy(blurred) < high_frequency_energy(sharp)


def test_an_ome_zarr_stack_and_a_colour_image_as_is(tmp_path: Path) -> None:
    """An OME-Zarr z-stack (here an image of an hpcdeconv store) is read with its pixel size;
    a synthetic field from the user's RGB image keeps it as the sharp plane (``as_is``)."""
    from hpcdeconv.data.zarr_io import create_dataset, write_volume

    volume = np.stack([textured((20, 24), seed=z) for z in range(4)]).astype(np.float32)
    write_volume(create_dataset(tmp_path / "in.zarr"), "blurred/cell", volume, (1.0, 0.4, 0.4))
    cfg = build_config(
        COMIDatasetConfig,
        {
            "source": {
                "kind": "stacks",
                "stacks": [{"path": str(tmp_path / "in.zarr" / "blurred" / "cell")}],
                "focus": 2,
                "offsets": [-2, 1],
            },
            "split": {"test": 0.0, "val": 0.0},
        },
    )
    make_dataset(cfg, tmp_path / "ngff.zarr")
    group = zarr.open_group(tmp_path / "ngff.zarr", mode="r")
    mapping = get_intensity(group)
    assert mapping is not None and volume_ids(group, "blurred") == ["cell_z-2", "cell_z1"]
    stored = np.asarray(open_array(group, "blurred/cell_z-2")[...])
    np.testing.assert_allclose(mapping.inverse(stored), volume[0], rtol=1e-5)
    assert group["sharp/cell_z1"].attrs["comi"]["source"].endswith("cell[z=2]")

    rgb = (np.random.default_rng(3).random((3, 40, 36)) * 200).astype(np.uint8)
    tifffile.imwrite(tmp_path / "photo.tif", np.moveaxis(rgb, 0, -1), photometric="rgb")
    cfg = build_config(
        COMIDatasetConfig,
        {
            "source": {
                "kind": "synthetic",
                "images": [str(tmp_path / "photo.tif")],
                "phantoms": {"count": 0},
                "draws": 1,
                "optics": {"psf_size": 15},
                "target": "as_is",
            },
        },
    )
    make_dataset(cfg, tmp_path / "photo.zarr")
    group = zarr.open_group(tmp_path / "photo.zarr", mode="r")
    mapping = get_intensity(group)
    assert mapping is not None and get_split(group)["train"] == ["photo_d0"]
    sharp = np.asarray(open_array(group, "sharp/photo_d0")[...])
    np.testing.assert_allclose(sharp, mapping.forward(rgb), atol=1e-6)
    assert np.asarray(open_array(group, "blurred/photo_d0")[...]).shape == (3, 40, 36)
