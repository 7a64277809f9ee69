"""Output safety: no command writes into, over or around its inputs, and ``--overwrite``
replaces only what hpcdeconv itself wrote.

Two rules, checked before a command touches the file system:

1. An output may not be, contain, or lie inside any input. An input that is an array inside
   a zarr store counts as its whole store (replacing the store deletes the array), and paths
   are compared with symbolic links resolved.
2. An existing output is replaced only on request (``--overwrite``) and only if hpcdeconv
   wrote it: a zarr store whose root attributes carry the ``hpcdeconv`` key and that holds
   nothing but zarr nodes, a regular file of the output's own kind (a TIFF, ``.npy`` or
   PNG file by its signature), or a training run directory holding only what training
   writes. An empty directory holds nothing to lose and may always be replaced. Anything
   else is refused with one line naming the foreign entry.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from hpcdeconv.errors import InputError, OutputExistsError

#: What an output is: a zarr store, a single file, or a training run directory.
OutputKind = Literal["zarr", "file", "run"]

#: Root attribute that marks a store as written by hpcdeconv (``zarr_io.ROOT_KEY``).
STORE_MARKER = "hpcdeconv"
#: The Software tag (TIFF) / text chunk (PNG) of every image file hpcdeconv writes, so that
#: ``--overwrite`` can tell its own files from a user's file of the same format.
SOFTWARE = "hpcdeconv"

#: Top-level entries of a training run directory, all written by training: the resolved
#: configuration, checkpoints (and DeepSpeed shards), the metrics log, TensorBoard events
#: and the blind method's exported PSF.
RUN_DIR_ENTRIES = frozenset({"config.yaml", "checkpoints", "metrics.jsonl", "tensorboard", "psf"})

_ZARR_METADATA = ("zarr.json", ".zgroup", ".zarray", ".zattrs", ".zmetadata")

#: Leading bytes of the file formats hpcdeconv writes, by suffix: classic and Big TIFF in
#: both byte orders, numpy's ``.npy`` and PNG.
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_MAGIC = {
    ".tif": _TIFF_MAGIC,
    ".tiff": _TIFF_MAGIC,
    ".npy": (b"\x93NUMPY",),
    ".png": (b"\x89PNG\r\n\x1a\n",),
}


def resolved(path: str | Path) -> Path:
    """``path`` made absolute with ``~`` expanded and every symbolic link resolved.

    Raises
    ------
    InputError
        The path runs into a loop of symbolic links.
    """
    try:
        return Path(path).expanduser().resolve()
    except RuntimeError:  # Python < 3.13 reports a symlink loop this way
        raise InputError(f"{path}: symbolic link loop") from None


def _is_zarr_node(directory: Path) -> bool:
    return any((directory / name).is_file() for name in _ZARR_METADATA)


def input_extent(path: str | Path) -> Path:
    """What an input occupies on disk: the root of its zarr store, or the path itself.

    For ``data.zarr/blurred/test000`` this is ``data.zarr``: the topmost directory of the
    unbroken chain of zarr nodes (directories with ``zarr.json``, ``.zgroup`` or
    ``.zarray``) that holds the path.
    """
    path = resolved(path)
    root = path
    for candidate in (path, *path.parents):
        if candidate.is_dir() and _is_zarr_node(candidate):
            root = candidate
        elif candidate != path:
            break
    return root


def _relation(output: Path, extent: Path) -> str | None:
    """How a resolved output overlaps an input's extent, in words, or None."""
    if output == extent:
        return "is"
    if output in extent.parents:
        return "contains"
    if extent in output.parents:
        return "lies inside"
    return None


def check_disjoint(
    outputs: Iterable[tuple[str, Path | None]], inputs: Iterable[tuple[str, Path | None]]
) -> None:
    """Refuse an output that is, contains or lies inside an input, or another output.

    Parameters
    ----------
    outputs
        ``(flag, path)`` pairs, e.g. ``("--output", Path("data.zarr"))``; None is skipped.
    inputs
        ``(what, path)`` pairs, e.g. ``("input", Path("data.zarr/blurred/v0"))`` or
        ``("--checkpoint", run_dir)``; None is skipped.

    Raises
    ------
    InputError
        Naming the output, the input and how they overlap.
    """
    given_inputs = [(what, Path(p)) for what, p in inputs if p is not None]
    given_outputs = [(flag, Path(p)) for flag, p in outputs if p is not None]
    for flag, out in given_outputs:
        target = resolved(out)
        for what, inp in given_inputs:
            subject = "the input" if what == "input" else f"the {what} input"
            relation = _relation(target, resolved(inp))
            if relation is not None:
                overlap = f"{relation} {subject} {inp}"
            else:
                extent = input_extent(inp)
                relation = _relation(target, extent)
                if relation is None:
                    continue
                overlap = f"{relation} {extent}, the zarr store holding {subject} {inp}"
            raise InputError(f"{flag} {out} {overlap}; write the output outside every input")
    for i, (flag, out) in enumerate(given_outputs):
        for other_flag, other in given_outputs[i + 1 :]:
            relation = _relation(resolved(out), resolved(other))
            if relation is not None:
                overlap = f"{relation} {other_flag} {other}"
                raise InputError(f"{flag} {out} {overlap}; choose another path")


# --------------------------------------------------------------------------------------
# What hpcdeconv wrote
# --------------------------------------------------------------------------------------


def _root_attributes(store: Path) -> dict | None:
    """Root attributes of a zarr v3 (``zarr.json``) or v2 (``.zattrs``) store, or None."""
    try:
        if (store / "zarr.json").is_file():
            meta = json.loads((store / "zarr.json").read_text())
            attrs = meta.get("attributes", {}) if isinstance(meta, dict) else None
        elif (store / ".zattrs").is_file():
            attrs = json.loads((store / ".zattrs").read_text())
        else:
            return None
    except (OSError, ValueError):
        return None
    return attrs if isinstance(attrs, dict) else None


def _node_type(directory: Path) -> str | None:
    """``"array"``, ``"group"`` or None (not a zarr node) for a directory."""
    if (directory / ".zarray").is_file():
        return "array"
    if (directory / ".zgroup").is_file():
        return "group"
    try:
        meta = json.loads((directory / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    kind = meta.get("node_type") if isinstance(meta, dict) else None
    return kind if kind in ("array", "group") else None


def _foreign_in_store(store: Path) -> Path | None:
    """The first entry of a zarr store that is not a zarr node, metadata or chunk."""
    for dirpath, dirnames, filenames in os.walk(store):
        here = Path(dirpath)
        kind = _node_type(here)
        if kind == "array":
            dirnames[:] = []  # everything below an array is its chunks
            continue
        for name in sorted(filenames):
            if kind is None or name not in _ZARR_METADATA:
                return here / name
        for name in sorted(dirnames):
            if (here / name).is_symlink():
                return here / name
    return None


def _foreign_in_run_dir(run_dir: Path) -> Path | None:
    """The first top-level entry of a run directory that training does not write."""
    for entry in sorted(run_dir.iterdir()):
        if entry.name not in RUN_DIR_ENTRIES or entry.is_symlink():
            return entry
    return None


def _refuse(path: Path, why: str) -> OutputExistsError:
    return OutputExistsError(
        f"--overwrite refused: {path} {why}; move it away or choose another output"
    )


def _is_own_kind(path: Path) -> bool:
    """Whether a regular file starts like the format its suffix names (unknown: any)."""
    magic = _MAGIC.get(path.suffix.lower())
    if magic is None:
        return True
    with path.open("rb") as fh:
        head = fh.read(max(len(m) for m in magic))
    return head.startswith(magic)


def _software(path: Path) -> str | None:
    """The Software tag of a TIFF or PNG (None when absent or unreadable)."""
    try:
        if path.suffix.lower() == ".png":
            from PIL import Image

            with Image.open(path) as image:
                return image.info.get("Software")
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return tif.pages[0].software or None
    except Exception:  # any unreadable file is simply not ours
        return None


def _written_by_us(path: Path) -> bool:
    """TIFF and PNG files carry our Software tag; ``.npy`` files cannot carry any, so a
    valid ``.npy`` counts as ours (the README says so)."""
    if path.suffix.lower() in (".tif", ".tiff", ".png"):
        return _software(path) == SOFTWARE
    return True


def check_replaceable(path: Path, kind: OutputKind) -> None:
    """Refuse to replace an existing ``path`` that hpcdeconv did not write.

    Parameters
    ----------
    path
        The output; a missing path or an empty directory is always replaceable.
    kind
        ``"zarr"`` (a store created by hpcdeconv), ``"file"`` (a regular file in the format
        its suffix names: TIFF, ``.npy``, PNG) or ``"run"`` (a training run directory).

    Raises
    ------
    OutputExistsError
        One line naming what at ``path`` is foreign.
    """
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_symlink() and not path.exists():
        raise _refuse(path, "is a dangling symbolic link")
    target = resolved(path)
    if target.is_dir() and not any(target.iterdir()):
        return
    if kind == "file":
        if not target.is_file():
            raise _refuse(path, "is not a file")
        if not _is_own_kind(target):
            raise _refuse(path, f"is not a {target.suffix.lower()[1:]} file")
        if not _written_by_us(target):
            raise _refuse(path, f"was not written by hpcdeconv (no Software tag '{SOFTWARE}')")
        return
    if not target.is_dir():
        raise _refuse(path, "is a file, not a directory written by hpcdeconv")
    if kind == "zarr":
        attrs = _root_attributes(target)
        if attrs is None or STORE_MARKER not in attrs:
            why = f"is not a zarr store written by hpcdeconv (no '{STORE_MARKER}' root attribute)"
            raise _refuse(path, why)
        foreign = _foreign_in_store(target)
        if foreign is not None:
            where = foreign.relative_to(target)
            raise _refuse(path, f"holds {where}, which hpcdeconv did not write")
        return
    if not (target / "config.yaml").is_file():
        raise _refuse(path, "is not a training run directory (no config.yaml)")
    foreign = _foreign_in_run_dir(target)
    if foreign is not None:
        raise _refuse(path, f"holds {foreign.name}, which training did not write")


def check_outputs(
    outputs: Iterable[tuple[str, Path | None, OutputKind]],
    inputs: Iterable[tuple[str, Path | None]],
    overwrite: bool | None,
) -> None:
    """Everything a command checks about its outputs before it touches the file system.

    Parameters
    ----------
    outputs
        ``(flag, path, kind)`` per output; None paths are skipped.
    inputs
        ``(what, path)`` per input, see :func:`check_disjoint`.
    overwrite
        True: existing outputs must be replaceable (:func:`check_replaceable`); False: an
        existing output is refused; None: existing outputs are left to the command
        (resuming).

    Raises
    ------
    InputError
        An output overlaps an input or another output.
    OutputExistsError
        An output exists without ``--overwrite``, or cannot be replaced.
    """
    outputs = [o for o in outputs if o[1] is not None]
    check_disjoint(((flag, path) for flag, path, _ in outputs), inputs)
    if overwrite is not None:
        refuse_existing_outputs(outputs, overwrite)


def refuse_existing_outputs(
    outputs: Iterable[tuple[str, Path | None, OutputKind]], overwrite: bool
) -> None:
    """:func:`refuse_existing` for every ``(flag, path, kind)``; None paths are skipped.

    Raises
    ------
    OutputExistsError
        As :func:`refuse_existing`.
    """
    for _, path, kind in outputs:
        if path is not None:
            refuse_existing(path, kind, overwrite)


def refuse_existing(path: Path, kind: OutputKind, overwrite: bool) -> None:
    """An existing output is replaced only with ``overwrite``, and only if hpcdeconv wrote it.

    Raises
    ------
    OutputExistsError
        ``path`` exists (or is a link) without ``overwrite``, or cannot be replaced
        (:func:`check_replaceable`).
    """
    if overwrite:
        check_replaceable(path, kind)
    elif path.exists() or path.is_symlink():
        raise OutputExistsError(f"{path} exists; pass --overwrite to replace it")


def empty_output(path: Path, kind: OutputKind) -> None:
    """Delete what an existing output holds, after :func:`check_replaceable` accepted it.

    A directory is emptied but kept, so a symbolic link to it (e.g. a run directory on a
    scratch file system) still leads to where the new output is written; a file is removed.
    """
    path = Path(path)
    check_replaceable(path, kind)
    if not path.exists():
        return
    target = resolved(path)
    if not target.is_dir():
        target.unlink()
        return
    for entry in target.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
