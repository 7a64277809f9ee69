"""Joining a distributed run: who this process is, and the torch process group.

:func:`discover` reads who this process is from the environment a launcher left behind,
trying in order

1. torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``),
2. a SLURM job step started by ``srun`` (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``;
   the master is the first host of the step's node list, the port is one SLURM reserved for
   the step or else derived from the job id and the step id, see
   :func:`~hpcdeconv.training.slurm_env.slurm_master_port`),
3. an MPI launch (``mpiexec``), through mpi4py's ``COMM_WORLD``,
4. a single process,

with one reader per launcher in :mod:`hpcdeconv.training.launch_env`. Each launch also names
the run it belongs to (:attr:`DistEnv.run_id`: the SLURM job and step, the torchrun run and
restart, a token rank 0 of an MPI launch broadcasts).
:func:`init_process_group` then joins the torch process group (gloo on CPU, nccl on GPU) in
two stages, each bounded by the timeout: the rendezvous store
(:mod:`hpcdeconv.training.rendezvous`), where every rank checks that the store belongs to its
own run and waits for all ranks, then the process group on a store namespaced by the run.
Whatever goes wrong (master unreachable, port taken, a listener that never answers, another
run's store, missing ranks) ends in a one-line :class:`RendezvousError`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist

from hpcdeconv.errors import ConfigError
from hpcdeconv.training.launch_env import (
    MPI_RANK_VARIABLES,
    DistEnv,
    free_port,
    from_mpi,
    from_slurm,
    from_torchrun,
    int_var,
    is_slurm_step,
    single,
)
from hpcdeconv.training.rendezvous import (
    RendezvousError,
    first_line,
    rendezvous,
    rendezvous_error,
    run_identity,
)

# DistEnv and RendezvousError belong to this module's API: the result of discover() and
# the error init_process_group() raises.
__all__ = [
    "DistEnv",
    "RendezvousError",
    "barrier",
    "destroy",
    "discover",
    "init_process_group",
    "is_main",
]

logger = logging.getLogger(__name__)

Backend = Literal["auto", "gloo", "nccl"]

# Where the world size comes from, for the message when an exported WORLD_SIZE disagrees.
_WORLD_SOURCE = {
    "slurm": "SLURM_NTASKS",
    "mpi": "the MPI world size",
    "single": "a single-process launch (no torchrun, srun or MPI variables)",
}


def discover(env: Mapping[str, str] = os.environ, use_mpi: bool | None = None) -> DistEnv:
    """Find this process's rank from the environment its launcher set.

    Parameters
    ----------
    env
        Environment to read; the process environment by default.
    use_mpi
        ``None`` detects an MPI launch from the variables in
        :data:`~hpcdeconv.training.launch_env.MPI_RANK_VARIABLES`;
        ``True`` asks mpi4py even without them; ``False`` never imports mpi4py (importing it
        initialises MPI). torchrun and SLURM variables take precedence either way.

    Returns
    -------
    DistEnv
        Rank, world size, local rank, rendezvous address and the launcher found.

    Raises
    ------
    ConfigError
        The variables are incomplete, not integers, or contradict each other (for example an
        exported ``WORLD_SIZE`` that differs from ``SLURM_NTASKS``).
    """
    if "RANK" in env:
        found = from_torchrun(env)
    elif is_slurm_step(env):
        found = from_slurm(env)
    elif use_mpi or (use_mpi is None and any(v in env for v in MPI_RANK_VARIABLES)):
        found = from_mpi(env)
    else:
        found = single(env)
    _check_consistent(found, env)
    logger.debug("discovered %s", found)
    return found


#: What init_process_group exports, and what those variables held before (for destroy()).
_EXPORTED = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
_before_export: dict[str, str | None] = {}


def init_process_group(
    dist_env: DistEnv, backend: Backend = "auto", timeout_s: float = 60.0
) -> None:
    """Join the torch process group described by ``dist_env``.

    Exports ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` so
    that libraries reading them (DeepSpeed) agree with this process group, and pins the CUDA
    device of the local rank when CUDA is available. Then, within ``timeout_s``, rank 0 opens
    the rendezvous store (under torchrun the agent has opened it) and writes its run's
    identity, every other rank connects, refuses a store whose identity is not its own run's
    (:attr:`DistEnv.run_id` and the world size) and all wait for every rank to arrive. The
    process group is then built on that store under a prefix named by the run, with
    ``timeout_s`` as its bound on every later collective.

    Parameters
    ----------
    dist_env
        Result of :func:`discover`.
    backend
        ``"auto"`` is nccl when CUDA is available, gloo otherwise.
    timeout_s
        Bound, in seconds, on each stage of the rendezvous and on every later collective.

    Raises
    ------
    ConfigError
        nccl was asked for without CUDA, or this local rank has no GPU.
    RendezvousError
        The master could not be reached, its port was taken, something there accepted the
        connection but never answered, the store there belongs to another run, or not all
        ranks arrived within ``timeout_s``.
    """
    if dist.is_initialized():
        raise RuntimeError("the torch process group is already initialised; call destroy() first")
    resolved = _resolve_backend(backend)
    port = dist_env.master_port or free_port()
    _before_export.update({name: os.environ.get(name) for name in _EXPORTED})
    os.environ.update(
        MASTER_ADDR=dist_env.master_addr,
        MASTER_PORT=str(port),
        RANK=str(dist_env.rank),
        WORLD_SIZE=str(dist_env.world_size),
        LOCAL_RANK=str(dist_env.local_rank),
    )
    if torch.cuda.is_available():
        _pin_device(dist_env.local_rank)
    store = rendezvous(dist_env, port, timeout_s)
    try:
        dist.init_process_group(
            backend=resolved,
            # Keys of the process group live under the run's name: even a store shared by
            # mistake never mixes two runs' ranks.
            store=dist.PrefixStore(f"hpcdeconv/{run_identity(dist_env)}", store),
            rank=dist_env.rank,
            world_size=dist_env.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    except dist.DistError as exc:
        raise rendezvous_error(dist_env, port, timeout_s, first_line(exc)) from exc
    logger.info(
        "rank %d/%d joined the %s process group at %s:%d (%s)",
        dist_env.rank,
        dist_env.world_size,
        resolved,
        dist_env.master_addr,
        port,
        dist_env.run_id,
    )


def destroy() -> None:
    """Leave the process group if one was joined, and put back the variables
    :func:`init_process_group` exported: a later group in this process (the next trial of a
    sweep worker) must be found from its launcher again, not from this group's rank and
    port (whose store may still hold the port)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    for name, value in _before_export.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _before_export.clear()


def is_main() -> bool:
    """Whether this is rank 0, or the only process when no process group exists."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if dist.is_initialized():
        dist.barrier()


def _check_consistent(found: DistEnv, env: Mapping[str, str]) -> None:
    if "WORLD_SIZE" in env and found.launcher != "torchrun":
        explicit = int_var(env, "WORLD_SIZE")
        if explicit != found.world_size:
            raise ConfigError(
                f"WORLD_SIZE={explicit} contradicts {_WORLD_SOURCE[found.launcher]}, "
                f"which gives {found.world_size}"
            )
    if found.world_size < 1 or not 0 <= found.rank < found.world_size:
        raise ConfigError(
            f"rank {found.rank} is outside a world of {found.world_size} ({found.launcher})"
        )
    if found.local_rank < 0:
        raise ConfigError(f"local rank {found.local_rank} is negative ({found.launcher})")
    if found.world_size > 1 and not 0 < found.master_port < 65536:
        raise ConfigError(f"master port {found.master_port} is not a TCP port ({found.launcher})")


def _resolve_backend(backend: Backend) -> Literal["gloo", "nccl"]:
    cuda = torch.cuda.is_available()
    if backend == "auto":
        return "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise ConfigError("backend 'nccl' needs CUDA, and no GPU is visible; use 'gloo'")
    if backend not in ("gloo", "nccl"):
        raise ConfigError(f"unknown backend {backend!r}; expected 'auto', 'gloo' or 'nccl'")
    return backend


def _pin_device(local_rank: int) -> None:
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(f"local rank {local_rank} has no GPU: only {count} are visible")
    torch.cuda.set_device(local_rank)
