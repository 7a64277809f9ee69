"""Rank discovery for the launchers hpcdeconv runs under, and process-group set-up.

Nothing here knows about training. :func:`discover` reads who this process is from the
environment a launcher left behind, trying in order

1. torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``),
2. a SLURM job step started by ``srun`` (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``;
   the master is the first host of ``SLURM_JOB_NODELIST``, the port is derived from the job
   id),
3. an MPI launch (``mpiexec``), through mpi4py's ``COMM_WORLD``,
4. a single process.

:func:`init_process_group` then joins the torch process group (gloo on CPU, nccl on GPU) and
turns a rendezvous that cannot complete into a one-line :class:`RendezvousError`.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist

from hpcdeconv.errors import ConfigError, HpcdeconvError

__all__ = [
    "DistEnv",
    "RendezvousError",
    "barrier",
    "destroy",
    "discover",
    "expand_hostlist",
    "init_process_group",
    "is_main",
    "slurm_master_port",
]

logger = logging.getLogger(__name__)

Launcher = Literal["single", "torchrun", "slurm", "mpi"]
Backend = Literal["auto", "gloo", "nccl"]

# Variables an MPI process manager sets in every rank it starts: Open MPI, MPICH/Hydra and
# Intel MPI (PMI_RANK, MPI_LOCALRANKID), and PMIx-based launchers.
MPI_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MPI_LOCALRANKID")
SLURM_PORT_BASE = 10000
SLURM_PORT_SPAN = 50000
_TORCHRUN_VARIABLES = ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Where the world size comes from, for the message when an exported WORLD_SIZE disagrees.
_WORLD_SOURCE = {
    "slurm": "SLURM_NTASKS",
    "mpi": "the MPI world size",
    "single": "a single-process launch (no torchrun, srun or MPI variables)",
}
_BRACKET_GROUP = re.compile(r"^(?P<prefix>[^\[\]]*)\[(?P<ranges>[^\[\]]*)\](?P<rest>.*)$")


class RendezvousError(HpcdeconvError):
    """The process group could not be joined: master unreachable, port taken, ranks missing."""


@dataclass(frozen=True)
class DistEnv:
    """Who this process is in a distributed run.

    Attributes
    ----------
    rank
        Global rank, ``0 <= rank < world_size``.
    world_size
        Number of processes in the run.
    local_rank
        Rank among the processes on this host; selects the GPU.
    master_addr
        Host name or address of rank 0, where the rendezvous store listens.
    master_port
        TCP port of the rendezvous store; ``0`` (single process only) means any free port.
    launcher
        What started the processes.
    """

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: Launcher


def discover(env: Mapping[str, str] = os.environ, use_mpi: bool | None = None) -> DistEnv:
    """Find this process's rank from the environment its launcher set.

    Parameters
    ----------
    env
        Environment to read; the process environment by default.
    use_mpi
        ``None`` detects an MPI launch from the variables in :data:`MPI_RANK_VARIABLES`;
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
        found = _from_torchrun(env)
    elif _is_slurm_step(env):
        found = _from_slurm(env)
    elif use_mpi or (use_mpi is None and any(v in env for v in MPI_RANK_VARIABLES)):
        found = _from_mpi(env)
    else:
        found = _single(env)
    _check_consistent(found, env)
    logger.debug("discovered %s", found)
    return found


def slurm_master_port(job_id: int) -> int:
    """Rendezvous port for a SLURM job: ``10000 + job_id mod 50000``.

    Every task of a job computes the same port without talking to the others, and jobs whose
    ids differ by less than 50000 never share one.
    """
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a SLURM host list such as ``node[01-04,07]`` or ``a1,b[2-3]`` into host names.

    Ranges keep the zero padding of their lower bound (``n[08-10]`` gives ``n08 n09 n10``);
    several bracket groups in one name expand to their product (``r[1-2]n[1-2]``).

    Parameters
    ----------
    hostlist
        The compressed list, as in ``SLURM_JOB_NODELIST``.

    Returns
    -------
    list of str
        Host names in SLURM's order.

    Raises
    ------
    ConfigError
        The list is empty or malformed.
    """
    hosts = [host for item in _split_top_level(hostlist) for host in _expand_item(item, hostlist)]
    if not hosts:
        raise ConfigError(f"host list {hostlist!r} names no host")
    return hosts


def init_process_group(
    dist_env: DistEnv, backend: Backend = "auto", timeout_s: float = 60.0
) -> None:
    """Join the torch process group described by ``dist_env``.

    Exports ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` so
    that libraries reading them (DeepSpeed) agree with this process group, pins the CUDA
    device of the local rank when CUDA is available, and rendezvous through ``env://``.

    Parameters
    ----------
    dist_env
        Result of :func:`discover`.
    backend
        ``"auto"`` is nccl when CUDA is available, gloo otherwise.
    timeout_s
        Bound on the rendezvous and on every later collective.

    Raises
    ------
    ConfigError
        nccl was asked for without CUDA, or this local rank has no GPU.
    RendezvousError
        The master could not be reached, its port was taken, or not all ranks arrived
        within ``timeout_s``.
    """
    if dist.is_initialized():
        raise RuntimeError("the torch process group is already initialised; call destroy() first")
    resolved = _resolve_backend(backend)
    port = dist_env.master_port or _free_port()
    os.environ.update(
        MASTER_ADDR=dist_env.master_addr,
        MASTER_PORT=str(port),
        RANK=str(dist_env.rank),
        WORLD_SIZE=str(dist_env.world_size),
        LOCAL_RANK=str(dist_env.local_rank),
    )
    if torch.cuda.is_available():
        _pin_device(dist_env.local_rank)
    try:
        dist.init_process_group(
            backend=resolved,
            init_method="env://",
            rank=dist_env.rank,
            world_size=dist_env.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    except dist.DistError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RendezvousError(
            f"rank {dist_env.rank} of {dist_env.world_size} ({dist_env.launcher}) could not "
            f"join the process group at {dist_env.master_addr}:{port} within {timeout_s:g} s: "
            f"{reason}"
        ) from exc
    logger.info(
        "rank %d/%d joined the %s process group at %s:%d",
        dist_env.rank,
        dist_env.world_size,
        resolved,
        dist_env.master_addr,
        port,
    )


def destroy() -> None:
    """Leave the process group if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    """Whether this is rank 0, or the only process when no process group exists."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if dist.is_initialized():
        dist.barrier()


def _from_torchrun(env: Mapping[str, str]) -> DistEnv:
    missing = [name for name in _TORCHRUN_VARIABLES if name not in env]
    if missing:
        raise ConfigError(f"RANK is set but {', '.join(missing)} is not: incomplete torchrun env")
    return DistEnv(
        rank=_int_var(env, "RANK"),
        world_size=_int_var(env, "WORLD_SIZE"),
        local_rank=_int_var(env, "LOCAL_RANK"),
        master_addr=env["MASTER_ADDR"],
        master_port=_int_var(env, "MASTER_PORT"),
        launcher="torchrun",
    )


def _is_slurm_step(env: Mapping[str, str]) -> bool:
    # The batch script itself also has SLURM_PROCID=0 and the job's SLURM_NTASKS, but it is one
    # process: only tasks started by srun carry a step id.
    has_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    return "SLURM_PROCID" in env and has_step


def _from_slurm(env: Mapping[str, str]) -> DistEnv:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if "MASTER_ADDR" in env:
        master_addr = env["MASTER_ADDR"]
    elif nodelist:
        master_addr = expand_hostlist(nodelist)[0]
    else:
        raise ConfigError("SLURM_PROCID is set but SLURM_JOB_NODELIST is not")
    if "MASTER_PORT" in env:
        master_port = _int_var(env, "MASTER_PORT")
    else:
        master_port = slurm_master_port(_int_var(env, "SLURM_JOB_ID"))
    return DistEnv(
        rank=_int_var(env, "SLURM_PROCID"),
        world_size=_int_var(env, "SLURM_NTASKS"),
        local_rank=_int_var(env, "SLURM_LOCALID"),
        master_addr=master_addr,
        master_port=master_port,
        launcher="slurm",
    )


def _from_mpi(env: Mapping[str, str]) -> DistEnv:
    try:
        # Imported only here: importing mpi4py.MPI initialises MPI.
        from mpi4py import MPI
    except ImportError as exc:
        raise ConfigError("an MPI launch was detected but mpi4py is not installed") from exc
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank = node_comm.Get_rank()
    node_comm.Free()
    rendezvous = None
    if rank == 0:
        port = _int_var(env, "MASTER_PORT") if "MASTER_PORT" in env else _free_port()
        rendezvous = (env.get("MASTER_ADDR") or socket.gethostname(), port)
    master_addr, master_port = comm.bcast(rendezvous, root=0)
    return DistEnv(
        rank=rank,
        world_size=comm.Get_size(),
        local_rank=local_rank,
        master_addr=master_addr,
        master_port=master_port,
        launcher="mpi",
    )


def _single(env: Mapping[str, str]) -> DistEnv:
    port = _int_var(env, "MASTER_PORT") if "MASTER_PORT" in env else 0
    return DistEnv(
        rank=0,
        world_size=1,
        local_rank=0,
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=port,
        launcher="single",
    )


def _check_consistent(found: DistEnv, env: Mapping[str, str]) -> None:
    if "WORLD_SIZE" in env and found.launcher != "torchrun":
        explicit = _int_var(env, "WORLD_SIZE")
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


def _int_var(env: Mapping[str, str], name: str) -> int:
    if name not in env:
        raise ConfigError(f"environment variable {name} is not set")
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"{name}={env[name]!r} is not an integer") from None


def _split_top_level(hostlist: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, char in enumerate(hostlist):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if depth not in (0, 1):
            raise ConfigError(f"host list {hostlist!r} has unbalanced brackets")
        if char == "," and depth == 0:
            items.append(hostlist[start:i])
            start = i + 1
    if depth != 0:
        raise ConfigError(f"host list {hostlist!r} has unbalanced brackets")
    items.append(hostlist[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_item(item: str, hostlist: str) -> list[str]:
    match = _BRACKET_GROUP.match(item)
    if match is None:
        if "[" in item or "]" in item:
            raise ConfigError(f"host list {hostlist!r} has unbalanced brackets")
        return [item]
    tails = _expand_item(match["rest"], hostlist)
    return [
        match["prefix"] + value + tail
        for part in match["ranges"].split(",")
        for value in _expand_range(part.strip(), hostlist)
        for tail in tails
    ]


def _expand_range(part: str, hostlist: str) -> list[str]:
    low, sep, high = part.partition("-")
    if not low.isdigit() or (sep and not high.isdigit()):
        raise ConfigError(f"host list {hostlist!r} has a bad range {part!r}")
    if not sep:
        return [low]
    if int(high) < int(low):
        raise ConfigError(f"host list {hostlist!r} has a descending range {part!r}")
    return [f"{i:0{len(low)}d}" for i in range(int(low), int(high) + 1)]


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


def _free_port() -> int:
    # The port is released before the store binds it; another process could take it in
    # between, which the store then reports as a RendezvousError.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])
