"""What a SLURM job step's variables mean: its compressed host list and its rendezvous port.

Pure functions of the strings SLURM exports (``SLURM_JOB_NODELIST``,
``SLURM_STEP_RESV_PORTS``, the job and step ids); every task of a step computes the same
answer without talking to the others.
"""

from __future__ import annotations

import re

from hpcdeconv.errors import ConfigError

__all__ = ["expand_hostlist", "slurm_master_port"]

SLURM_PORT_BASE = 10000
SLURM_PORT_SPAN = 50000
# Coprime to SLURM_PORT_SPAN: the steps of one job take consecutive ports, and one step id of
# two jobs shares a port only when the job ids are congruent modulo the span.
SLURM_JOB_PORT_STRIDE = 101
_BRACKET_GROUP = re.compile(r"^(?P<prefix>[^\[\]]*)\[(?P<ranges>[^\[\]]*)\](?P<rest>.*)$")


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
        finds another run's store: :func:`hpcdeconv.training.dist.init_process_group` refuses
        both in one line).

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
