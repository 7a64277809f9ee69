"""DeepSpeed strategy: one engine per group, ZeRO stage and precision from the YAML.

Each group becomes a ``deepspeed.initialize`` engine around a client optimiser of
:func:`~hpcdeconv.training.optim.build_optimizer` (DeepSpeed then compiles no fused one)
with the linear-decay schedule of ``optim:``, so the optimisation is the one the other
strategies run, with the optimiser states (ZeRO-1) and gradients (ZeRO-2) partitioned over
the ranks. The DeepSpeed JSON is built from the YAML; ``strategy.deepspeed.extra`` may add
keys but not contradict it.

Checkpoints. DeepSpeed state is partitioned, so every rank writes its part::

    RUN/checkpoints/deepspeed/step_00000100/G/...   # engine files of group G, all ranks
    RUN/checkpoints/step_00000100.pt                # rank 0: {"groups": {"G": {"deepspeed":
                                                    #   {"tag": "step_00000100", ...}}}, ...}

The order keeps the engine's atomic-checkpoint contract: all ranks write the tag directory
and meet at a barrier *before* rank 0 writes the torch checkpoint and moves ``latest``, so
``latest`` only ever names a checkpoint whose shards are complete. Tag directories are
pruned (at the next save, by rank 0) only once no listed torch checkpoint refers to them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpcdeconv.config import DeepSpeedConfig, OptimConfig, deep_merge
from hpcdeconv.errors import ConfigError, InputError
from hpcdeconv.precision import autocast_dtype
from hpcdeconv.training.checkpoint import CKPT_DIR, prune_unreferenced, step_tag
from hpcdeconv.training.optim import build_optimizer
from hpcdeconv.training.strategy import (
    DistributedStrategy,
    Trainable,
    apply_schedule,
    linear_decay,
)

log = logging.getLogger(__name__)

#: Sub-directory of ``RUN/checkpoints`` that holds DeepSpeed tag directories.
SHARD_DIR = "deepspeed"
# DeepSpeed prints a throughput line every `steps_per_print` steps; the trainer logs.
_QUIET_STEPS = 2**31 - 1
# Sections whose content the YAML decides entirely.
_OWNED_SECTIONS = {
    "optimizer": "optim (a client optimiser)",
    "scheduler": "optim.decay_start (linear decay)",
}
# Mixed precision runs through DeepSpeed's torch-autocast mode, never its bf16/fp16 modes.
# Those cast the group's weights to half precision and, on CUDA, switch an enclosing
# torch.autocast *off* inside the engine's forward, so every fp32 tensor crossing the
# engine (batch, pooled fakes, the PSF layer's FFT path) would meet half weights ("Input
# type (torch.cuda.FloatTensor) and weight type (CUDABFloat16Type) should be the same").
# On the CPU DeepSpeed only looks at CUDA's autocast flag and leaves the CPU's on, which is
# why CPU runs never saw it. In torch-autocast mode the weights stay fp32 and the engine
# runs its forward under autocast of the same dtype as the trainer: every strategy then
# computes the same mixed-precision step, and fp16 gets DeepSpeed's gradient scaler.
_OFF_LEAVES = ("bf16.enabled", "bfloat16.enabled", "fp16.enabled", "amp.enabled")


def deepspeed_config(
    ds: DeepSpeedConfig, precision: str, micro_batch: int, world_size: int
) -> dict[str, Any]:
    """The DeepSpeed JSON for one engine, built from the YAML.

    Parameters
    ----------
    ds
        ``strategy.deepspeed``: ZeRO stage and extra keys.
    precision
        ``train.precision``: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
    micro_batch
        ``data.batch_size``, the per-rank batch.
    world_size
        Number of ranks; the global batch is ``micro_batch * world_size``.

    Returns
    -------
    dict
        ``train_batch_size``, ``train_micro_batch_size_per_gpu``,
        ``gradient_accumulation_steps`` (1), ``zero_optimization.stage``, a
        ``torch_autocast`` section of the dtype ``precision`` asks for (weights stay
        fp32), merged with ``ds.extra``.

    Raises
    ------
    ConfigError
        ZeRO stage 3 was asked for, or an ``extra`` key contradicts the YAML (a different
        precision, DeepSpeed's own bf16/fp16 weights, batch size, ZeRO stage, or any
        optimizer/scheduler section).
    """
    if ds.zero_stage == 3:
        raise ConfigError(
            "strategy.deepspeed.zero_stage 3 is not supported: validation, the exported "
            "networks and checkpoints are made on rank 0 from whole parameters; use 0, 1 or 2"
        )
    base: dict[str, Any] = {
        "train_batch_size": micro_batch * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": ds.zero_stage},
        "steps_per_print": _QUIET_STEPS,
        "wall_clock_breakdown": False,
    }
    dtype = _deepspeed_dtype(precision)
    if dtype is not None:
        base["torch_autocast"] = {
            "enabled": True,
            "dtype": dtype,
            # Gradients are reduced in fp32, as DDP does: the networks are small, and a bf16
            # all-reduce would make ZeRO's step differ from the other strategies'.
            "lower_precision_safe_modules": [],
        }
    extra = _nested(ds.extra)
    _check_extra(extra, _owned_values(ds, precision, micro_batch, world_size))
    return deep_merge(base, extra)


def _owned_values(
    ds: DeepSpeedConfig, precision: str, micro_batch: int, world_size: int
) -> dict[str, tuple[Any, str]]:
    """Dotted DeepSpeed keys the YAML decides: value and the YAML key it comes from."""
    owned: dict[str, tuple[Any, str]] = {
        "train_batch_size": (micro_batch * world_size, "data.batch_size x world size"),
        "train_micro_batch_size_per_gpu": (micro_batch, "data.batch_size"),
        "gradient_accumulation_steps": (1, "one optimiser step per training step"),
        "zero_optimization.stage": (ds.zero_stage, "strategy.deepspeed.zero_stage"),
    }
    dtype = _deepspeed_dtype(precision)
    owned["torch_autocast.enabled"] = (dtype is not None, f"train.precision={precision}")
    if dtype is not None:
        owned["torch_autocast.dtype"] = (dtype, f"train.precision={precision}")
    for leaf in _OFF_LEAVES:
        owned[leaf] = (False, f"train.precision={precision} (fp32 weights under autocast)")
    return owned


def _deepspeed_dtype(precision: str) -> str | None:
    """DeepSpeed's name of the autocast dtype of ``precision`` (``"bfloat16"``), or ``None``."""
    dtype = autocast_dtype(precision)
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _nested(extra: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1, "c": {"d": 2}}`` → ``{"a": {"b": 1}, "c": {"d": 2}}``."""
    out: dict[str, Any] = {}
    for key, value in extra.items():
        parts = str(key).split(".")
        value = _nested(value) if isinstance(value, Mapping) else value
        for part in reversed(parts[1:]):
            value = {part: value}
        out = deep_merge(out, {parts[0]: value})
    return out


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted paths of the non-mapping values of ``tree``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_leaves(value, f"{path}."))
        else:
            out[path] = value
    return out


def _check_extra(extra: Mapping[str, Any], owned: Mapping[str, tuple[Any, str]]) -> None:
    for path, value in _leaves(extra).items():
        section = path.split(".", 1)[0]
        if section in _OWNED_SECTIONS:
            raise ConfigError(
                f"strategy.deepspeed.extra.{path} contradicts the YAML: "
                f"{section} comes from {_OWNED_SECTIONS[section]}"
            )
        if path in owned and value != owned[path][0]:
            expected, source = owned[path]
            raise ConfigError(
                f"strategy.deepspeed.extra.{path}={value!r} contradicts {source} "
                f"(which gives {expected!r})"
            )
        if any(key.startswith(f"{path}.") for key in owned):
            raise ConfigError(
                f"strategy.deepspeed.extra.{path}={value!r} contradicts the YAML: "
                "it would replace a section whose keys the YAML sets"
            )


class DeepSpeedTrainable(Trainable):
    """A group trained by a DeepSpeed engine.

    ``backward`` and ``step`` are the engine's (loss scaling, ZeRO gradient partitioning,
    optimiser step, schedule step, zeroing of gradients). The checkpoint state is a
    reference to the engine files written by :meth:`save_shards`.

    Parameters
    ----------
    engine
        The ``deepspeed.DeepSpeedEngine`` around the group module.
    optimizer
        The client optimiser (its ``param_groups`` carry the scheduled learning rate).
    name
        Group name; the engine's sub-directory of a tag directory.
    shard_root
        ``RUN/checkpoints/deepspeed``.
    base_lr
        The configured learning rate of the group (re-applied after a restore).
    """

    def __init__(
        self,
        engine: Any,
        optimizer: torch.optim.Optimizer,
        name: str,
        shard_root: Path,
        base_lr: float,
    ) -> None:
        self.engine = engine
        self.base_lr = base_lr
        self.module = engine.module
        self.optimizer = optimizer
        self.name = name
        self.shard_root = shard_root
        self._tag: str | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def save_shards(self, tag: str) -> None:
        """Collective: every rank writes its part of the engine state under ``tag``."""
        self.engine.save_checkpoint(str(self.shard_root / tag), tag=self.name, save_latest=False)
        self._tag = tag

    def _grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 torch-autocast's loss scaler (the engine's at ZeRO 0, ZeRO's otherwise).

        DeepSpeed's own checkpoint files do not hold it, so it travels in ours.
        """
        scaler = getattr(self.engine, "torch_autocast_z0_gradscaler", None)
        if scaler is None:
            scaler = getattr(self.engine.optimizer, "torch_autocast_gradscaler", None)
        return scaler

    def state_dict(self) -> dict[str, Any]:
        if self._tag is None:
            raise RuntimeError(f"group {self.name}: save_shards must run before state_dict")
        state: dict[str, Any] = {"deepspeed": {"tag": self._tag, "group": self.name}}
        scaler = self._grad_scaler()
        if scaler is not None:
            state["grad_scaler"] = scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ref = state["deepspeed"]
        tag_dir = self.shard_root / ref["tag"]
        if not (tag_dir / ref["group"]).is_dir():
            raise InputError(f"the DeepSpeed files {tag_dir / ref['group']} are missing")
        loaded, _ = self.engine.load_checkpoint(
            str(tag_dir),
            tag=ref["group"],
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if loaded is None:
            raise InputError(f"DeepSpeed could not load {tag_dir / ref['group']}")
        apply_schedule(self.optimizer, self.engine.lr_scheduler, self.base_lr)
        scaler = self._grad_scaler()
        if scaler is not None and "grad_scaler" in state:
            scaler.load_state_dict(state["grad_scaler"])
        self._tag = ref["tag"]


class DeepSpeedStrategy(DistributedStrategy):
    """Each group in a DeepSpeed engine (ZeRO 0-2; bf16 or fp16 from ``train.precision``).

    The process group must already be joined (DeepSpeed uses it as it is). A group
    without trainable parameters gets no engine; its tensors are broadcast from rank 0.

    Parameters
    ----------
    device, precision
        As for every strategy.
    config
        DeepSpeed JSON from :func:`deepspeed_config`.
    run_dir
        The run directory; shards live under ``run_dir/checkpoints/deepspeed``.
    """

    def __init__(
        self, device: torch.device, precision: str, config: Mapping[str, Any], run_dir: Path
    ) -> None:
        super().__init__(device, precision)
        self.config = dict(config)
        self.shard_root = Path(run_dir) / CKPT_DIR / SHARD_DIR
        self.trainables: dict[str, DeepSpeedTrainable] = {}

    def _wrap_trainable(
        self,
        module: nn.Module,
        optim: OptimConfig,
        total_steps: int,
        lr: float | None,
        name: str | None,
    ) -> Trainable:
        # Imported here: deepspeed is slow to import and only this strategy needs it.
        import deepspeed

        name = name or f"group{len(self.trainables)}"
        if name in self.trainables:
            raise ValueError(f"group {name!r} is already wrapped")
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, optim, lr or optim.lr)
        factor = linear_decay(total_steps, optim.decay_start)
        engine, *_ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
            config=dict(self.config),
            dist_init_required=False,
        )
        trainable = DeepSpeedTrainable(engine, optimizer, name, self.shard_root, lr or optim.lr)
        self.trainables[name] = trainable
        return trainable

    def close(self) -> None:
        """Leave the process group through DeepSpeed, which drops its own references to the
        world and data-parallel groups: a later DeepSpeed run in this process (the next trial
        of a sweep worker) builds new ones instead of reusing the destroyed group's."""
        import deepspeed.comm

        if deepspeed.comm.is_initialized():
            deepspeed.comm.destroy_process_group()
        super().close()

    def save_shards(self, run_dir: Path, step: int) -> None:
        """Every rank writes its engine state under the tag of ``step``, then all meet."""
        tag = step_tag(step)
        if self.is_main:
            prune_unreferenced(Path(run_dir), self.shard_root, keep=tag)
        for trainable in self.trainables.values():
            trainable.save_shards(tag)
        # Rank 0's checkpoint may refer to the tag only once every rank has written it.
        self.barrier()
