"""Dask clients for the block-wise driver: a local cluster, an existing scheduler, SLURM, MPI.

:func:`open_client` turns a :class:`~hpcdeconv.config.ClusterConfig` into a connected
:class:`distributed.Client` and tears down whatever it started on exit:

* ``local``: a :class:`~distributed.LocalCluster` of worker processes (each behind a nanny,
  so a crashed worker is restarted), one per GPU or one per available core;
* ``scheduler``: connect to ``cluster.scheduler`` (``tcp://host:port``); an address where
  nothing listens fails at once, one that does not answer after the timeout;
* ``slurm``: a dask-jobqueue ``SLURMCluster``, one SLURM job per worker;
* ``mpi``: dask-mpi inside an MPI job: rank 0 runs the scheduler, rank 1 returns here as the
  client, every other rank runs a worker. Ranks other than 1 never return from
  :func:`open_client`: they exit when the client closes the cluster.

Workers with a GPU declare the dask resource ``GPU=1`` so that GPU tasks can ask for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import socket
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any
from urllib.parse import urlsplit

from distributed import Client

from hpcdeconv.config import ClusterConfig
from hpcdeconv.errors import ConfigError, HpcdeconvError

logger = logging.getLogger(__name__)

#: Seconds to wait for a scheduler to answer before giving up.
CONNECT_TIMEOUT_S = 10.0
#: Name of the dask resource that GPU workers declare and GPU tasks request.
GPU_RESOURCE = "GPU"
# The scheduler's HTTP server (health checks, and the dashboard when enabled) always runs;
# binding it to the loopback interface keeps it off the network, on a free port.
_DASHBOARD = "127.0.0.1:0"
#: dask-mpi's rank roles: 0 runs the scheduler, this one the client, the others workers.
MPI_CLIENT_RANK = 1


def is_mpi_client() -> bool:
    """Whether this process is the client rank of a ``--cluster mpi`` launch.

    Every rank of such a launch runs the command; only the client rank returns from
    ``dask_mpi.initialize`` and writes the output, so only it may hold the output's lock.
    """
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank() == MPI_CLIENT_RANK


# Worker processes get glibc's malloc defaults back, plus one arena. dask's nannies export
# MALLOC_TRIM_THRESHOLD_=65536 to the workers they spawn; any explicit glibc malloc threshold
# switches off glibc's dynamic mmap threshold, so every tensor over 128 KiB is mmapped,
# page-faulted in and unmapped again: torch inference on the CPU ran ~40 % slower in such a
# worker than in a plain process (U-Net on 64x160x160, 1 thread: 10.8-11.6 s vs 7.8-8.4 s).
# Tasks also run in the worker's executor thread, whose own malloc arena (mmapped 64 MiB heaps,
# shrunk with MADV_DONTNEED) took up to 2-3x the page faults of the main thread per 64^3 tile
# and made the driver 10-25 % slower than in-process inference (2 threads: 3.7-4.4 s vs
# 3.4-3.5 s); with one arena the worker ran as fast (3.3-3.6 s). None removes dask's entry.
_SPAWN_ENVIRON: dict[str, str | None] = {"MALLOC_TRIM_THRESHOLD_": None, "MALLOC_ARENA_MAX": "1"}
_SPAWN_ENVIRON_KEY = "distributed.nanny.pre-spawn-environ"
# The same for a worker started elsewhere (a SLURM job): dask merges a dict given in this
# variable into its defaults, so the other variables of the spawn environment stay.
# dask reads the value with ast.literal_eval, so the dict's repr is what it gets.
_WORKER_ENVIRON_EXPORT = (
    f"export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON={shlex.quote(repr(_SPAWN_ENVIRON))}"
)


class SchedulerLostError(HpcdeconvError):
    """The connection to the dask scheduler was lost during a run."""


@contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Silence loggers for a while (restoring their levels after)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _available_cores() -> int:
    # Inside a SLURM allocation or under taskset the affinity mask, not the machine, counts.
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def local_worker_count(cfg: ClusterConfig, gpus: int) -> int:
    """Workers of a local cluster: as configured, else one per GPU, else one per core group."""
    if cfg.workers is not None:
        return cfg.workers
    if gpus:
        return gpus
    return max(1, _available_cores() // cfg.threads_per_worker)


def _local_client(cfg: ClusterConfig, stack: ExitStack) -> Client:
    import dask
    from distributed import LocalCluster

    gpus = _visible_gpus()
    # Nannies read the spawn environment once, when created; restarts reuse it.
    with dask.config.set({f"{_SPAWN_ENVIRON_KEY}.{k}": v for k, v in _SPAWN_ENVIRON.items()}):
        cluster = LocalCluster(
            n_workers=local_worker_count(cfg, gpus),
            threads_per_worker=cfg.threads_per_worker,
            processes=True,
            memory_limit=cfg.memory_per_worker,
            dashboard_address=_DASHBOARD,
            scheduler_kwargs={"dashboard": cfg.dashboard},
            resources={GPU_RESOURCE: 1} if gpus else None,
        )
    stack.enter_context(cluster)
    return stack.enter_context(Client(cluster))


def _probe(address: str, timeout: float) -> None:
    """Fail fast on a TCP address where nothing listens (dask would retry until timeout)."""
    parts = urlsplit(address)
    if parts.scheme != "tcp" or parts.hostname is None or parts.port is None:
        return
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"cannot reach the dask scheduler at {address}: {reason}") from None


async def _identity(address: str, timeout: float) -> dict[str, Any]:
    from distributed.core import rpc

    async def ask() -> dict[str, Any]:
        async with rpc(address, timeout=timeout) as remote:
            return await remote.identity()

    return await asyncio.wait_for(ask(), timeout)


def connect(address: str, timeout: float = CONNECT_TIMEOUT_S) -> Client:
    """A client of the scheduler at ``address``; one-line :class:`ConfigError` if unreachable.

    The scheduler is first asked who it is under an overall deadline: ``Client`` alone
    waits forever on a peer that accepts the connection but never answers.
    """
    _probe(address, timeout)
    unreachable = f"cannot reach the dask scheduler at {address} within {timeout:g} s"
    try:
        kind = asyncio.run(_identity(address, timeout)).get("type")
    except (OSError, TimeoutError, ValueError):
        raise ConfigError(unreachable) from None
    if kind != "Scheduler":
        raise ConfigError(f"{address} is a dask {kind}, not a scheduler")
    try:
        return Client(address, timeout=timeout)
    except (OSError, TimeoutError):
        raise ConfigError(unreachable) from None


def slurm_cluster_options(cfg: ClusterConfig) -> dict[str, Any]:
    """Keyword arguments of ``dask_jobqueue.SLURMCluster`` for one worker per SLURM job."""
    options: dict[str, Any] = {
        "cores": cfg.threads_per_worker,
        "processes": 1,
        "memory": cfg.memory_per_worker,
        "walltime": cfg.walltime,
        "queue": cfg.partition,
        "python": sys.executable,
        "job_name": "hpcdeconv-worker",
        "scheduler_options": {"dashboard_address": _DASHBOARD, "dashboard": cfg.dashboard},
        "job_script_prologue": [_WORKER_ENVIRON_EXPORT],
    }
    if cfg.gpus_per_worker:
        options["job_extra_directives"] = [f"--gres=gpu:{cfg.gpus_per_worker}"]
        options["worker_extra_args"] = ["--resources", f"{GPU_RESOURCE}={cfg.gpus_per_worker}"]
    return options


def _slurm_client(cfg: ClusterConfig, stack: ExitStack) -> Client:
    from dask_jobqueue import SLURMCluster

    cluster = stack.enter_context(SLURMCluster(**slurm_cluster_options(cfg)))
    cluster.scale(jobs=cfg.workers or 1)
    logger.info("submitted %d SLURM worker job(s)", cfg.workers or 1)
    return stack.enter_context(Client(cluster))


def _mpi_client(cfg: ClusterConfig, stack: ExitStack, timeout: float) -> Client:
    import dask_mpi
    from mpi4py import MPI

    rank = MPI.COMM_WORLD.Get_rank()
    options: dict[str, Any] = {"name": f"mpi-rank-{rank}"}
    if _visible_gpus():
        options["resources"] = {GPU_RESOURCE: 1}
    try:
        dask_mpi.initialize(
            nthreads=cfg.threads_per_worker,
            memory_limit=cfg.memory_per_worker,
            dashboard=cfg.dashboard,
            dashboard_address=_DASHBOARD,
            worker_options=options,
        )
    except dask_mpi.WorldTooSmallException:
        raise ConfigError(
            "--cluster mpi needs at least 3 MPI ranks (scheduler, client, one worker)"
        ) from None
    return stack.enter_context(Client(timeout=timeout))


@contextmanager
def open_client(cfg: ClusterConfig, timeout: float = CONNECT_TIMEOUT_S) -> Iterator[Client]:
    """Start or reach the dask cluster described by ``cfg`` and yield a client of it.

    Parameters
    ----------
    cfg
        Cluster configuration (``kind`` local, scheduler, slurm or mpi).
    timeout
        Seconds to wait for a scheduler to answer.

    Raises
    ------
    ConfigError
        The scheduler cannot be reached, or an MPI job has fewer than 3 ranks.
    SchedulerLostError
        Passed on from the body, after the client is closed quietly.
    """
    with ExitStack() as stack:
        if cfg.kind == "local":
            client = _local_client(cfg, stack)
        elif cfg.kind == "scheduler":
            client = stack.enter_context(connect(str(cfg.scheduler), timeout))
        elif cfg.kind == "slurm":
            client = _slurm_client(cfg, stack)
        else:
            client = _mpi_client(cfg, stack, timeout)
        try:
            yield client
        except SchedulerLostError:
            # Closing a client whose scheduler is gone cancels its reconnection attempts,
            # which dask logs as tracebacks; the error line already says what happened.
            with _quiet("distributed.client", "distributed.comm", "distributed.core"):
                stack.close()
            raise


def dashboard_url(client: Client, cfg: ClusterConfig) -> str | None:
    """Where to open the dashboard, or ``None`` when it is off.

    A cluster started here binds it to the loopback interface of the scheduler's host, so
    the link names that host (reach it with ``ssh -L PORT:127.0.0.1:PORT HOST``).
    """
    if not cfg.dashboard:
        return None
    if cfg.kind == "scheduler":
        return client.dashboard_link
    port = client.scheduler_info(n_workers=0).get("services", {}).get("dashboard")
    host = urlsplit(client.scheduler.address).hostname
    return f"http://127.0.0.1:{port}/status on {host}"


def workers_declare_gpus(client: Client) -> bool:
    """Whether any connected worker declares the ``GPU`` resource."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    return any(GPU_RESOURCE in (w.get("resources") or {}) for w in workers.values())


def wait_for_workers(client: Client) -> dict[str, Any]:
    """The scheduler's workers, once at least one has connected."""
    if not client.scheduler_info(n_workers=-1).get("workers"):
        logger.info("waiting for the first dask worker to connect")
        client.wait_for_workers(1)
    return client.scheduler_info(n_workers=-1).get("workers", {})
