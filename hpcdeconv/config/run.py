"""Run configuration: optimiser, training loop and distributed strategy."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    model_validator,
)

from hpcdeconv.config.base import PositiveFloat, PositiveInt, Shape, StrictModel


class OptimConfig(StrictModel):
    """One optimiser per group (Adam or AdamW); linear decay to zero from ``decay_start``.

    ``weight_decay`` is Adam's L2 term added to the gradient (``adam``) or AdamW's
    decoupled decay of the weights (``adamw``); 0 (the default) adds none.
    """

    name: Literal["adam", "adamw"] = "adam"

    #: Finite and below float32's largest value: optimiser states are float32 tensors.
    lr: Annotated[float, Field(gt=0, lt=3.4e38, allow_inf_nan=False)] = 1e-4
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (
        0.5,
        0.999,
    )
    weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    decay_start: Annotated[int, Field(ge=0)] | None = None


class TrainConfig(StrictModel):
    """The loop: budget, precision, cadence of validation/checkpoints/logs."""

    steps: PositiveInt = 200
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_checkpointing: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    deterministic: bool = False
    log_every: PositiveInt = 10
    val_every: PositiveInt = 100
    ckpt_every: PositiveInt = 100
    keep_checkpoints: PositiveInt = 2
    image_every: PositiveInt = 100
    val_tile: Shape = (64, 64, 64)
    val_overlap: Annotated[int, Field(ge=0)] = 16
    #: Validation metric that selects the ``best`` checkpoint: one the method reports
    #: (its direction is the method's); ``"none"`` keeps no best checkpoint.
    best_metric: Annotated[str, Field(min_length=1)] = "psnr"
    #: Decay of an exponential moving average of G_Θ's weights, kept, validated and saved
    #: beside the trained weights (e.g. 0.999); ``None`` keeps none.
    ema_decay: Annotated[float, Field(gt=0, lt=1)] | None = None
    #: Fixed centred (Z, Y, X) or (Y, X) crop of every validation image (clamped to it), so
    #: each evaluation scores the same voxels at a fraction of the cost; ``None``: whole images.
    val_crop: Shape | None = None
    #: Who requeues the SLURM job after a time-limit or preemption signal (SIGUSR1/SIGUSR2)
    #: once the trainer has written its checkpoint: ``trainer`` runs ``scontrol requeue``;
    #: ``submitit`` hands the signal on to the handler installed before the trainer's
    #: (submitit's, which pickles the job's next call and requeues it); ``none``: nobody
    #: (the run stops after its checkpoint). Exactly one of them acts.
    requeue: Literal["trainer", "submitit", "none"] = "trainer"

    @model_validator(mode="after")
    def _val_crop_fits_ssim(self) -> TrainConfig:
        # SSIM's Gaussian window (sigma 1.5 voxels) spans 11 voxels per axis.
        if self.val_crop is not None and min(self.val_crop) < 11:
            raise ValueError(
                f"val_crop {list(self.val_crop)} must be at least 11 voxels along every axis "
                "(the SSIM window)"
            )
        return self


class DeepSpeedConfig(StrictModel):
    """DeepSpeed engine settings; precision comes from ``train.precision`` only."""

    zero_stage: Annotated[int, Field(ge=0, le=3)] = 1
    #: Extra DeepSpeed JSON keys (e.g. ``zero_optimization.overlap_comm``); keys that
    #: contradict the YAML (precision, batch size, optimizer) are rejected.
    extra: dict[str, Any] = Field(default_factory=dict)


class StrategyConfig(StrictModel):
    """How the method's networks are distributed (the method is unaware of it)."""

    name: Literal["single", "ddp", "deepspeed"] = "single"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: PositiveFloat = 120.0
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
