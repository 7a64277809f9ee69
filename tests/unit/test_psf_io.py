"""The one PSF-file reader (rl --psf, kernel.file) and the blur layer built from a config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from hpcdeconv.config import KernelConfig
from hpcdeconv.errors import InputError
from hpcdeconv.models.psf_layer import build_psf_layer
from hpcdeconv.physics.psf import gaussian
from hpcdeconv.physics.psf_io import centre_crop, read_psf

PSF = gaussian((7, 9, 11), (1.5, 1.0, 2.0))


def test_npy_reads_as_zyx_without_voxel_size(tmp_path: Path) -> None:
    path = tmp_path / "psf.npy"
    np.save(path, PSF.astype(np.float64))
    data, voxel = read_psf(path)
    assert data.dtype == np.float32
    np.testing.assert_allclose(data, PSF, rtol=1e-7)
    assert voxel == (None, None, None)


def test_npy_voxel_size_given_by_the_user(tmp_path: Path) -> None:
    path = tmp_path / "psf.npy"
    np.save(path, PSF)
    assert read_psf(path, (0.3, 0.1, 0.1))[1] == pytest.approx((0.3, 0.1, 0.1))


def test_imagej_tiff_with_calibration(tmp_path: Path) -> None:
    path = tmp_path / "psf.tif"
    tifffile.imwrite(
        path,
        PSF,
        imagej=True,
        resolution=(1 / 0.08, 1 / 0.08),
        metadata={"spacing": 0.25, "unit": "um", "axes": "ZYX"},
    )
    data, voxel = read_psf(path)
    np.testing.assert_array_equal(data, PSF)
    assert voxel == pytest.approx((0.25, 0.08, 0.08))


def test_ome_tiff_voxel_size_in_nanometres_is_converted(tmp_path: Path) -> None:
    path = tmp_path / "psf.ome.tif"
    tifffile.imwrite(
        path,
        PSF[None, :, None],  # T, Z, C singleton axes around the volume
        ome=True,
        metadata={
            "axes": "TZCYX",
            "PhysicalSizeZ": 200.0,
            "PhysicalSizeZUnit": "nm",
            "PhysicalSizeY": 65.0,
            "PhysicalSizeYUnit": "nm",
            "PhysicalSizeX": 65.0,
            "PhysicalSizeXUnit": "nm",
        },
    )
    data, voxel = read_psf(path)
    np.testing.assert_array_equal(data, PSF)
    assert voxel == pytest.approx((0.2, 0.065, 0.065))


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("missing.tif", None, "no such PSF file"),
        ("garbage.tif", b"not a tiff at all", "garbage.tif"),
        ("flat.npy", np.ones((9, 9), np.float32), "flat.npy"),
        ("psf.txt", b"0 1 0", "psf.txt"),
    ],
)
def test_bad_file_is_one_input_error_line(
    tmp_path: Path, name: str, content: bytes | np.ndarray | None, fragment: str
) -> None:
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError) as info:
        read_psf(path, source="--psf")
    message = str(info.value)
    assert message.startswith("--psf ") and fragment in message
    assert "\n" not in message


def test_kernel_file_initialises_the_blur_layer(tmp_path: Path) -> None:
    path = tmp_path / "psf.tif"
    tifffile.imwrite(path, PSF)
    cfg = KernelConfig(size=(7, 9, 11), init="file", file=path)
    layer = build_psf_layer(cfg, None, learnable=False)
    np.testing.assert_allclose(layer.kernel().detach().numpy(), PSF, rtol=1e-6)
    assert not layer.weight.requires_grad


def test_kernel_file_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "psf.npy"
    np.save(path, PSF)
    cfg = KernelConfig(size=(5, 5, 5), init="file", file=path)
    with pytest.raises(InputError, match="does not match kernel_size"):
        build_psf_layer(cfg, None, learnable=True)


def test_unreadable_kernel_file_names_the_config_key(tmp_path: Path) -> None:
    path = tmp_path / "psf.tif"
    path.write_bytes(b"nonsense")
    cfg = KernelConfig(size=(7, 9, 11), init="file", file=path)
    with pytest.raises(InputError, match=r"^kernel\.file "):
        build_psf_layer(cfg, None, learnable=True)


def test_dataset_init_without_dataset_psf_is_refused() -> None:
    with pytest.raises(InputError, match="no 'psf' array"):
        build_psf_layer(KernelConfig(init="dataset"), None, learnable=True)


def test_centre_crop_keeps_the_centre_for_odd_and_even_sizes() -> None:
    volume = np.arange(7 * 8 * 9, dtype=np.float32).reshape(7, 8, 9)
    cropped = centre_crop(volume, (3, 4, 5))
    assert cropped[1, 2, 2] == volume[3, 4, 4]
    padded = centre_crop(volume, (9, 10, 11))
    assert padded[4, 5, 5] == volume[3, 4, 4] and padded.sum() == volume.sum()
