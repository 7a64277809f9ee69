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
import gc
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hpcdeconv.config import OptimConfig
from hpcdeconv.errors import HpcdeconvError
from hpcdeconv.precision import autocast_dtype
from hpcdeconv.training.dist import destroy as leave_process_group
from hpcdeconv.training.optim import build_optimizer

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)


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


def apply_schedule(optimizer: torch.optim.Optimizer, scheduler: Any, base_lr: float) -> None:
    """Set the configured base rate and the scheduled rate of the current step.

    Called after a schedule is restored from a checkpoint: the saved ``base_lrs`` are
    those of the run that wrote it, and ``LambdaLR`` does not save its factor function, so
    both come from this run's configuration (``optim.lr``, ``optim.decay_start``,
    ``train.steps``). For an unchanged configuration this reproduces the saved rate; a
    changed one takes effect from the resumed step, as ``config.yaml`` then says.
    """
    scheduler.base_lrs = [base_lr for _ in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = base_lr
        group["lr"] = base_lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def agreed(error: E) -> E:
    """Mark ``error`` as raised on every rank at once (see :meth:`Strategy.agree`).

    Every rank of a run holding such an error can meet once more before exiting
    (:func:`is_agreed`), so that each prints its line before a launcher stops the others.
    """
    error.agreed_by_all_ranks = True  # type: ignore[attr-defined]
    return error


def is_agreed(error: BaseException) -> bool:
    """Whether ``error`` was raised on every rank of the process group."""
    return bool(getattr(error, "agreed_by_all_ranks", False))


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
    """A group trained in this process: optimiser, optional GradScaler, linear decay.

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
        self.base_lr = lr or optim.lr
        self.optimizer = build_optimizer(params, optim, self.base_lr)
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
        apply_schedule(self.optimizer, self.scheduler, self.base_lr)
        self.scaler.load_state_dict(state["scaler"])


class FrozenTrainable(Trainable):
    """A group none of whose parameters is trained (e.g. only a fixed PSF): no optimiser.

    It still takes part in forward passes and checkpoints, so a method needs no special
    case for it; :meth:`step` has nothing to update.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        """Nothing to update."""

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])


def has_trainable_parameters(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` requires a gradient."""
    return any(p.requires_grad for p in module.parameters())


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
        return autocast_dtype(self.precision)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed-precision context for forward passes (bf16 on CPU/GPU, fp16 on GPU)."""
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def wrap(
        self,
        module: nn.Module,
        optim: OptimConfig,
        total_steps: int,
        lr: float | None = None,
        name: str | None = None,
    ) -> Trainable:
        """Place ``module`` on the device and return its :class:`Trainable`.

        A group without trainable parameters (e.g. the fixed PSF of non-blind training)
        gets no optimiser and no wrapper; it is only made identical on every rank.
        ``name`` is the method's name of the group (e.g. ``"G"``); strategies that write
        per-group files use it.
        """
        module.to(self.device)
        if not has_trainable_parameters(module):
            self.sync_frozen(module)
            return FrozenTrainable(module)
        return self._wrap_trainable(module, optim, total_steps, lr, name)

    @abstractmethod
    def _wrap_trainable(
        self,
        module: nn.Module,
        optim: OptimConfig,
        total_steps: int,
        lr: float | None,
        name: str | None,
    ) -> Trainable:
        """The :class:`Trainable` of a group with trainable parameters, on the device."""

    def sync_frozen(self, module: nn.Module) -> None:  # noqa: B027 - one process: nothing
        """Make a group without trainable parameters identical on every rank."""

    def barrier(self) -> None:  # noqa: B027 - a no-op in one process
        """Wait for every rank (no-op in one process)."""

    def save_shards(self, run_dir: Path, step: int) -> None:  # noqa: B027 - optional hook
        """Collective: write the state that lives on every rank, before rank 0's checkpoint.

        Called by every rank before rank 0 writes the checkpoint of ``step``, which then
        refers to what was written here (DeepSpeed's partitioned optimiser states). A no-op
        for strategies whose whole state is on rank 0.
        """

    def close(self) -> None:  # noqa: B027 - nothing to release in one process
        """Release the process group (no-op in one process)."""

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean over ranks (identity in one process)."""
        return value

    def all_reduce_max(self, value: torch.Tensor) -> torch.Tensor:
        """Maximum over ranks (identity in one process)."""
        return value

    def agree(self, work: Callable[[], T], main_only: bool = False) -> T | None:
        """Collective: run ``work`` (on rank 0 only if ``main_only``); a failure ends every rank.

        Without it, an error on one rank (a used run directory seen by rank 0, a full disk
        at checkpoint time) leaves the others waiting in their next collective until the
        process group times out and then fails them with a backend traceback. Here every
        rank learns of it at once and raises the same :class:`HpcdeconvError` line (the
        lowest failing rank's); a bug keeps its traceback on the rank it happened on.

        Returns
        -------
        The result of ``work`` where it ran, ``None`` elsewhere.
        """
        return work() if self.is_main or not main_only else None


class SingleStrategy(Strategy):
    """One process on the CPU or one GPU."""

    def _wrap_trainable(
        self,
        module: nn.Module,
        optim: OptimConfig,
        total_steps: int,
        lr: float | None,
        name: str | None,
    ) -> Trainable:
        return LocalTrainable(
            module, module, optim, total_steps, fp16=self.precision == "fp16", lr=lr
        )


class DistributedStrategy(Strategy):
    """Base of the multi-process strategies: collectives over the joined process group.

    The process group must already be initialised (see
    :func:`hpcdeconv.training.dist.init_process_group`); :meth:`close` destroys it.
    Collectives run on ``device`` (nccl needs CUDA tensors); results come back on the
    caller's device.
    """

    def __init__(self, device: torch.device, precision: str) -> None:
        super().__init__(device, precision)
        if not dist.is_initialized():
            raise RuntimeError("a distributed strategy needs an initialised process group")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def barrier(self) -> None:
        dist.barrier()

    def _reduce(self, value: torch.Tensor, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
        buffer = value.detach().to(self.device, copy=True)
        dist.all_reduce(buffer, op=op)
        return buffer.to(value.device)

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean over ranks of a floating-point tensor."""
        return self._reduce(value, dist.ReduceOp.SUM) / self.world_size

    def all_reduce_max(self, value: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum over ranks."""
        return self._reduce(value, dist.ReduceOp.MAX)

    def sync_frozen(self, module: nn.Module) -> None:
        self.broadcast_module(module)

    def agree(self, work: Callable[[], T], main_only: bool = False) -> T | None:
        result, failure, error = None, None, None
        if self.is_main or not main_only:
            try:
                result = work()
            except HpcdeconvError as exc:
                failure, error = (type(exc), str(exc)), exc
            except BaseException as exc:
                failure = (RuntimeError, f"rank {self.rank} failed: {type(exc).__name__}: {exc}")
                error = exc
        failures: list[Any] = [None] * self.world_size
        dist.all_gather_object(failures, failure)
        first = next((f for f in failures if f is not None), None)
        if first is None:
            return result
        if error is not None and not isinstance(error, HpcdeconvError):
            raise error
        kind, message = first
        raise agreed(kind(message))

    def broadcast_module(self, module: nn.Module) -> None:
        """Overwrite ``module``'s parameters and buffers with rank 0's."""
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def close(self) -> None:
        leave_process_group()


class DDPStrategy(DistributedStrategy):
    """Data parallelism: each group in ``DistributedDataParallel``, gradients averaged.

    DDP broadcasts rank 0's parameters and buffers when it wraps a group, so every rank
    starts from the same networks, and all-reduces gradients during ``backward``: with
    batch-mean losses, ``W`` ranks of batch ``b`` take the step one process takes with
    batch ``W b``. A group without trainable parameters is not wrapped (DDP refuses
    it); its tensors are broadcast from rank 0 instead. History pools and other method
    state stay per rank.
    """

    def __init__(self, device: torch.device, precision: str) -> None:
        super().__init__(device, precision)
        self._wrapped: list[LocalTrainable] = []

    def _wrap_trainable(
        self,
        module: nn.Module,
        optim: OptimConfig,
        total_steps: int,
        lr: float | None,
        name: str | None,
    ) -> Trainable:
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        wrapped = DistributedDataParallel(module, device_ids=device_ids)
        trainable = LocalTrainable(
            module, wrapped, optim, total_steps, fp16=self.precision == "fp16", lr=lr
        )
        self._wrapped.append(trainable)
        return trainable

    def close(self) -> None:
        """Unwrap every group (its ``wrapped`` becomes the bare module again), then leave the
        process group.

        A DDP module's reducer holds a reference to the gloo process group. Freed after the
        group is destroyed (when the caller lets go of the trainer), the reducer runs the
        group's destructor while holding the GIL; that destructor joins gloo's worker threads,
        one of which may need the GIL to free the tensors of the last ``all_gather_object``:
        the process hangs for ever (pytorch/pytorch#56297; seen between two trials of a sweep
        worker). Freed here, while the group is registered, the reducer only drops a
        reference, and ``destroy_process_group`` releases the GIL for the destructor.
        """
        for trainable in self._wrapped:
            trainable.wrapped = trainable.module
        self._wrapped.clear()
        # A DDP module in a reference cycle would be freed by a later collection, too late.
        gc.collect()
        super().close()
