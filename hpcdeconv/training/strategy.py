"""Execution strategies: how a method's optimised groups are placed, wrapped and stepped.

A method declares *groups* (e.g. ``G`` = deblurring U-Net + PSF kernel, ``D`` = the
discriminators), each an ``nn.Module`` whose ``forward`` does that group's whole forward
pass of a step. The strategy turns each group into a :class:`Trainable`: a wrapped
module (plain, DDP or a DeepSpeed engine) with its optimiser, gradient scaler and
learning-rate schedule. Methods only ever call the :class:`Trainable` interface, so they
know nothing of the strategy, and the strategy knows nothing of the method.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from hpcdeconv.config import OptimConfig

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` → the local rank's GPU if CUDA is available, else the CPU."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from hpcdeconv.errors import ConfigError

            raise ConfigError("train.device is cuda but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def linear_decay(total_steps: int, decay_start: int | None) -> Any:
    """Learning-rate factor: 1 until ``decay_start``, then linearly to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if decay_start is None or step < decay_start:
            return 1.0
        return max(0.0, 1.0 - (step - decay_start) / max(1, total_steps - decay_start))

    return factor


class Trainable(ABC):
    """One optimised group of networks as a method sees it."""

    #: The unwrapped group module: use it for frozen forward passes and for export.
    module: nn.Module

    @abstractmethod
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Forward through the wrapper (so that gradient synchronisation happens)."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate ``loss`` (scaled for fp16)."""

    @abstractmethod
    def step(self) -> None:
        """Optimiser step, scaler update, schedule step; gradients are zeroed afterwards."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically: weights, optimiser, scaler, schedule."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Parameters of this group receive no gradient inside the block (GAN G-step)."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)


class LocalTrainable(Trainable):
    """A group trained in this process with Adam, optional GradScaler and linear decay.

    ``wrapped`` is what forward calls go through: the module itself for the single
    strategy, a ``DistributedDataParallel`` around it for DDP.
    """

    def __init__(
        self,
        module: nn.Module,
        wrapped: nn.Module,
        optim: OptimConfig,
        total_steps: int,
        fp16: bool,
        lr: float | None = None,
    ) -> None:
        self.module = module
        self.wrapped = wrapped
        params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=lr or optim.lr, betas=optim.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, linear_decay(total_steps, optim.decay_start)
        )
        device = next(module.parameters()).device.type if params else "cpu"
        self.scaler = torch.amp.GradScaler(device, enabled=fp16)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapped(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


class Strategy(ABC):
    """Where and how groups run: device, precision, process group."""

    def __init__(self, device: torch.device, precision: str) -> None:
        self.device = device
        self.precision = precision

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and shows progress bars."""
        return self.rank == 0

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of the configured precision (``None`` for fp32)."""
        return _DTYPES.get(self.precision)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed-precision context for forward passes (bf16 on CPU/GPU, fp16 on GPU)."""
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    @abstractmethod
    def wrap(
        self, module: nn.Module, optim: OptimConfig, total_steps: int, lr: float | None = None
    ) -> Trainable:
        """Place ``module`` on the device and return its :class:`Trainable`."""

    def barrier(self) -> None:  # noqa: B027 - a no-op in one process
        """Wait for every rank (no-op in one process)."""

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean over ranks (identity in one process)."""
        return value

    def all_reduce_max(self, value: torch.Tensor) -> torch.Tensor:
        """Maximum over ranks (identity in one process)."""
        return value


class SingleStrategy(Strategy):
    """One process on the CPU or one GPU."""

    def wrap(
        self, module: nn.Module, optim: OptimConfig, total_steps: int, lr: float | None = None
    ) -> Trainable:
        module.to(self.device)
        return LocalTrainable(
            module, module, optim, total_steps, fp16=self.precision == "fp16", lr=lr
        )
