"""Folders of single-plane image files named by field, plane and stain (BBBC006).

A regular expression with the named groups ``field``, ``plane`` and (optionally) ``stain``
is matched in full against each file's path below the folder (``/``-separated). The
default is BBBC006's naming (:data:`~hpcdeconv.config.comi_data.BBBC006_PATTERN`; Bray et
al., J Biomol Screen 17:266, 2012; Broad Bioimage Benchmark Collection): 34 folders
``BBBC006_v1_images_z_00`` … ``_z_33`` of planes 2 µm apart, plane 16 in focus, each
holding ``mcf-z-stacks-03212011_<well>_s<site>_w<stain><uuid>.tif`` (696×520, 16 bit).
The field of view is ``<well>_s<site>``; its two stains (w1 Hoechst, w2 phalloidin) are
two series of one field, and so land in one split.
"""

from __future__ import annotations

import re
from pathlib import Path

from hpcdeconv.comi.stacks import (
    FieldSeries,
    Plane,
    check_series,
    open_plane_file,
    pixel_size,
    plane_span,
    sanitise,
)
from hpcdeconv.config.comi_data import BBBC006Source
from hpcdeconv.errors import InputError

__all__ = ["bbbc006_series", "matched_files"]


def matched_files(source: BBBC006Source) -> dict[tuple[str, str], dict[int, Path]]:
    """(field, stain) → plane → file, for the files below ``source.root`` that match.

    Raises
    ------
    InputError
        No such folder, no file matching, a stain not found, or two files for one plane.
    """
    root = source.root
    if not root.is_dir():
        raise InputError(f"{root}: no such folder (source.root)")
    pattern = re.compile(source.pattern)
    found: dict[tuple[str, str], dict[int, Path]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        match = pattern.fullmatch(path.relative_to(root).as_posix())
        if match is None:
            continue
        groups = match.groupdict()
        key = (groups["field"], groups.get("stain") or "")
        try:
            plane = int(groups["plane"])
        except ValueError:
            raise InputError(f"{path}: plane '{groups['plane']}' is not an integer") from None
        other = found.setdefault(key, {}).get(plane)
        if other is not None:
            raise InputError(f"{path} and {other} are both plane {plane} of field {key[0]}")
        found[key][plane] = path
    if not found:
        raise InputError(f"{root}: no file below it matches source.pattern '{source.pattern}'")
    if source.stains is not None:
        stains = sorted({stain for _, stain in found})
        kept = {k: v for k, v in found.items() if k[1] in source.stains}
        if not kept:
            raise InputError(
                f"{root}: no file of stain(s) {', '.join(source.stains)}; stains found: "
                f"{', '.join(stains)}"
            )
        found = kept
    return found


def bbbc006_series(source: BBBC006Source) -> list[FieldSeries]:
    """One series per (field, stain) of a folder of single-plane files.

    Only the planes a pair needs (focus and offsets) are opened.

    Raises
    ------
    InputError
        As :func:`matched_files`, a field without a plane it needs, an unreadable file or one
        that is not a 2D ``(C?, Y, X)`` image, an unknown pixel size, two series of one
        sanitised name, or planes of differing shapes (:func:`check_series`).
    """
    out: list[FieldSeries] = []
    seen: dict[str, tuple[str, str]] = {}
    given = source.voxel_size is not None
    for (field, stain), files in sorted(matched_files(source).items()):
        name = sanitise(f"{field}_{stain}" if stain else field)
        if name in seen:
            raise InputError(f"fields {seen[name]} and {(field, stain)} would both be '{name}'")
        seen[name] = (field, stain)
        where = f"field {field}{f' stain {stain}' if stain else ''} below {source.root}"
        needed = (source.focus, *(source.focus + k for k in source.offsets))
        missing = [p for p in needed if p not in files]
        if missing:
            raise InputError(
                f"{where}: no plane {missing[0]} (the in-focus plane is {source.focus}, "
                f"offsets {list(source.offsets)}); planes present: {plane_span(sorted(files))}"
            )
        planes = {p: Plane(open_plane_file(files[p], given)) for p in needed}
        for p, plane in planes.items():
            if plane.image.dims not in ("YX", "CYX"):
                raise InputError(
                    f"{files[p]}: a plane file holds one 2D image (Y, X) or (C, Y, X); this "
                    f"one has axes {plane.image.dims}"
                )
        focus_image = planes[source.focus].image
        series = FieldSeries(
            name=name,
            field=field,
            focus=source.focus,
            planes=planes,
            offsets=source.offsets,
            voxel_size=pixel_size(focus_image, source.voxel_size, str(files[source.focus])),
            registration=source.registration,
        )
        check_series(series, where)
        out.append(series)
    return out
