"""Conventional cycleGAN baseline: a second deep generator F : X → Y as the blurring path.

Same objective as the blind method (eq. 13) with h * replaced by F, i.e. two deep
generators (about twice the parameters and step time).
"""

from __future__ import annotations

from hpcdeconv.config import COMIConfig, CycleGANConfig
from hpcdeconv.methods.base import DataInfo
from hpcdeconv.methods.cycle import CycleGANMethod
from hpcdeconv.models.factory import build_generator


class CycleGAN(CycleGANMethod):
    """G_Θ and F (two deep generators), discriminators φ on X and ψ on Y.

    The identity term (``loss.identity_weight`` > 0) maps both ways: ‖G(x) − x‖₁ and
    ‖F(y) − y‖₁.

    Parameters
    ----------
    cfg
        Method configuration (COMI's has the same networks and a loss that extends it).
    data
        The training data's description.
    seed
        Seed of the history pools.
    checkpointing
        Activation checkpointing of both generators.
    """

    def __init__(
        self,
        cfg: CycleGANConfig | COMIConfig,
        data: DataInfo,
        *,
        seed: int,
        checkpointing: bool,
    ) -> None:
        super().__init__(
            cfg.generator,
            data,
            checkpointing,
            # G : Y → X starts at the sharp domain's mean, F : X → Y at the blurred one's.
            blur=lambda: build_generator(
                cfg.blur_generator,
                spatial_dims=data.spatial_dims,
                in_channels=data.channels,
                out_channels=data.channels,
                checkpointing=checkpointing,
                start_mean=data.means.get("y"),
            ),
            discriminator=cfg.discriminator,
            domains=("x", "y"),
            loss=cfg.loss,
            seed=seed,
            blur_identity=True,
        )
