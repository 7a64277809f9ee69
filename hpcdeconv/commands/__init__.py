"""One module per ``hpcdeconv`` verb: ``NAME``, ``HELP``, ``add_arguments(p)``, ``run(args)``.

A verb is listed here only once it works end to end.
"""

from __future__ import annotations

from types import ModuleType

from hpcdeconv.commands import (
    comi,
    deconvolve,
    depth,
    estimate_psf,
    info,
    ingest,
    predict,
    psf,
    psfnet,
    rl,
    simulate,
    sweep,
    train,
)

COMMANDS: tuple[ModuleType, ...] = (
    simulate,
    psf,
    ingest,
    info,
    train,
    sweep,
    predict,
    deconvolve,
    rl,
    estimate_psf,
    depth,
    psfnet,
    comi,
)
