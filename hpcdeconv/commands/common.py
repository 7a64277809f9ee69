"""Argument helpers shared by the ``hpcdeconv`` verbs."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpcdeconv.data.safety import OutputKind

#: Validation metrics printed after training, in display order.
VAL_KEYS = ("psnr_input", "psnr", "ssim_input", "ssim")


def config_inputs(args: argparse.Namespace) -> list[tuple[str, Path | None]]:
    """The ``--config`` file as an input that no output may overlap."""
    return [("--config", getattr(args, "config", None))]


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def add_config_args(p: argparse.ArgumentParser) -> None:
    """``--config FILE`` and repeatable ``--set key=value`` overrides."""
    p.add_argument("--config", type=Path, help="YAML configuration file")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a configuration value, e.g. --set psf.na=1.2 (repeatable)",
    )


@contextmanager
def locked_outputs(
    verb: str,
    outputs: Iterable[tuple[str, Path | None, OutputKind]],
    inputs: Iterable[tuple[str, Path | None]],
    overwrite: bool | None,
) -> Iterator[None]:
    """Check the outputs, and hold a writer lock on each for the body of the ``with``.

    The order keeps every run's data safe: first the outputs are checked against the
    inputs (nothing is touched, so no lock file can land inside an input), then each is
    locked (:class:`~hpcdeconv.data.lock.OutputLock`), and only then is an existing output
    checked for replacement, so a second run sees "being written by ..." and never reads,
    empties or prepares the output of the run that holds it.

    Parameters
    ----------
    verb
        The command, named to a refused second run.
    outputs, inputs, overwrite
        As :func:`hpcdeconv.data.safety.check_outputs`.

    Raises
    ------
    InputError
        An output overlaps an input or another output.
    OutputLockedError
        Another run writes one of the outputs.
    OutputExistsError
        An output exists without ``overwrite``, or cannot be replaced.
    """
    from hpcdeconv.data.lock import OutputLock
    from hpcdeconv.data.safety import check_disjoint, refuse_existing_outputs

    outputs = [(flag, path, kind) for flag, path, kind in outputs if path is not None]
    check_disjoint(((flag, path) for flag, path, _ in outputs), inputs)
    with ExitStack() as stack:
        for _, path, _ in outputs:
            assert path is not None
            stack.enter_context(OutputLock(path, verb))
        if overwrite is not None:
            refuse_existing_outputs(outputs, overwrite)
        yield


def add_checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    """``--checkpoint`` (a file or a run directory) and ``--weights`` (raw or averaged)."""
    p.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="checkpoint file, or run directory (its best checkpoint, else its latest)",
    )
    p.add_argument(
        "--weights",
        choices=("auto", "raw", "ema"),
        default="auto",
        help="G's trained weights or their moving average (train.ema_decay); "
        "auto: the average when the checkpoint has one",
    )


def add_cluster_location_arguments(
    p: argparse.ArgumentParser,
    cluster_help: str = "where the dask workers come from (default: cluster.kind, i.e. local)",
) -> None:
    """``--cluster local|slurm|mpi`` or ``--scheduler ADDRESS``, and ``--workers N``: where
    a verb's dask workers come from (read back by :func:`cluster_location_overrides`)."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--cluster", choices=["local", "slurm", "mpi"], help=cluster_help)
    where.add_argument("--scheduler", metavar="ADDRESS", help="existing scheduler, tcp://host:port")
    p.add_argument("--workers", type=positive_int, help="number of dask workers")


def cluster_location_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` style ``cluster.*`` overrides of :func:`add_cluster_location_arguments`."""
    overrides = []
    if args.cluster is not None:
        overrides.append(f"cluster.kind={args.cluster}")
    if args.scheduler is not None:
        overrides += ["cluster.kind=scheduler", f"cluster.scheduler={args.scheduler}"]
    if args.workers is not None:
        overrides.append(f"cluster.workers={args.workers}")
    return overrides
