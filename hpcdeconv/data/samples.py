"""PSF-parameter samples: (patch, parameter vector, validity) for PSF regression.

A samples store is a zarr v3 group::

    <root>/zarr.json   attribute "hpcdeconv": {"format": 1, "kind": "psf_samples",
                       "parameters": [{"name": ..., "unit": ...}, ...],
                       "voxel_size": [dz, dy, dx] or [dy, dx] (µm),
                       "split": {"train": [i, ...], "val": [...], "test": [...]},
                       "psf_model": PSFModel.record() of the model that made them (optional)}
    <root>/patches     (N, C, *S) float32: sample i's image patch, S = (Z, Y, X) or (Y, X)
    <root>/params      (N, P) float32: its P PSF parameters, in the units listed
    <root>/valid       (N, P) bool: whether parameter p is defined for sample i (an
                       undefined one, e.g. the astigmatism angle of a round spot, is
                       left out of the loss and of R²)

``split`` lists sample indices (each at most once, in ``[0, N)``). The patches are chunked
by whole samples, so a random sample reads one small chunk; ``params`` and ``valid`` are
small and read whole.

:class:`~hpcdeconv.data.sample_feed.PSFSampleFeed` feeds a training run from a store.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from hpcdeconv.config import CodecConfig
from hpcdeconv.data.zarr_io import (
    ROOT_KEY,
    SPLITS,
    blosc_codec,
    create_dataset,
    open_dataset,
    update_root_attrs,
)
from hpcdeconv.errors import InputError

KIND = "psf_samples"
PATCHES, PARAMS, VALID = "patches", "params", "valid"
#: Patches are chunked by whole samples, about this many bytes per chunk.
_CHUNK_BYTES = 1 << 16


@dataclass(frozen=True)
class PSFSamples:
    """Samples held in memory (e.g. the validation samples of a run).

    Attributes
    ----------
    patches
        ``(V, C, *S)`` float32.
    params
        ``(V, P)`` float32.
    valid
        ``(V, P)`` bool.
    names, units
        Name and unit of each of the ``P`` parameters.
    """

    patches: np.ndarray
    params: np.ndarray
    valid: np.ndarray
    names: tuple[str, ...]
    units: tuple[str, ...]


def write_psf_samples(
    path: str | Path,
    patches: np.ndarray,
    params: np.ndarray,
    names: Sequence[str],
    units: Sequence[str],
    voxel_size: Sequence[float],
    valid: np.ndarray | None = None,
    split: Mapping[str, Sequence[int]] | None = None,
    codec: CodecConfig = CodecConfig(),  # noqa: B008 - frozen pydantic model, safe default
    overwrite: bool = False,
) -> zarr.Group:
    """Write a PSF-samples store (layout in the module docstring).

    Parameters
    ----------
    path
        Directory of the new zarr v3 group.
    patches
        ``(N, C, *S)`` patches, ``S`` = ``(Z, Y, X)`` or ``(Y, X)``; stored as float32.
    params
        ``(N, P)`` parameter values, in ``units``.
    names, units
        Name and unit of each parameter (``P`` each).
    voxel_size
        Voxel size of the patches per spatial axis in µm.
    valid
        ``(N, P)`` bool; default: every parameter of every sample is defined.
    split
        Sample indices per split (``train``, ``val``, ``test``); default: all for training.
    codec
        Blosc settings of the patches.
    overwrite
        Replace a store hpcdeconv wrote at ``path`` (see
        :func:`~hpcdeconv.data.zarr_io.create_dataset`).

    Returns
    -------
    zarr.Group
        The written group.

    Raises
    ------
    InputError
        Inconsistent shapes, names, units or split.
    OutputExistsError
        ``path`` exists and may not be replaced.
    """
    patches = np.asarray(patches, dtype=np.float32)
    params = np.asarray(params, dtype=np.float32)
    valid = np.ones(params.shape, bool) if valid is None else np.asarray(valid, dtype=bool)
    n = patches.shape[0] if patches.ndim else 0
    split = {"train": range(n)} if split is None else split
    root = _root_attrs(names, units, voxel_size, split)
    _check_layout(Path(path), patches.shape, params.shape, valid.shape, root)
    group = create_dataset(path, overwrite=overwrite)
    per_sample = math.prod(patches.shape[1:]) * 4
    chunk = (max(1, min(n, _CHUNK_BYTES // max(per_sample, 1))), *patches.shape[1:])
    group.create_array(PATCHES, data=patches, chunks=chunk, compressors=blosc_codec(codec))
    group.create_array(PARAMS, data=params)
    group.create_array(VALID, data=valid)
    update_root_attrs(group, **root)
    return group


def _root_attrs(
    names: Sequence[str],
    units: Sequence[str],
    voxel_size: Sequence[float],
    split: Mapping[str, Sequence[int]],
) -> dict[str, Any]:
    if len(names) != len(units):
        raise InputError(f"{len(names)} parameter names but {len(units)} units")
    unknown = set(split) - set(SPLITS)
    if unknown:
        raise InputError(f"unknown split names {sorted(unknown)}; use {list(SPLITS)}")
    return {
        "kind": KIND,
        "parameters": [{"name": str(n), "unit": str(u)} for n, u in zip(names, units, strict=True)],
        "voxel_size": [float(v) for v in voxel_size],
        "split": {name: [int(i) for i in split.get(name, ())] for name in SPLITS},
    }


def _check_layout(
    path: Path,
    patches: tuple[int, ...],
    params: tuple[int, ...],
    valid: tuple[int, ...],
    root: Mapping[str, Any],
) -> None:
    """Raise one InputError line where shapes, parameters, voxel size or split disagree."""
    if len(patches) not in (4, 5):
        raise InputError(
            f"{path}: {PATCHES} of shape {patches} must be (N, C, Y, X) or (N, C, Z, Y, X)"
        )
    n, spatial = patches[0], len(patches) - 2
    p = len(root["parameters"])
    if params != (n, p) or valid != (n, p):
        raise InputError(
            f"{path}: {PARAMS} {params} and {VALID} {valid} must both be (N, P) = ({n}, {p}) "
            f"for {n} patches and {p} named parameters"
        )
    if len(root["voxel_size"]) != spatial or any(v <= 0 for v in root["voxel_size"]):
        raise InputError(
            f"{path}: voxel_size {root['voxel_size']} must be {spatial} positive sizes (µm)"
        )
    seen: set[int] = set()
    for name, indices in root["split"].items():
        bad = [i for i in indices if not 0 <= i < n or i in seen]
        if bad or len(set(indices)) != len(indices):
            raise InputError(
                f"{path}: split '{name}' lists indices outside [0, {n}) or listed twice "
                f"(e.g. {bad[:3] or indices[:3]})"
            )
        seen |= set(indices)


def _read_root(path: Path, group: zarr.Group) -> dict[str, Any]:
    """The root attribute of a samples store, checked against its arrays."""
    root = group.attrs.asdict().get(ROOT_KEY)
    if not isinstance(root, Mapping) or root.get("kind") != KIND:
        raise InputError(f"{path}: not a PSF-samples store (root attribute kind != '{KIND}')")
    try:
        parameters = [(str(p["name"]), str(p["unit"])) for p in root["parameters"]]
        checked = _root_attrs(
            [n for n, _ in parameters],
            [u for _, u in parameters],
            [float(v) for v in root["voxel_size"]],
            {k: [int(i) for i in v] for k, v in root["split"].items()},
        )
    except (KeyError, TypeError, ValueError):
        raise InputError(
            f"{path}: root attribute '{ROOT_KEY}' lacks valid parameters, voxel_size or split"
        ) from None
    shapes = {}
    for name, dtype in ((PATCHES, np.float32), (PARAMS, np.float32), (VALID, np.bool_)):
        node = group.get(name)
        if not isinstance(node, zarr.Array):
            raise InputError(f"{path}: no '{name}' array; a PSF-samples store holds {name}")
        if node.dtype != dtype:
            raise InputError(f"{path}: '{name}' is {node.dtype}, expected {np.dtype(dtype)}")
        shapes[name] = tuple(int(s) for s in node.shape)
    _check_layout(path, shapes[PATCHES], shapes[PARAMS], shapes[VALID], checked)
    if isinstance(root.get("psf_model"), Mapping):
        checked["psf_model"] = dict(root["psf_model"])
    return checked


class PSFSampleStore:
    """Picklable, lazily opened handle of a samples store (opened once per process).

    Parameters
    ----------
    path
        Store directory.

    Raises
    ------
    InputError
        The store is missing or its layout is not the one documented above.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.root = _read_root(self.path, open_dataset(self.path))
        self._reset()

    def _reset(self) -> None:
        self._patches: zarr.Array | None = None
        self._params: np.ndarray | None = None
        self._valid: np.ndarray | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Open stores stay in the process that opened them.
        return {"path": self.path, "root": self.root}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self.root = state["root"]
        self._reset()

    def _open(self) -> None:
        if self._patches is None or self._pid != os.getpid():
            group = open_dataset(self.path)
            patches = group[PATCHES]
            assert isinstance(patches, zarr.Array)
            self._patches = patches
            self._params = np.asarray(group[PARAMS][...], dtype=np.float32)
            self._valid = np.asarray(group[VALID][...], dtype=bool)
            self._pid = os.getpid()

    @property
    def names(self) -> tuple[str, ...]:
        """Parameter names, ``P`` of them."""
        return tuple(p["name"] for p in self.root["parameters"])

    @property
    def units(self) -> tuple[str, ...]:
        """Parameter units, ``P`` of them."""
        return tuple(p["unit"] for p in self.root["parameters"])

    def split(self, name: str) -> list[int]:
        """Sample indices of split ``name`` (``train``, ``val`` or ``test``)."""
        return list(self.root["split"][name])

    def patch_shape(self) -> tuple[int, ...]:
        """``(C, *S)`` of one patch."""
        self._open()
        assert self._patches is not None
        return tuple(int(s) for s in self._patches.shape[1:])

    def read(self, indices: Sequence[int]) -> PSFSamples:
        """Samples ``indices`` (in this order), read into memory."""
        self._open()
        assert self._patches is not None and self._params is not None
        assert self._valid is not None
        order = np.asarray(indices, dtype=np.int64)
        patches = (
            np.stack([np.asarray(self._patches[int(i)]) for i in order])
            if len(order)
            else (np.zeros((0, *self.patch_shape()), np.float32))
        )
        return PSFSamples(
            patches=patches.astype(np.float32, copy=False),
            params=self._params[order],
            valid=self._valid[order],
            names=self.names,
            units=self.units,
        )


# Incremental writing: a store of N samples filled task by task by parallel workers.
#
# ``create_psf_samples`` lays out the arrays empty, chunked by ``chunk`` samples (patches,
# params and valid alike) so that each task writes whole chunks of its own and no two
# workers ever touch one chunk; ``<root>/done`` (T,) bool, one chunk per task, records the
# tasks whose data is written (set after the data, so a killed task is simply redone);
# ``finalise_psf_samples`` writes the split once every task is done. Until then the root
# attribute "complete" is False and the split is empty, so no training run takes a
# half-written store for a dataset.

#: Per-task completion record of an incrementally written store.
DONE = "done"


def task_count(count: int, chunk: int) -> int:
    """Number of tasks (and chunks) of ``chunk`` samples that cover ``count`` samples."""
    return -(-count // chunk)


def create_psf_samples(
    path: str | Path,
    count: int,
    patch_shape: Sequence[int],
    names: Sequence[str],
    units: Sequence[str],
    voxel_size: Sequence[float],
    chunk: int,
    psf_model: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    codec: CodecConfig = CodecConfig(),  # noqa: B008 - frozen pydantic model, safe default
    overwrite: bool = False,
) -> zarr.Group:
    """Create an empty samples store of ``count`` samples, to be filled task by task.

    Parameters
    ----------
    path
        Directory of the new zarr v3 group.
    count
        Number of samples ``N``.
    patch_shape
        ``(C, *S)`` of one patch.
    names, units, voxel_size
        As :func:`write_psf_samples`.
    chunk
        Samples per task and per storage chunk of every array.
    psf_model
        :meth:`~hpcdeconv.psfnet.psf_models.PSFModel.record` of the model, stored as the
        root attribute ``"psf_model"``.
    extra
        Further root attributes (e.g. the generating configuration).
    codec
        Blosc settings of the patches.
    overwrite
        Replace a store hpcdeconv wrote at ``path``.

    Returns
    -------
    zarr.Group
        The new group; its split is empty and ``"complete"`` False until
        :func:`finalise_psf_samples`.

    Raises
    ------
    InputError
        Inconsistent shapes, names or units, or ``chunk < 1``.
    OutputExistsError
        ``path`` exists and may not be replaced.
    """
    if chunk < 1 or count < 1:
        raise InputError(f"{path}: need count >= 1 and chunk >= 1, got {count} and {chunk}")
    p = len(names)
    shape = (int(count), *(int(s) for s in patch_shape))
    root = _root_attrs(names, units, voxel_size, {})
    _check_layout(Path(path), shape, (count, p), (count, p), root)
    group = create_dataset(path, overwrite=overwrite)
    rows = min(chunk, count)
    group.create_array(
        PATCHES,
        shape=shape,
        dtype=np.float32,
        chunks=(rows, *shape[1:]),
        compressors=blosc_codec(codec),
        fill_value=0.0,
    )
    group.create_array(PARAMS, shape=(count, p), dtype=np.float32, chunks=(rows, p), fill_value=0)
    group.create_array(VALID, shape=(count, p), dtype=np.bool_, chunks=(rows, p), fill_value=False)
    tasks = task_count(count, chunk)
    group.create_array(DONE, shape=(tasks,), dtype=np.bool_, chunks=(1,), fill_value=False)
    attrs = {**root, **(extra or {}), "complete": False, "chunk": int(chunk)}
    if psf_model is not None:
        attrs["psf_model"] = dict(psf_model)
    update_root_attrs(group, **attrs)
    return group


def task_range(group: zarr.Group, task: int) -> tuple[int, int]:
    """``[start, stop)`` sample indices of ``task`` in an incrementally written store."""
    patches = group[PATCHES]
    chunk, count = int(patches.chunks[0]), int(patches.shape[0])
    if not 0 <= task < task_count(count, chunk):
        raise ValueError(f"task {task} outside [0, {task_count(count, chunk)})")
    return task * chunk, min(count, (task + 1) * chunk)


def write_psf_task(
    group: zarr.Group, task: int, patches: np.ndarray, params: np.ndarray, valid: np.ndarray
) -> None:
    """Write the samples of ``task`` (whole chunks of every array), then mark it done.

    Parameters
    ----------
    group
        Store open for writing (:func:`create_psf_samples`).
    task
        Task number; its samples are :func:`task_range`.
    patches, params, valid
        ``(n, C, *S)``, ``(n, P)`` and ``(n, P)`` for the ``n`` samples of the task.

    Raises
    ------
    ValueError
        Arrays that are not the task's size.
    """
    start, stop = task_range(group, task)
    n = stop - start
    if patches.shape[0] != n or params.shape[0] != n or valid.shape[0] != n:
        raise ValueError(f"task {task} holds {n} samples, got {patches.shape[0]}")
    group[PATCHES][start:stop] = np.asarray(patches, np.float32)
    group[PARAMS][start:stop] = np.asarray(params, np.float32)
    group[VALID][start:stop] = np.asarray(valid, bool)
    group[DONE][task] = True


def tasks_done(group: zarr.Group) -> np.ndarray:
    """``(T,)`` bool: which tasks of an incrementally written store are done."""
    return np.asarray(group[DONE][...], dtype=bool)


def finalise_psf_samples(group: zarr.Group, split: Mapping[str, Sequence[int]]) -> None:
    """Write the split and mark the store complete, once every task is done.

    Raises
    ------
    InputError
        A task is not done yet, or the split is not valid for the store.
    """
    done = tasks_done(group)
    if not done.all():
        raise InputError(f"{int((~done).sum())} of {done.size} tasks are not done yet")
    root = dict(group.attrs.asdict()[ROOT_KEY])
    checked = _root_attrs(
        [p["name"] for p in root["parameters"]],
        [p["unit"] for p in root["parameters"]],
        root["voxel_size"],
        split,
    )
    count = int(group[PATCHES].shape[0])
    p = len(root["parameters"])
    _check_layout(Path(str(group.store)), group[PATCHES].shape, (count, p), (count, p), checked)
    update_root_attrs(group, split=checked["split"], complete=True)
