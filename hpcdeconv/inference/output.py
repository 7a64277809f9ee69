"""Where inference writes: one image to TIFF / ``.npy`` / zarr (``predict``), and the
output store of a block-wise run (``deconvolve``, ``rl``) prepared before any block runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import tifffile
import zarr

from hpcdeconv.config import CodecConfig
from hpcdeconv.data.ngff import VoxelSize, create_image
from hpcdeconv.data.opener import TIFF_SUFFIXES
from hpcdeconv.data.safety import SOFTWARE
from hpcdeconv.data.zarr_io import blosc_codec, create_dataset, open_dataset, write_volume
from hpcdeconv.errors import InputError, OutputExistsError
from hpcdeconv.inference.manifest import Manifest
from hpcdeconv.inference.sources import OUTPUT_GROUP, VolumeSource

if TYPE_CHECKING:
    from hpcdeconv.inference.plan import BlockPlan
    from hpcdeconv.inference.processors import BlockProcessor

OutputMode = Literal["new", "overwrite", "resume"]


# --------------------------------------------------------------------------------------
# One image (predict)
# --------------------------------------------------------------------------------------


def write_tiff(path: Path, data: np.ndarray, voxel_size: VoxelSize, axes: str = "ZYX") -> None:
    """Write ``data`` as float32 TIFF recording only the voxel sizes that are known.

    Parameters
    ----------
    path
        ``.tif``/``.tiff`` file.
    data
        Image with axes ``axes``, e.g. ``(Z, Y, X)``, ``(Y, X)`` or ``(C, Y, X)``.
    voxel_size
        Voxel size (µm) of each spatial axis of ``axes`` (C left out); None where unknown.
    axes
        Axes of ``data``.

    Fully known sizes give an ImageJ hyperstack (calibrated in Fiji as it opens). With an
    unknown axis the file is an OME-TIFF whose ``PhysicalSize`` is written for the known
    axes only: ImageJ metadata cannot leave one axis uncalibrated (Fiji would show 1 µm).
    """
    image = np.asarray(data, dtype=np.float32)
    sizes = dict(zip(axes.replace("C", ""), voxel_size, strict=True))
    if all(v is not None for v in sizes.values()):
        metadata: dict[str, Any] = {"unit": "um", "axes": axes}
        if "Z" in sizes:
            metadata["spacing"] = sizes["Z"]
        tifffile.imwrite(
            path,
            image,
            imagej=True,
            software=SOFTWARE,  # lets --overwrite tell our files from a user's
            photometric="minisblack",  # never guess RGB from a last axis of 3 or 4
            resolution=(1.0 / sizes["X"], 1.0 / sizes["Y"]),
            metadata=metadata,
        )
        return
    metadata = {"axes": axes}
    for axis, size in sizes.items():
        if size is not None:
            metadata[f"PhysicalSize{axis}"] = float(size)
            metadata[f"PhysicalSize{axis}Unit"] = "\u00b5m"
    tifffile.imwrite(
        path, image, ome=True, software=SOFTWARE, photometric="minisblack", metadata=metadata
    )


def write_output(
    path: Path,
    data: np.ndarray,
    voxel_size: VoxelSize,
    name: str,
    attrs: dict[str, Any],
    overwrite: bool,
    axes: str = "ZYX",
) -> str:
    """Write ``data`` to ``.tif``/``.tiff``/``.npy`` or into a new zarr store.

    A ``.zarr`` output holds the OME-NGFF 0.5 image ``deconvolved/<name>`` (a channel axis
    first is stored as the NGFF axis ``"c"``); voxel sizes
    that are None stay unknown in every format (no size is invented). ``voxel_size`` and
    ``axes`` are as in :func:`write_tiff`. The caller has refused an existing output it
    may not replace (:func:`hpcdeconv.commands.common.locked_outputs`, under the lock).

    Returns a description of where it went.

    Raises
    ------
    InputError
        An unknown suffix.
    """
    suffix = path.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        write_tiff(path, data, voxel_size, axes)
        return str(path)
    if suffix == ".npy":
        np.save(path, data.astype(np.float32))
        return str(path)
    if suffix == ".zarr":
        group = create_dataset(path, overwrite=overwrite)
        write_volume(group, f"{OUTPUT_GROUP}/{name}", data, voxel_size, attrs=attrs)
        return f"{path}/{OUTPUT_GROUP}/{name}"
    raise InputError(f"--output must end in .tif, .tiff, .npy or .zarr, got {path.name}")


# --------------------------------------------------------------------------------------
# The output store of a block-wise run (deconvolve, rl)
# --------------------------------------------------------------------------------------


def _contains(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def check_output(output: Path, sources: Sequence[VolumeSource], mode: OutputMode) -> None:
    """Refuse an output that is not ``.zarr``, overlaps an input, or exists (mode ``new``).

    Raises
    ------
    InputError
        Not ``.zarr``, or overlapping an input.
    OutputExistsError
        The output exists in mode ``new``.
    """
    output = Path(output).absolute()
    for source in sources:
        if _contains(output, source.path) or _contains(source.path, output):
            raise InputError(f"input {source.path} and output {output} overlap; choose another")
    if output.suffix != ".zarr":
        raise InputError(f"--output must be a .zarr directory, got {output.name}")
    if mode == "new" and (output.exists() or output.is_symlink()):
        raise OutputExistsError(
            f"{output} exists; pass --overwrite to replace it or --resume to continue it"
        )


def _create_arrays(
    group: zarr.Group,
    sources: Sequence[VolumeSource],
    plan: BlockPlan,
    provenance: Mapping[str, Any],
) -> None:
    for source in sources:
        # An OME-NGFF 0.5 image per input; blocks write its level 0.
        create_image(
            group,
            f"{OUTPUT_GROUP}/{source.name}",
            source.shape,
            plan.chunks_for(source.shape),
            blosc_codec(CodecConfig()),
            source.spatial_voxel_size,
            {"provenance": {**provenance, "input": str(source.path)}},
        )


def prepare_output(
    output: Path,
    sources: Sequence[VolumeSource],
    plan: BlockPlan,
    fingerprint: Mapping[str, Any],
    provenance: Mapping[str, Any],
    mode: OutputMode,
) -> Manifest:
    """Create the output group and its arrays, or reopen them to resume.

    ``resume`` of an output that does not exist starts a new one.
    """
    output = Path(output)
    if mode == "resume" and output.exists():
        return Manifest.resume(open_dataset(output, mode="r+"), fingerprint)
    group = create_dataset(output, overwrite=mode == "overwrite")
    _create_arrays(group, sources, plan, provenance)
    manifest = Manifest(group, fingerprint, provenance)
    manifest.flush()
    return manifest


def run_fingerprint(
    sources: Sequence[VolumeSource], plan: BlockPlan, processor: BlockProcessor
) -> dict[str, Any]:
    """Everything a resumed run must share with the run it continues."""
    return {
        "inputs": [{"name": s.name, "path": str(s.path), "shape": list(s.shape)} for s in sources],
        "block": list(plan.block),
        "halo": list(plan.halo),
        "chunks": list(plan.chunks),
        "processor": processor.fingerprint,
    }
