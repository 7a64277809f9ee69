"""Length units of microscopy metadata (OME, OME-NGFF, ImageJ) converted to micrometres.

OME-XML writes units as symbols (``Å``, ``nm``, ``µm``, ``in``, ...; the ``UnitsLength``
enumeration of the OME schema), OME-NGFF as UDUNITS-2 names (``angstrom``, ``nanometer``,
``micrometer``, ...) and ImageJ as free text (``micron``, ``\\u00B5m``, ``nm``). One table
serves all three; ``pixel`` and ``reference frame`` are valid OME units without a physical
length and are refused by name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

from hpcdeconv.errors import InputError

# Set while a file is read whose voxel size the user gave (--voxel-size): its own units
# are then never used, so one we cannot convert must not stop the read.
_SIZES_GIVEN: ContextVar[bool] = ContextVar("hpcdeconv_voxel_sizes_given", default=False)


@contextlib.contextmanager
def sizes_given_by_user() -> Iterator[None]:
    """Inside the block an unsupported unit reads as unknown (None) instead of an error."""
    token = _SIZES_GIVEN.set(True)
    try:
        yield
    finally:
        _SIZES_GIVEN.reset(token)


# Micrometres per unit, keyed by lower-cased spelling.
_SI_PREFIX_EXPONENT = {
    "y": -24,
    "z": -21,
    "a": -18,
    "f": -15,
    "p": -12,
    "n": -9,
    "µ": -6,
    "m": -3,
    "c": -2,
    "d": -1,
    "": 0,
    "da": 1,
    "h": 2,
    "k": 3,
    "M": 6,
    "G": 9,
    "T": 12,
    "P": 15,
    "E": 18,
    "Z": 21,
    "Y": 24,
}
_SI_PREFIX_NAME = {
    "yocto": -24,
    "zepto": -21,
    "atto": -18,
    "femto": -15,
    "pico": -12,
    "nano": -9,
    "micro": -6,
    "milli": -3,
    "centi": -2,
    "deci": -1,
    "": 0,
    "deca": 1,
    "deka": 1,
    "hecto": 2,
    "kilo": 3,
    "mega": 6,
    "giga": 9,
    "tera": 12,
    "peta": 15,
    "exa": 18,
    "zetta": 21,
    "yotta": 24,
}
_INCH_UM = 25_400.0


def _table() -> dict[str, float]:
    table: dict[str, float] = {}
    for prefix, exponent in _SI_PREFIX_NAME.items():
        for suffix in ("meter", "meters", "metre", "metres"):
            table[prefix + suffix] = 10.0 ** (exponent + 6)
    # Symbols are case-sensitive (mm vs Mm), so they are kept as written.
    symbols = {
        prefix + "m": 10.0 ** (exponent + 6) for prefix, exponent in _SI_PREFIX_EXPONENT.items()
    }
    table.update(symbols)
    micro = 1.0
    table.update(
        {
            "μm": micro,  # greek mu instead of the micro sign
            "um": micro,
            "\\u00b5m": micro,  # ImageJ escapes the micro sign in its ASCII description
            "micron": micro,
            "microns": micro,
            "\u00c5": 1e-4,  # Latin capital A with ring, as OME writes it
            "\u212b": 1e-4,  # the Angstrom sign, as some writers emit it
            "angstrom": 1e-4,
            "angstroms": 1e-4,
            "in": _INCH_UM,
            "inch": _INCH_UM,
            "inches": _INCH_UM,
            "thou": _INCH_UM / 1000,
            "mil": _INCH_UM / 1000,
            "li": _INCH_UM / 12,  # OME "line", 1/12 inch
            "line": _INCH_UM / 12,
            "pt": _INCH_UM / 72,  # typographic point
            "point": _INCH_UM / 72,
            "ft": _INCH_UM * 12,
            "foot": _INCH_UM * 12,
            "feet": _INCH_UM * 12,
            "yd": _INCH_UM * 36,
            "yard": _INCH_UM * 36,
            "mi": _INCH_UM * 63_360,
            "mile": _INCH_UM * 63_360,
            "ua": 1.495978707e17,  # astronomical unit
            "ly": 9.4607304725808e21,  # light year
            "pc": 3.0856775814913673e22,  # parsec
            "parsec": 3.0856775814913673e22,
        }
    )
    return table


_MICROMETRES_PER_UNIT = _table()

#: Units that are valid in OME but carry no physical length.
NON_PHYSICAL_UNITS = ("pixel", "pixels", "reference frame", "referenceframe")


def micrometres_per(unit: str) -> float | None:
    """Micrometres in one ``unit``, or None when the unit is not a known length.

    Parameters
    ----------
    unit
        OME symbol (``"Å"``, ``"nm"``, ``"µm"``, ``"in"``), NGFF name (``"angstrom"``,
        ``"micrometer"``) or ImageJ spelling (``"micron"``, ``"\\u00B5m"``).
    """
    text = unit.strip()
    if text in _MICROMETRES_PER_UNIT:
        return _MICROMETRES_PER_UNIT[text]
    return _MICROMETRES_PER_UNIT.get(text.lower())


def to_micrometres(value: float, unit: str, where: str) -> float | None:
    """``value`` in ``unit`` converted to micrometres; None for ``pixel`` (uncalibrated).

    Raises
    ------
    InputError
        The unit is not a known length; the message names it and ``where``.
    """
    if unit.strip().lower() in NON_PHYSICAL_UNITS:
        return None
    factor = micrometres_per(unit)
    if factor is None and _SIZES_GIVEN.get():
        return None
    if factor is None:
        raise InputError(
            f"{where}: unsupported length unit {unit!r}; give the size in µm with --voxel-size "
            "DZ DY DX (--psf-voxel-size for a --psf file)"
        )
    return float(value) * factor
