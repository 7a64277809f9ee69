"""The rendezvous of one run: reach its store, check that it is this run's, wait for all ranks.

:func:`rendezvous` is the first stage of
:func:`hpcdeconv.training.dist.init_process_group`. Rank 0 opens the TCP store (under
torchrun the agent has opened it) and writes its run's identity (:func:`run_identity`: the
launch and the world size); every other rank first waits for something to accept a TCP
connection at the master, connects, refuses a store whose identity is not its own run's,
and all ranks wait for every rank to arrive. Each step is bounded by the timeout, including
a connection that something accepts and never answers, and every failure (master
unreachable, port taken, another run's store, missing ranks) ends in a one-line
:class:`RendezvousError`.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from datetime import timedelta

import torch.distributed as dist

from hpcdeconv.errors import HpcdeconvError
from hpcdeconv.training.launch_env import DistEnv

__all__ = ["RendezvousError", "first_line", "rendezvous", "rendezvous_error", "run_identity"]

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


class RendezvousError(HpcdeconvError):
    """The process group could not be joined: master unreachable, port taken, ranks missing."""


def run_identity(dist_env: DistEnv) -> str:
    """What the ranks of one run share: the launch and the world size."""
    return f"{dist_env.run_id}, {dist_env.world_size} ranks"


def rendezvous(dist_env: DistEnv, port: int, timeout_s: float) -> dist.Store:
    """Connect to the run's store, check whose it is and wait for every rank.

    A client first waits in Python for something to accept a TCP connection at the master, so
    that torch is only asked to connect where a listener is. The torch part runs in a daemon
    thread joined with a bound: a TCPStore client whose peer accepts the connection but never
    answers blocks in torch beyond any timeout, and only the thread can be abandoned.

    Parameters
    ----------
    dist_env
        This process's place in the run.
    port
        TCP port of the store at ``dist_env.master_addr``.
    timeout_s
        Bound, in seconds, on the whole rendezvous; the store keeps it for later waits.

    Returns
    -------
    torch.distributed.Store
        The run's store, every rank having arrived.

    Raises
    ------
    RendezvousError
        Nothing accepted a connection at the master, something there never answered, the
        store belongs to another run or has no hpcdeconv rank 0, or not all ranks arrived.
    """
    deadline = time.monotonic() + timeout_s
    # Under torchrun the agent already hosts the store at MASTER_PORT; every worker is a client.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    is_server = dist_env.rank == 0 and not agent_store
    if not is_server:
        refused = _wait_for_listener(dist_env.master_addr, port, deadline)
        if refused is not None:
            raise rendezvous_error(
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
        raise rendezvous_error(
            dist_env,
            port,
            timeout_s,
            "something accepted the connection but never answered (not this run's rank 0)",
        )
    error = outcome.get("error")
    if isinstance(error, dist.DistError):
        raise rendezvous_error(dist_env, port, timeout_s, first_line(error)) from error
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
    identity = run_identity(dist_env)
    if dist_env.rank == 0:
        store.set(_OWNER_KEY, identity)
    else:
        owner = _get_within(store, _OWNER_KEY, deadline)
        if owner is None:
            raise rendezvous_error(
                dist_env, port, timeout_s, "no hpcdeconv rank 0 announced its run there"
            )
        if owner != identity:
            raise rendezvous_error(
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
        raise rendezvous_error(
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


def rendezvous_error(
    dist_env: DistEnv, port: int, timeout_s: float, reason: str
) -> RendezvousError:
    """The one-line error of a rank that could not join, saying where and why."""
    return RendezvousError(
        f"rank {dist_env.rank} of {dist_env.world_size} ({dist_env.launcher}) could not "
        f"join the process group at {dist_env.master_addr}:{port} within {timeout_s:g} s: "
        f"{reason}"
    )


def first_line(exc: BaseException) -> str:
    """The first line of a torch error's message (they span many), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
