"""Build the training strategy from the configuration and the launcher's environment.

``hpcdeconv train`` runs unchanged as one process, under ``torchrun``, as ``srun`` tasks or
under ``mpiexec``: :func:`~hpcdeconv.training.dist.discover` reads who this process is,
:func:`build_strategy` joins the process group when the strategy needs one and returns the
:class:`~hpcdeconv.training.strategy.Strategy` the trainer takes its rank and world size from.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch

from hpcdeconv.config import ExperimentConfig
from hpcdeconv.errors import ConfigError
from hpcdeconv.training import dist
from hpcdeconv.training.strategy import DDPStrategy, SingleStrategy, Strategy, resolve_device

log = logging.getLogger(__name__)


def build_strategy(cfg: ExperimentConfig, env: Mapping[str, str] = os.environ) -> Strategy:
    """The strategy ``cfg.strategy`` names, in the distributed environment ``env`` describes.

    Parameters
    ----------
    cfg
        The experiment; ``strategy``, ``train.device``/``precision`` and ``data.batch_size``
        are read.
    env
        The launcher's variables (torchrun, SLURM, MPI); the process environment by default.

    Returns
    -------
    Strategy
        ``single``: :class:`SingleStrategy` (also for ``ddp`` in a world of one, with a
        warning). ``ddp``: :class:`DDPStrategy`. ``deepspeed``: ``DeepSpeedStrategy`` (also
        in a world of one). The multi-process strategies have joined the process group;
        their ``close()`` leaves it.

    Raises
    ------
    ConfigError
        Several processes were launched for the ``single`` strategy, the launcher's
        variables are inconsistent, or the DeepSpeed settings contradict the YAML.
    RendezvousError
        The process group could not be joined within ``strategy.timeout_s``: the master
        unreachable or silent, its port taken, the store there another run's (two steps
        given one port), or ranks missing.
    """
    sc = cfg.strategy
    dist_env = dist.discover(env)
    device = resolve_device(cfg.train.device, dist_env.local_rank)
    if sc.name == "single" and dist_env.world_size > 1:
        raise ConfigError(
            f"{dist_env.world_size} processes were launched ({dist_env.launcher}) but "
            "strategy.name is single; use strategy.name=ddp or deepspeed, or one process"
        )
    if sc.name == "single" or (sc.name == "ddp" and dist_env.world_size == 1):
        if sc.name == "ddp":
            log.warning("strategy ddp in a world of one process: training single-process")
        return SingleStrategy(device, cfg.train.precision)
    ds_config = None
    if sc.name == "deepspeed":
        from hpcdeconv.training.deepspeed_strategy import deepspeed_config

        # Checked before the rendezvous, so a bad setting fails at once on every rank.
        ds_config = deepspeed_config(
            sc.deepspeed, cfg.train.precision, cfg.data.batch_size, dist_env.world_size
        )
    dist.init_process_group(dist_env, _backend(sc.backend, device), sc.timeout_s)
    if ds_config is None:
        return DDPStrategy(device, cfg.train.precision)
    from hpcdeconv.training.deepspeed_strategy import DeepSpeedStrategy

    return DeepSpeedStrategy(device, cfg.train.precision, ds_config, cfg.output)


def _backend(backend: str, device: torch.device) -> dist.Backend:
    """``auto`` follows the training device: nccl for CUDA tensors, gloo for CPU ones."""
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("strategy.backend nccl needs train.device cuda; use gloo on the CPU")
    return backend  # type: ignore[return-value]
