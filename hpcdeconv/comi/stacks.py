"""Real focal planes for COMI: z-stacks, one field of view each.

A :class:`FieldSeries` is the planes of one image series of one field of view, by plane
number, each opened lazily through :func:`hpcdeconv.data.opener.open_image` (which reads
axes and voxel size), plus the in-focus plane and the offsets to pair with it; z-stacks
give one each (:func:`stack_series`), folders of single-plane files such as BBBC006 one per
field and stain (:mod:`hpcdeconv.comi.bbbc006`). :func:`check_series` refuses, before
anything is written, a series without its in-focus plane, an offset outside its planes and
planes of differing shapes.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpcdeconv.config.comi_data import RegistrationConfig, StacksSource
from hpcdeconv.data.opener import Image, load, open_image
from hpcdeconv.data.registration import register_to
from hpcdeconv.data.units import sizes_given_by_user
from hpcdeconv.errors import InputError

__all__ = [
    "FieldSeries",
    "Plane",
    "check_series",
    "open_plane_file",
    "pixel_size",
    "plane_span",
    "sanitise",
    "stack_series",
]


def sanitise(name: str) -> str:
    """``name`` usable as a volume id: runs of other characters than ``A-Za-z0-9._-``
    become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "field"


@dataclass(frozen=True)
class Plane:
    """One focal plane: an opened image, or one Z index of an opened stack.

    Attributes
    ----------
    image
        Lazily opened; ``dims`` ``"YX"``/``"CYX"`` (a single plane) or ``"ZYX"``/``"CZYX"``.
    z
        Index along the stack's Z axis; None when the image is the plane.
    """

    image: Image
    z: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """``(C?, Y, X)`` of the plane."""
        shape = tuple(int(n) for n in self.image.data.shape)
        if self.z is None:
            return shape
        at = self.image.dims.index("Z")
        return shape[:at] + shape[at + 1 :]

    @property
    def source(self) -> str:
        """The file, and the Z index within it, for provenance."""
        path = str(Path(self.image.source).resolve())
        return path if self.z is None else f"{path}[z={self.z}]"

    def read(self) -> np.ndarray:
        """The plane, ``(C?, Y, X)`` float32, in the file's values."""
        if self.z is None:
            return load(self.image)
        region = tuple(self.z if a == "Z" else slice(None) for a in self.image.dims)
        return load(self.image, region)


@dataclass(frozen=True)
class FieldSeries:
    """The planes of one image series (stack or stain) of one field of view.

    Attributes
    ----------
    name
        Prefix of its volume ids (sanitised), e.g. ``a01_s1_w1``.
    field
        The field of view: the unit of the train/val/test split.
    focus
        Number of the in-focus plane.
    planes
        Plane number → plane.
    offsets
        Plane numbers relative to ``focus`` to pair with it.
    voxel_size
        ``(dy, dx)`` in µm.
    registration
        Whether and how finely each plane is shifted onto the in-focus one.
    """

    name: str
    field: str
    focus: int
    planes: Mapping[int, Plane]
    offsets: tuple[int, ...]
    voxel_size: tuple[float, float]
    registration: RegistrationConfig

    @property
    def shape(self) -> tuple[int, ...]:
        """``(C?, Y, X)`` of the in-focus plane."""
        return self.planes[self.focus].shape

    def target(self) -> np.ndarray:
        """The in-focus plane, ``(C?, Y, X)`` float32 raw values."""
        return self.planes[self.focus].read()

    def target_record(self) -> dict[str, Any]:
        """Provenance of the in-focus plane."""
        return {"source": self.planes[self.focus].source, "plane": self.focus}

    def pairs(self, target: np.ndarray) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
        """Per offset ``k``: the id suffix ``z<k>``, the (registered) raw plane ``(C?, Y,
        X)`` and its provenance (source, plane, offset, shift ``(dy, dx)`` in pixels)."""
        for k in self.offsets:
            plane = self.planes[self.focus + k]
            data = plane.read()
            shift: list[float] | None = None
            if self.registration.enabled:
                data, found = register_to(target, data, self.registration.upsample_factor)
                shift = [round(found[0], 4), round(found[1], 4)]
            record = {"source": plane.source, "plane": self.focus + k, "offset": k}
            yield f"z{k}", data, {**record, "shift_yx": shift}


def plane_span(numbers: list[int]) -> str:
    """``0-15, 17-33``: sorted integers as runs."""
    runs: list[str] = []
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(runs)


def check_series(series: FieldSeries, where: str) -> None:
    """Refuse a series without its in-focus plane, an offset outside its planes, or
    planes of differing shapes.

    Parameters
    ----------
    series
        The series to check (nothing is read but file headers).
    where
        What the series is, for messages (a stack's path, ``field a01_s1_w1 below R``).

    Raises
    ------
    InputError
        One line naming the series and the plane.
    """
    found = sorted(series.planes)
    span = plane_span(found) if found else "none"
    if series.focus not in series.planes:
        raise InputError(
            f"{where}: no in-focus plane {series.focus} among the planes present ({span})"
        )
    for k in series.offsets:
        if series.focus + k not in series.planes:
            raise InputError(
                f"{where}: offset {k} from the in-focus plane {series.focus} is plane "
                f"{series.focus + k}, not among the planes present ({span})"
            )
    want = series.shape
    for k in series.offsets:
        plane = series.planes[series.focus + k]
        if plane.shape != want:
            raise InputError(
                f"{where}: plane {series.focus + k} is {plane.shape} but the in-focus plane "
                f"{series.focus} is {want}; the planes of one field must be the same size"
            )


def pixel_size(image: Image, given: tuple[float, float] | None, where: str) -> tuple[float, float]:
    """``(dy, dx)`` µm: ``given``, else the file's; refused when neither is known."""
    if given is not None:
        return (float(given[0]), float(given[1]))
    dy, dx = image.voxel_size[1], image.voxel_size[2]
    if dy is None or dx is None:
        raise InputError(
            f"{where}: no pixel size in its metadata; set it with "
            "--set source.voxel_size=[DY,DX] (µm)"
        )
    return (float(dy), float(dx))


def open_plane_file(path: Path, given: bool) -> Image:
    """:func:`~hpcdeconv.data.opener.open_image` (any rank), tolerating a unit the
    configuration's pixel size replaces (``given``)."""
    # A unit of the file that cannot be converted must not stop a read whose pixel size
    # the configuration replaces.
    with sizes_given_by_user() if given else contextlib.nullcontext():
        return open_image(path, warn=False, any_rank=True)


def stack_series(source: StacksSource) -> list[FieldSeries]:
    """One series per z-stack ``(Z, Y, X)`` or ``(C, Z, Y, X)``, each its own field.

    Raises
    ------
    InputError
        An unreadable file, one without a Z axis, an unknown pixel size, two stacks of one
        name, or a failed :func:`check_series`.
    """
    out: list[FieldSeries] = []
    seen: dict[str, Path] = {}
    for entry in source.stacks:
        image = open_plane_file(entry.path, source.voxel_size is not None)
        if "Z" not in image.dims:
            raise InputError(
                f"{entry.path}: a z-stack is (Z, Y, X) or (C, Z, Y, X); this image has "
                f"axes {image.dims} (stored axes {image.axes})"
            )
        name = sanitise(image.name)
        if name in seen:
            raise InputError(f"{entry.path} and {seen[name]} would both be field '{name}'")
        seen[name] = entry.path
        depth = int(image.data.shape[image.dims.index("Z")])
        focus = entry.focus if entry.focus is not None else source.focus
        assert focus is not None  # StacksSource guarantees a focus for every stack
        series = FieldSeries(
            name=name,
            field=name,
            focus=focus,
            planes={z: Plane(image, z) for z in range(depth)},
            offsets=source.offsets,
            voxel_size=pixel_size(image, source.voxel_size, str(entry.path)),
            registration=source.registration,
        )
        check_series(series, f"{entry.path} ({depth} planes)")
        out.append(series)
    return out
