"""Reduce a stored array to its ``(Z, Y, X)`` view by the axis letters its file declares.

Singleton axes are dropped and the axes fixed by an index (``--time``/``--channel``) taken;
any other non-spatial axis is refused with one line naming it and how to process it. An
unnamed page axis (tifffile's ``Q``/``I``) is taken as Z when it is the only candidate.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import dask.array as da

from hpcdeconv.data.image import SPATIAL
from hpcdeconv.errors import InputError

__all__ = ["image_view", "spatial_view", "view"]

logger = logging.getLogger(__name__)

#: tifffile's letters for axes whose meaning the file does not state (page sequences).
_UNNAMED = ("Q", "I")
_WHAT = {
    "T": "time points",
    "C": "channels",
    "S": "samples per pixel (an RGB image)",
    "A": "angles",
    "P": "phases",
    "R": "tiles",
    "H": "lifetime bins",
    "E": "lambda bins",
    "L": "exposures",
    "V": "views",
}


def _describe_axis(letter: str, size: int) -> str:
    return f"axis {letter} ({size} {_WHAT.get(letter, 'planes')})"


def _hint(letter: str, has_z: bool) -> str:
    """How to process one plane of a non-spatial axis (or why that cannot help)."""
    if not has_z:
        # Taking one time point or channel of a (T|C, Y, X) file leaves a 2D image.
        return (
            "each of its planes is a 2D (Y, X) image and the file has no Z axis; "
            "the 3D methods need a z-stack"
        )
    option = {"T": "time", "C": "channel", "S": "channel"}.get(letter)
    if option is None:
        return "split the file (e.g. in Fiji) and process each volume separately"
    return (
        f"take one with `hpcdeconv ingest --{option} N` (or split the file, e.g. in Fiji) "
        "and process each separately"
    )


def _index(
    data: da.Array, axes: str, where: str, select: Mapping[str, int]
) -> tuple[list[int | slice], list[str], bool]:
    """The index that takes ``select`` and drops singleton axes of ``data``.

    Returns
    -------
    index, kept, plain
        One entry per axis of ``data``, the letters of the axes left whole, and whether
        the index only drops axes of size one (a plain squeeze).

    Raises
    ------
    InputError
        ``select`` names an axis the file lacks or an index out of range.
    """
    for letter in select:
        if letter not in axes:
            raise InputError(f"{where}: has no axis {letter} to index (axes {axes})")
    index: list[int | slice] = []
    kept: list[str] = []
    plain = True
    for letter, size in zip(axes, data.shape, strict=True):
        if letter in select:
            i = select[letter]
            if not 0 <= i < size:
                raise InputError(f"{where}: index {i} out of range for axis {letter} of {size}")
            index.append(i)
            plain = plain and size == 1
        elif size == 1:
            index.append(0)
        else:
            index.append(slice(None))
            kept.append(letter)
    return index, kept, plain


def spatial_view(
    data: da.Array,
    axes: str,
    where: str,
    select: Mapping[str, int] | None = None,
    kind: str = "stack",
) -> tuple[da.Array, bool]:
    """``data`` reduced to ``(Z, Y, X)`` using its axis letters.

    Parameters
    ----------
    data
        The stored array.
    axes
        One upper-case letter per axis of ``data`` (tifffile convention: T, C, Z, Y, X, S, Q...).
    where
        The file, for messages.
    select
        Index to take along non-spatial axes, e.g. ``{"T": 3, "C": 0}``; ``"C"`` also
        selects the sample of an RGB (``S``) axis when there is no ``C`` axis.
    kind
        What the image is (``"stack"``, ``"PSF"``), for messages.

    Returns
    -------
    view, plain
        The ``(Z, Y, X)`` view and whether it is a plain squeeze of ``data``.

    Raises
    ------
    InputError
        A non-spatial axis longer than one is left, an index is out of range or names an
        axis the file lacks, or fewer/more than three spatial axes remain.
    """
    if len(axes) != data.ndim:
        raise InputError(f"{where}: axes {axes!r} do not match the shape {data.shape}")
    select = dict(select or {})
    if "C" in select and "C" not in axes and "S" in axes:
        select["S"] = select.pop("C")
    index, kept, plain = _index(data, axes, where, select)
    unnamed = [a for a in kept if a in _UNNAMED]
    if unnamed and "Z" not in kept and len(unnamed) == 1:
        # A page sequence without stated meaning: the only reading a 3D method can take.
        logger.info("%s: axis %s (unnamed) taken as Z", where, unnamed[0])
        kept = ["Z" if a in _UNNAMED else a for a in kept]
    for letter in kept:
        if letter not in SPATIAL and letter not in _UNNAMED:
            n = data.shape[axes.index(letter)] if letter in axes else 0
            raise InputError(
                f"{where}: {_describe_axis(letter, n)} is not spatial; hpcdeconv deconvolves "
                f"3D (Z, Y, X) volumes: {_hint(letter, 'Z' in kept)}"
            )
    if sorted(kept) != sorted(SPATIAL) or len(kept) != 3:
        shape = tuple(int(n) for n in data.shape)
        raise InputError(
            f"{where}: expected a 3D (Z, Y, X) {kind}, got axes {''.join(kept) or '-'} after "
            f"dropping singleton axes (stored axes {axes}, shape {shape})"
        )
    view = data[tuple(index)]
    order = [kept.index(a) for a in SPATIAL]
    if order != [0, 1, 2]:
        view = view.transpose(order)
        plain = False
    return view, plain


def view(
    data: da.Array,
    axes: str,
    where: str,
    select: Mapping[str, int] | None,
    kind: str,
    any_rank: bool,
) -> tuple[da.Array, bool, str]:
    """:func:`image_view` with ``any_rank``, else :func:`spatial_view` (dims ``"ZYX"``)."""
    if any_rank:
        return image_view(data, axes, where, select, kind)
    reduced, plain = spatial_view(data, axes, where, select, kind)
    return reduced, plain, "ZYX"


def image_view(
    data: da.Array,
    axes: str,
    where: str,
    select: Mapping[str, int] | None = None,
    kind: str = "stack",
) -> tuple[da.Array, bool, str]:
    """``data`` reduced to ``(C?, Z?, Y, X)``: a 2D or 3D image with an optional channel axis.

    Like :func:`spatial_view`, but Z may be absent and one channel axis (``C``, or ``S``
    of an RGB image) longer than one may stay; it is moved first. An array that names no
    axes and has two is ``(Y, X)``.

    Returns
    -------
    view, plain, dims
        The view, whether it is a plain squeeze of ``data``, and its axes (e.g. ``"CYX"``).

    Raises
    ------
    InputError
        As :func:`spatial_view`, or Y and X are not what remains besides Z and channels.
    """
    if len(axes) != data.ndim:
        raise InputError(f"{where}: axes {axes!r} do not match the shape {data.shape}")
    if data.ndim == 2 and all(a in _UNNAMED for a in axes):
        axes = "YX"
    select = dict(select or {})
    if "C" in select and "C" not in axes and "S" in axes:
        select["S"] = select.pop("C")
    channel = next(
        (a for a in ("C", "S") if a in axes and a not in select and data.shape[axes.index(a)] > 1),
        None,
    )
    if channel is None:
        return _space_view(data, axes, where, select, kind)
    position = axes.index(channel)
    moved = da.moveaxis(data, position, 0)
    rest = axes[:position] + axes[position + 1 :]
    views = [_space_view(moved[c], rest, where, select, kind) for c in range(moved.shape[0])]
    return da.stack([v[0] for v in views]), False, "C" + views[0][2]


def _space_view(
    data: da.Array, axes: str, where: str, select: Mapping[str, int], kind: str
) -> tuple[da.Array, bool, str]:
    """``(Z, Y, X)`` through :func:`spatial_view` when a Z (or unnamed) axis is left, else
    ``(Y, X)``."""
    kept = [a for a, n in zip(axes, data.shape, strict=True) if a not in select and n > 1]
    if "Z" in kept or any(a in _UNNAMED for a in kept):
        reduced, plain = spatial_view(data, axes, where, select, kind)
        return reduced, plain, "ZYX"
    return _yx_view(data, axes, where, select, kind)


def _yx_view(
    data: da.Array, axes: str, where: str, select: Mapping[str, int], kind: str
) -> tuple[da.Array, bool, str]:
    """``data`` reduced to ``(Y, X)`` (an axis-named 2D image)."""
    index, kept, plain = _index(data, axes, where, select)
    for letter in kept:
        if letter not in SPATIAL:
            n = data.shape[axes.index(letter)]
            raise InputError(
                f"{where}: {_describe_axis(letter, n)} is not spatial; images are (Y, X) or "
                "(Z, Y, X), with channels or not, and the file has no Z axis: split it "
                "(e.g. in Fiji) and process each image separately"
            )
    if sorted(kept) != ["X", "Y"]:
        shape = tuple(int(n) for n in data.shape)
        raise InputError(
            f"{where}: expected a 2D (Y, X) or 3D (Z, Y, X) {kind}, got axes "
            f"{''.join(kept) or '-'} after dropping singleton axes (stored axes {axes}, "
            f"shape {shape})"
        )
    reduced = data[tuple(index)]
    if kept != ["Y", "X"]:
        reduced, plain = reduced.T, False
    return reduced, plain, "YX"
