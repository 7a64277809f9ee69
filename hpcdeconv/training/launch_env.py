"""What each launcher tells a process about its place in a run, read from its environment.

One reader per launcher hpcdeconv runs under, each giving a :class:`DistEnv`:

- torchrun: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``;
- a SLURM job step started by ``srun``: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``;
  the master is the first host of the step's node list, the port one SLURM reserved for the
  step or else derived from the job id and the step id
  (:func:`~hpcdeconv.training.slurm_env.slurm_master_port`);
- an MPI launch (``mpiexec``), through mpi4py's ``COMM_WORLD``;
- a single process.

Which launcher started this process, and whether its variables agree, is decided by
:func:`hpcdeconv.training.dist.discover`.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from hpcdeconv.errors import ConfigError
from hpcdeconv.training.slurm_env import expand_hostlist, slurm_master_port

__all__ = [
    "MPI_RANK_VARIABLES",
    "DistEnv",
    "Launcher",
    "free_port",
    "from_mpi",
    "from_slurm",
    "from_torchrun",
    "int_var",
    "is_slurm_step",
    "single",
]

Launcher = Literal["single", "torchrun", "slurm", "mpi"]

# Variables an MPI process manager sets in every rank it starts: Open MPI, MPICH/Hydra and
# Intel MPI (PMI_RANK, MPI_LOCALRANKID), and PMIx-based launchers.
MPI_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MPI_LOCALRANKID")
_TORCHRUN_VARIABLES = ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


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
    run_id
        The launch every rank of this run shares and no concurrent run has: ``SLURM job J
        step S``, ``torchrun run R restart N``, ``MPI launch T`` (a random token), or a fixed
        text where the launcher gives none. A rank that reaches a rendezvous store of another
        run refuses to join it.
    """

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: Launcher
    run_id: str = "a single process"


def from_torchrun(env: Mapping[str, str]) -> DistEnv:
    """Rank of a process started by torchrun (or with ``RANK`` and friends exported).

    Raises
    ------
    ConfigError
        ``RANK`` is set without the other torchrun variables, or one is not an integer.
    """
    missing = [name for name in _TORCHRUN_VARIABLES if name not in env]
    if missing:
        raise ConfigError(f"RANK is set but {', '.join(missing)} is not: incomplete torchrun env")
    if "TORCHELASTIC_RUN_ID" in env:
        restart = env.get("TORCHELASTIC_RESTART_COUNT", "0")
        run_id = f"torchrun run {env['TORCHELASTIC_RUN_ID']} restart {restart}"
    else:
        # RANK and WORLD_SIZE exported by hand: nothing names the launch.
        run_id = "a launch by RANK/WORLD_SIZE variables"
    return DistEnv(
        rank=int_var(env, "RANK"),
        world_size=int_var(env, "WORLD_SIZE"),
        local_rank=int_var(env, "LOCAL_RANK"),
        master_addr=env["MASTER_ADDR"],
        master_port=int_var(env, "MASTER_PORT"),
        launcher="torchrun",
        run_id=run_id,
    )


def is_slurm_step(env: Mapping[str, str]) -> bool:
    """Whether ``env`` is that of a task ``srun`` started (not the batch script itself)."""
    # The batch script itself also has SLURM_PROCID=0 and the job's SLURM_NTASKS, but it is one
    # process: only tasks started by srun carry a step id.
    return "SLURM_PROCID" in env and _step_id_variable(env) is not None


def _step_id_variable(env: Mapping[str, str]) -> str | None:
    return next((name for name in ("SLURM_STEP_ID", "SLURM_STEPID") if name in env), None)


def from_slurm(env: Mapping[str, str]) -> DistEnv:
    """Rank of a task of a SLURM job step; ``MASTER_ADDR``/``MASTER_PORT`` override the
    first host of the node list and the step's port.

    Raises
    ------
    ConfigError
        No node list and no ``MASTER_ADDR``, a missing or non-integer variable, or a
        malformed host list or reserved port range.
    """
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if "MASTER_ADDR" in env:
        master_addr = env["MASTER_ADDR"]
    elif nodelist:
        master_addr = expand_hostlist(nodelist)[0]
    else:
        raise ConfigError("SLURM_PROCID is set but SLURM_JOB_NODELIST is not")
    job_id = int_var(env, "SLURM_JOB_ID")
    step_id = int_var(env, _step_id_variable(env) or "SLURM_STEP_ID")
    if "MASTER_PORT" in env:
        # An explicit port wins; if several steps export the same one, the second is refused
        # at the rendezvous rather than joining the first.
        master_port = int_var(env, "MASTER_PORT")
    else:
        master_port = slurm_master_port(job_id, step_id, env.get("SLURM_STEP_RESV_PORTS"))
    return DistEnv(
        rank=int_var(env, "SLURM_PROCID"),
        world_size=int_var(env, "SLURM_NTASKS"),
        local_rank=int_var(env, "SLURM_LOCALID"),
        master_addr=master_addr,
        master_port=master_port,
        launcher="slurm",
        run_id=f"SLURM job {job_id} step {step_id}",
    )


def from_mpi(env: Mapping[str, str]) -> DistEnv:
    """Rank of an MPI process; rank 0 chooses the rendezvous and broadcasts it to all.

    Raises
    ------
    ConfigError
        mpi4py is not installed, or ``MASTER_PORT`` is not an integer.
    """
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
        port = int_var(env, "MASTER_PORT") if "MASTER_PORT" in env else free_port()
        # MPI gives a launch no name every rank can read: rank 0 draws one for all.
        token = uuid.uuid4().hex[:12]
        rendezvous = (env.get("MASTER_ADDR") or socket.gethostname(), port, token)
    master_addr, master_port, token = comm.bcast(rendezvous, root=0)
    return DistEnv(
        rank=rank,
        world_size=comm.Get_size(),
        local_rank=local_rank,
        master_addr=master_addr,
        master_port=master_port,
        launcher="mpi",
        run_id=f"MPI launch {token}",
    )


def single(env: Mapping[str, str]) -> DistEnv:
    """The only process of a run no launcher started; ``MASTER_PORT`` unset means any port.

    Raises
    ------
    ConfigError
        ``MASTER_PORT`` is not an integer.
    """
    port = int_var(env, "MASTER_PORT") if "MASTER_PORT" in env else 0
    return DistEnv(
        rank=0,
        world_size=1,
        local_rank=0,
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=port,
        launcher="single",
    )


def int_var(env: Mapping[str, str], name: str) -> int:
    """The integer value of the variable ``name``.

    Raises
    ------
    ConfigError
        The variable is not set or not an integer.
    """
    if name not in env:
        raise ConfigError(f"environment variable {name} is not set")
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"{name}={env[name]!r} is not an integer") from None


def free_port() -> int:
    """A TCP port that was free a moment ago, for a rendezvous store on this host."""
    # The port is released before the store binds it; another process could take it in
    # between, which the store then reports as a RendezvousError.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])
