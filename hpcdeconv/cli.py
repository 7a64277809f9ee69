"""``hpcdeconv <verb>``: parse arguments, load the configuration, make one call.

Logging is configured here and nowhere else. Errors a user can cause
(:class:`~hpcdeconv.errors.HpcdeconvError`) are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from hpcdeconv import __version__
from hpcdeconv.commands import COMMANDS
from hpcdeconv.errors import HpcdeconvError


def print_error(verb: str, exc: HpcdeconvError) -> None:
    """The one line a user error ends a command with (on standard error).

    Written with its newline in one call: ``print`` writes the text and the newline
    separately, and the ranks of one job share a pipe, so two ranks' lines could be
    joined into one (seen in CI with two mpirun ranks).
    """
    sys.stderr.write(f"hpcdeconv {verb}: error: {exc}\n")
    sys.stderr.flush()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every verb."""
    parser = argparse.ArgumentParser(
        prog="hpcdeconv",
        description="Deep-learning deconvolution for fluorescence microscopy at cluster scale.",
    )
    parser.add_argument("--version", action="version", version=f"hpcdeconv {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for command in COMMANDS:
        p = sub.add_parser(command.NAME, help=command.HELP)
        command.add_arguments(p)
        p.set_defaults(handler=command.run)
    return parser


def configure_logging(verbose: bool) -> None:
    """Log to stderr at INFO (DEBUG with ``verbose``); dask's own chatter at WARNING.

    dask's scheduler and workers log every start, stop and connection at INFO: ~40 lines
    per cluster run that say nothing about the result. ``distributed`` sets its loggers'
    levels from dask's configuration when it is imported, which happens after this
    (inside a command), so the level is set in that configuration, in this process only:
    an environment variable would also reach the SLURM worker jobs submitted from here,
    whose own logs (``slurm-*.out``) must keep saying where each worker started. Local
    worker processes are quiet already (``LocalCluster`` silences them to WARNING).
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:
        import dask

        dask.config.set({"distributed.logging.distributed": "warning"})
        logging.getLogger("distributed").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hpcdeconv`` console script."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        return int(args.handler(args))
    except HpcdeconvError as exc:
        print_error(args.verb, exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
