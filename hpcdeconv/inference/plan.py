"""How ``deconvolve`` and ``rl`` cut images into blocks: shape, halo, chunks, retries.

A :class:`BlockPlan` has one entry per axis of the images it cuts. For a network that
sees fewer axes than an image holds (a 2D network on a ``(Z, Y, X)`` stack, a 1-channel
network on a ``(C, Z, Y, X)`` image), :func:`image_plan` gives those extra axes blocks of
one plane (or of all channels, for a network that takes them together) and no halo, so
every task runs on whole planes and the halo is read in the network's own axes only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from hpcdeconv.data.zarr_io import clip_chunks
from hpcdeconv.errors import ConfigError, InputError
from hpcdeconv.inference.sources import VolumeSource
from hpcdeconv.inference.tiling import Block, block_grid

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockPlan:
    """How images are cut into tasks and how failed tasks are retried.

    Attributes
    ----------
    block
        Block shape, one entry per image axis (e.g. ``(Z, Y, X)``): a multiple of
        ``chunks``. Along an axis where an image needs more than one block it must be at
        least ``2 * halo`` (:meth:`check`), so a block does not read several times what
        it writes; an image that fits in one block along an axis is taken whole there,
        whatever the halo.
    halo
        Voxels read beyond each side of a block, per axis; clipped to the image's length
        (:meth:`halo_for`).
    chunks
        Output chunk shape; clipped to the image along short axes.
    retries
        Times a failed task is run again before the run fails.
    axes
        Names of the axes, for messages (``"ZYX"``, ``"YX"``, ``"CZYX"``...).
    """

    block: tuple[int, ...]
    halo: tuple[int, ...]
    chunks: tuple[int, ...]
    retries: int = 2
    axes: str = "ZYX"

    def __post_init__(self) -> None:
        if not len(self.block) == len(self.halo) == len(self.chunks) == len(self.axes):
            raise ConfigError(
                f"block {self.block}, halo {self.halo} and chunks {self.chunks} need one "
                f"entry per axis of {self.axes}"
            )
        if min(self.block) < 1 or min(self.chunks) < 1 or min(self.halo) < 0:
            raise ConfigError(
                f"block {self.block} and chunks {self.chunks} must be positive, "
                f"halo {self.halo} non-negative"
            )
        if self.retries < 0:
            raise ConfigError(f"retries must be >= 0, got {self.retries}")
        if any(b % c for b, c in zip(self.block, self.chunks, strict=True)):
            raise ConfigError(f"block {self.block} must be a multiple of chunks {self.chunks}")

    def chunks_for(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Output chunks of an image of ``shape``: ``chunks`` clipped to the image."""
        return clip_chunks(self.chunks, shape)

    def halo_for(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The halo clipped to the image: no axis reads or pads more than its length.

        Along an axis that one block covers, the read region is the whole axis whatever
        the halo; the symmetric padding (networks) then holds one mirror image at most.
        """
        return tuple(min(h, int(n)) for h, n in zip(self.halo, shape, strict=True))

    def check(self, shape: Sequence[int], what: str = "volume") -> None:
        """Refuse a halo above half the block along axes where ``shape`` needs several blocks.

        Raises
        ------
        InputError
            ``shape`` has another number of axes than the plan.
        ConfigError
            Naming the axes and the ``--block`` or ``--halo`` value that fixes it.
        """
        if len(shape) != len(self.block):
            raise InputError(
                f"{what} {tuple(int(n) for n in shape)} has {len(shape)} axes; the blocks "
                f"are planned for {len(self.block)} ({self.axes})"
            )
        split = [a for a, (n, b) in enumerate(zip(shape, self.block, strict=True)) if n > b]
        bad = [a for a in split if self.block[a] < 2 * self.halo[a]]
        if not bad:
            return
        step = math.lcm(*self.chunks)
        # The smallest --block (every axis) that either covers each bad axis or is at
        # least twice its halo; a larger block only removes splits.
        block = step
        while any(block < n and block < 2 * self.halo[a] for a, n in enumerate(shape)):
            block += step
        halo = min(self.block[a] // 2 for a in bad)
        axes = ", ".join(self.axes[a].lower() for a in bad)
        raise ConfigError(
            f"{what} {tuple(int(n) for n in shape)}: block {self.block} is smaller than "
            f"2 x halo {self.halo} along {axes}, where the volume needs several blocks; "
            f"use --block {block} or more, or --halo {halo} or less"
        )

    def grid(self, shape: Sequence[int]) -> list[Block]:
        """Blocks of an image of ``shape``, in C order of block index.

        Along an axis no longer than a chunk, the single chunk is the single block.
        """
        chunks = self.chunks_for(shape)
        block = tuple(
            b if s > c else s for b, c, s in zip(self.block, self.chunks, shape, strict=True)
        )
        return block_grid(shape, block, self.halo_for(shape), chunks)


def image_plan(
    sources: Sequence[VolumeSource],
    block: Sequence[int],
    halo: Sequence[int],
    chunks: Sequence[int],
    retries: int,
    channels: int = 1,
) -> BlockPlan:
    """The plan of images whose trailing ``len(block)`` axes the processing sees.

    Each leading axis gets blocks of one plane, no halo and one-plane chunks; with
    ``channels > 1`` the channel axis is taken whole instead. A run's inputs must share
    their axes (one plan cuts them all).

    Raises
    ------
    InputError
        Inputs with different axes.
    """
    dims = {s.dims for s in sources}
    if len(dims) > 1:
        names = ", ".join(f"{s.path} ({s.dims})" for s in sources)
        raise InputError(f"the inputs of one run must share their axes: {names}")
    axes = dims.pop() if dims else "ZYX"[-len(block) :]
    lead = axes[: len(axes) - len(block)]
    whole = [channels if a == "C" and channels > 1 else 1 for a in lead]
    return BlockPlan(
        (*whole, *block), (0,) * len(lead) + tuple(halo), (*whole, *chunks), retries, axes
    )


def check_plan(plan: BlockPlan, sources: Sequence[VolumeSource]) -> None:
    """:meth:`BlockPlan.check` for every input, before anything is started or written."""
    for source in sources:
        plan.check(source.shape, str(source.path))


def check_halo(halo: Sequence[int], needed: Sequence[int], what: str) -> None:
    """Warn when the halo is below the radius the processing needs for seamless output."""
    if any(h < n for h, n in zip(halo, needed, strict=True)):
        logger.warning(
            "halo %s is smaller than the %s %s: block borders will show seams",
            tuple(halo),
            what,
            tuple(needed),
        )
