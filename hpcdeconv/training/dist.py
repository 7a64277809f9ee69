"""Rank discovery for the launchers hpcdeconv runs under, and process-group set-up.

Nothing here knows about training. :func:`discover` reads who this process is from the
environment a launcher left behind, trying in order

1. torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``),
2. a SLURM job step started by ``srun`` (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``;
   the master is the first host of the step's node list, the port is one SLURM reserved for
   the step or else derived from the job id and the step id, see :func:`slurm_master_port`),
3. an MPI launch (``mpiexec``), through mpi4py's ``COMM_WORLD``,
4. a single process.

Each launch also names the run it belongs to (:attr:`DistEnv.run_id`: the SLURM job and step,
the torchrun run and restart, a token rank 0 of an MPI launch broadcasts).
:func:`init_process_group` then joins the torch process group (gloo on CPU, nccl on GPU) in
two stages, each bounded by the timeout: the rendezvous store, where every rank checks that the
store belongs to its own run and waits for all ranks, then the process group on a store
namespaced by the run. Whatever goes wrong (master unreachable, port taken, a listener that
never answers, another run's store, missing ranks) ends in a one-line
:class:`RendezvousError`.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import uuid
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
# Coprime to SLURM_PORT_SPAN: the steps of one job take consecutive ports, and one step id of
# two jobs shares a port only when the job ids are congruent modulo the span.
SLURM_JOB_PORT_STRIDE = 101
# Keys this module keeps in the rendezvous store, outside the run's namespace: who owns the
# store, and how many of its ranks have arrived.
_OWNER_KEY = "hpcdeconv/run"
_ARRIVED_KEY = "hpcdeconv/arrived/"
_ALL_ARRIVED_KEY = "hpcdeconv/all-arrived/"
# A thread that was to connect the store and is still blocked this long after the deadline is
# stuck in a connection nobody answers (torch's own timeout never fires there). Every other
# torch call in it is bounded by the deadline and returns well within this margin: a thread
# abandoned while torch could still return would abort the interpreter at exit.
_STUCK_GRACE_S = 2.0
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


def slurm_master_port(job_id: int, step_id: int, resv_ports: str | None = None) -> int:
    """Rendezvous port of a SLURM job step.

    Every task of a step computes the same port without talking to the others.

    Parameters
    ----------
    job_id
        ``SLURM_JOB_ID``; each task of a job array has its own.
    step_id
        ``SLURM_STEP_ID``: 0, 1, ... for the ``srun`` steps of one allocation.
    resv_ports
        ``SLURM_STEP_RESV_PORTS`` (``"12000-12003"``, ``"12000,12004"``) where the site
        reserves ports for steps (``MpiParams=ports=...`` with ``srun --resv-ports``): its
        first port is used, which SLURM gives no other step on these nodes while this one runs.

    Returns
    -------
    int
        The first reserved port, else ``10000 + (101 * job_id + step_id) mod 50000``: the
        concurrent steps of one allocation take consecutive ports and never share one; a
        step of another job shares one only by chance (then the rank-0 port is taken, or a rank
        finds another run's store: :func:`init_process_group` refuses both in one line).

    Raises
    ------
    ConfigError
        ``resv_ports`` does not start with a TCP port.
    """
    if resv_ports:
        first = re.match(r"\s*(\d+)", resv_ports)
        if first is None or not 0 < int(first[1]) < 65536:
            raise ConfigError(f"SLURM_STEP_RESV_PORTS={resv_ports!r} does not start with a port")
        return int(first[1])
    return SLURM_PORT_BASE + (SLURM_JOB_PORT_STRIDE * job_id + step_id) % SLURM_PORT_SPAN


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
    store = _rendezvous(dist_env, port, timeout_s)
    try:
        dist.init_process_group(
            backend=resolved,
            # Keys of the process group live under the run's name: even a store shared by
            # mistake never mixes two runs' ranks.
            store=dist.PrefixStore(f"hpcdeconv/{_identity(dist_env)}", store),
            rank=dist_env.rank,
            world_size=dist_env.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    except dist.DistError as exc:
        raise _rendezvous_error(dist_env, port, timeout_s, _first_line(exc)) from exc
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
    if "TORCHELASTIC_RUN_ID" in env:
        restart = env.get("TORCHELASTIC_RESTART_COUNT", "0")
        run_id = f"torchrun run {env['TORCHELASTIC_RUN_ID']} restart {restart}"
    else:
        # RANK and WORLD_SIZE exported by hand: nothing names the launch.
        run_id = "a launch by RANK/WORLD_SIZE variables"
    return DistEnv(
        rank=_int_var(env, "RANK"),
        world_size=_int_var(env, "WORLD_SIZE"),
        local_rank=_int_var(env, "LOCAL_RANK"),
        master_addr=env["MASTER_ADDR"],
        master_port=_int_var(env, "MASTER_PORT"),
        launcher="torchrun",
        run_id=run_id,
    )


def _is_slurm_step(env: Mapping[str, str]) -> bool:
    # The batch script itself also has SLURM_PROCID=0 and the job's SLURM_NTASKS, but it is one
    # process: only tasks started by srun carry a step id.
    return "SLURM_PROCID" in env and _step_id_variable(env) is not None


def _step_id_variable(env: Mapping[str, str]) -> str | None:
    return next((name for name in ("SLURM_STEP_ID", "SLURM_STEPID") if name in env), None)


def _from_slurm(env: Mapping[str, str]) -> DistEnv:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if "MASTER_ADDR" in env:
        master_addr = env["MASTER_ADDR"]
    elif nodelist:
        master_addr = expand_hostlist(nodelist)[0]
    else:
        raise ConfigError("SLURM_PROCID is set but SLURM_JOB_NODELIST is not")
    job_id = _int_var(env, "SLURM_JOB_ID")
    step_id = _int_var(env, _step_id_variable(env) or "SLURM_STEP_ID")
    if "MASTER_PORT" in env:
        # An explicit port wins; if several steps export the same one, the second is refused
        # at the rendezvous rather than joining the first.
        master_port = _int_var(env, "MASTER_PORT")
    else:
        master_port = slurm_master_port(job_id, step_id, env.get("SLURM_STEP_RESV_PORTS"))
    return DistEnv(
        rank=_int_var(env, "SLURM_PROCID"),
        world_size=_int_var(env, "SLURM_NTASKS"),
        local_rank=_int_var(env, "SLURM_LOCALID"),
        master_addr=master_addr,
        master_port=master_port,
        launcher="slurm",
        run_id=f"SLURM job {job_id} step {step_id}",
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


def _identity(dist_env: DistEnv) -> str:
    """What the ranks of one run share: the launch and the world size."""
    return f"{dist_env.run_id}, {dist_env.world_size} ranks"


def _rendezvous(dist_env: DistEnv, port: int, timeout_s: float) -> dist.Store:
    """Connect to the run's store, check whose it is and wait for every rank.

    A client first waits in Python for something to accept a TCP connection at the master, so
    that torch is only asked to connect where a listener is. The torch part runs in a daemon
    thread joined with a bound: a TCPStore client whose peer accepts the connection but never
    answers blocks in torch beyond any timeout, and only the thread can be abandoned.
    """
    deadline = time.monotonic() + timeout_s
    # Under torchrun the agent already hosts the store at MASTER_PORT; every worker is a client.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    is_server = dist_env.rank == 0 and not agent_store
    if not is_server:
        refused = _wait_for_listener(dist_env.master_addr, port, deadline)
        if refused is not None:
            raise _rendezvous_error(
                dist_env, port, timeout_s, f"nothing accepted a connection there ({refused})"
            )
    outcome: dict[str, object] = {}

    def join() -> None:
        try:
            outcome["store"] = _join_store(dist_env, port, is_server, timeout_s, deadline)
        except BaseException as exc:  # handed to the calling thread, re-raised there
            outcome["error"] = exc

    worker = threading.Thread(target=join, name="hpcdeconv-rendezvous", daemon=True)
    worker.start()
    worker.join(max(deadline - time.monotonic(), 0.0) + _STUCK_GRACE_S)
    if worker.is_alive():
        raise _rendezvous_error(
            dist_env,
            port,
            timeout_s,
            "something accepted the connection but never answered (not this run's rank 0)",
        )
    error = outcome.get("error")
    if isinstance(error, dist.DistError):
        raise _rendezvous_error(dist_env, port, timeout_s, _first_line(error)) from error
    if isinstance(error, BaseException):
        raise error
    store = outcome["store"]
    assert isinstance(store, dist.Store)
    return store


def _wait_for_listener(host: str, port: int, deadline: float) -> str | None:
    """Retry a TCP connection to ``host:port`` until one is accepted (``None``) or
    ``deadline`` passes (the last error, as text): rank 0 may start after this rank."""
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(min(left, 1.0), 0.01)):
                return None
        except OSError as exc:
            last = exc.strerror or str(exc) or type(exc).__name__
        if deadline - time.monotonic() <= 0:
            return last
        time.sleep(min(0.1, max(deadline - time.monotonic(), 0.0)))


def _join_store(
    dist_env: DistEnv, port: int, is_server: bool, timeout_s: float, deadline: float
) -> dist.Store:
    store = dist.TCPStore(
        dist_env.master_addr,
        port,
        dist_env.world_size,
        is_master=is_server,
        # Only what is left: the listener seen a moment ago may be gone, and torch retries.
        timeout=timedelta(seconds=max(deadline - time.monotonic(), 0.1)),
        wait_for_workers=False,
    )
    identity = _identity(dist_env)
    if dist_env.rank == 0:
        store.set(_OWNER_KEY, identity)
    else:
        owner = _get_within(store, _OWNER_KEY, deadline)
        if owner is None:
            raise _rendezvous_error(
                dist_env, port, timeout_s, "no hpcdeconv rank 0 announced its run there"
            )
        if owner != identity:
            raise _rendezvous_error(
                dist_env,
                port,
                timeout_s,
                f"the store there belongs to {owner}, not to this run ({identity}); "
                "two runs were given one rendezvous port",
            )
    if store.add(_ARRIVED_KEY + identity, 1) == dist_env.world_size:
        store.set(_ALL_ARRIVED_KEY + identity, "1")
    if not _wait_within(store, _ALL_ARRIVED_KEY + identity, deadline):
        arrived = store.add(_ARRIVED_KEY + identity, 0)
        raise _rendezvous_error(
            dist_env,
            port,
            timeout_s,
            f"only {arrived} of {dist_env.world_size} ranks arrived",
        )
    store.set_timeout(timedelta(seconds=timeout_s))
    return store


def _get_within(store: dist.Store, key: str, deadline: float) -> str | None:
    """The value of ``key`` once some rank sets it; ``None`` if ``deadline`` passes first."""
    if not _cut_timeout(store, deadline):
        return None
    try:
        return store.get(key).decode()
    except dist.DistStoreError:
        return None


def _wait_within(store: dist.Store, key: str, deadline: float) -> bool:
    """Whether ``key`` was set before ``deadline``."""
    if not _cut_timeout(store, deadline):
        return False
    try:
        store.wait([key])
    except dist.DistStoreError:
        return False
    return True


def _cut_timeout(store: dist.Store, deadline: float) -> bool:
    # torch reports a wait that ran out as DistStoreError; a lost connection is a
    # DistNetworkError, which propagates with its own reason.
    left = deadline - time.monotonic()
    if left <= 0:
        return False
    store.set_timeout(timedelta(seconds=left))
    return True


def _rendezvous_error(
    dist_env: DistEnv, port: int, timeout_s: float, reason: str
) -> RendezvousError:
    return RendezvousError(
        f"rank {dist_env.rank} of {dist_env.world_size} ({dist_env.launcher}) could not "
        f"join the process group at {dist_env.master_addr}:{port} within {timeout_s:g} s: "
        f"{reason}"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
