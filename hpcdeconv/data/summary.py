"""Text summary of any zarr store (``hpcdeconv info``): volumes, chunks, codecs, split.

Reads any zarr v2 or v3 group, array or OME-Zarr image; for an hpcdeconv dataset (see
:mod:`hpcdeconv.data.zarr_io`) it also lists the split and the root attributes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import zarr
import zarr.errors
from dask.utils import format_bytes

from hpcdeconv.data.layout import volume_meta
from hpcdeconv.data.ngff import is_image, read_image_meta
from hpcdeconv.data.zarr_io import ROOT_KEY, check_root_attrs, get_split, image_names
from hpcdeconv.errors import InputError


def _codec_config(codec: Any) -> tuple[str, dict[str, Any]]:
    """Name and settings of a zarr v3 codec or a numcodecs (zarr v2) compressor."""
    if hasattr(codec, "to_dict"):
        spec = codec.to_dict()
        return str(spec.get("name")), dict(spec.get("configuration", {}))
    config = dict(codec.get_config())
    return str(config.pop("id", type(codec).__name__)).lower(), config


def _codec_names(array: zarr.Array) -> str:
    parts = []
    for codec in array.compressors:
        name, config = _codec_config(codec)
        if name == "blosc" and {"cname", "clevel", "shuffle"} <= set(config):
            parts.append(f"blosc({config['cname']},{config['clevel']},{config['shuffle']})")
        else:
            parts.append(name)
    return "+".join(parts) or "none"


def _voxel_text(array: zarr.Array) -> str:
    try:
        voxel = volume_meta(array).voxel_size
    except InputError:
        return "?"
    return "x".join("?" if v is None else f"{v:g}" for v in voxel) + " um"


def _describe_array(name: str, array: zarr.Array) -> str:
    stored = array.nbytes_stored()
    ratio = array.nbytes / stored if stored else float("inf")
    return (
        f"  {name}: shape={tuple(array.shape)} {array.dtype} chunks={tuple(array.chunks)} "
        f"voxel={_voxel_text(array)} codec={_codec_names(array)} "
        f"stored={format_bytes(stored)} ({ratio:.1f}x)"
    )


def _describe_volume(group: zarr.Group, name: str) -> list[str]:
    node = group[name] if name else group
    if isinstance(node, zarr.Array):
        return [_describe_array(name or "(array)", node)]
    meta = read_image_meta(node)
    first = node[meta.paths[0]]
    line = _describe_array(name or "(image)", first)
    levels = [tuple(node[p].shape) for p in meta.paths[1:]]
    extra = f" OME-NGFF {meta.version} axes={''.join(meta.axes)}"
    if levels:
        extra += f" levels={1 + len(levels)} {' '.join(str(s) for s in levels)}"
    return [line + extra]


def describe(path: str | Path) -> str:
    """Multi-line summary of a zarr store for ``hpcdeconv info``.

    Lists every volume (OME-NGFF image or array) with shape, dtype, chunks, voxel size,
    codec and stored size; for an hpcdeconv dataset also the split and the remaining root
    attributes (as compact JSON). Any zarr v2 or v3 group, array or OME-Zarr image works.

    Raises
    ------
    InputError
        ``path`` is missing or not a readable zarr store.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    try:
        node = zarr.open(store=str(path), mode="r")
    except (FileNotFoundError, zarr.errors.BaseZarrError):
        raise InputError(f"{path}: not a readable zarr array or group") from None
    except (ValueError, TypeError, KeyError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: corrupt zarr metadata ({reason})") from None
    version = node.metadata.zarr_format
    if isinstance(node, zarr.Array):
        return "\n".join([f"{path}: zarr v{version} array", _describe_array("(array)", node)])
    check_root_attrs(path, node.attrs.asdict())
    if is_image(node):
        lines = [f"{path}: zarr v{version} OME-NGFF image"]
        return "\n".join(lines + _describe_volume(node, ""))
    names = image_names(node)
    root = node.attrs.asdict().get(ROOT_KEY)
    # PSF samples and PSF maps hold arrays of samples or map nodes, not image volumes.
    kind = root.get("kind") if isinstance(root, Mapping) else None
    what = "arrays" if kind in ("psf_samples", "psf_map") else "volumes"
    lines = [f"{path}: zarr v{version} group, {len(names)} {what}"]
    for name in names:
        lines += _describe_volume(node, name)
    if isinstance(root, Mapping):
        split = get_split(node)
        # A PSF map or an inference output has an empty split: no "split:" line for them.
        if any(split.values()):
            counts = ", ".join(f"{k}={len(v)}" for k, v in split.items())
            lines.append(f"split: {counts}")
            lines += [f"  {k}: {_listed(v)}" for k, v in split.items() if v]
        extra = {k: v for k, v in root.items() if k != "split"}
        lines.append(f"attributes: {json.dumps(extra, separators=(',', ':'), sort_keys=True)}")
    else:
        lines.append(f"(no '{ROOT_KEY}' root attribute: not written by hpcdeconv)")
    return "\n".join(lines)


#: Split members listed by ``info``; a longer split (e.g. a million PSF samples) is cut.
_LISTED = 12


def _listed(ids: list[str]) -> str:
    """``ids`` joined by commas, the first :data:`_LISTED` only when there are more."""
    if len(ids) <= _LISTED:
        return ", ".join(ids)
    return f"{', '.join(ids[:_LISTED])}, … ({len(ids) - _LISTED} more)"
