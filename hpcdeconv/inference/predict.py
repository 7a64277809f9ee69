"""Tiled, blended network inference on one in-memory volume or one halo-carrying block.

:func:`predict_volume` is the single-node path (``hpcdeconv predict``); :func:`predict_block`
is what each task of the distributed driver runs on the block it read. Both cut the array
into equal tiles (:func:`~hpcdeconv.inference.tiling.tile_grid`), run the network on
batches of tiles and blend the outputs (:func:`~hpcdeconv.inference.tiling.stitch`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from hpcdeconv.errors import ConfigError, InputError
from hpcdeconv.inference.tiling import (
    BLEND_MODES,
    BlendMode,
    Block,
    Sides,
    Tile,
    pad_to,
    stitch,
    tile_grid,
)

logger = logging.getLogger(__name__)

Model = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PredictSettings:
    """How a network is applied tile by tile.

    Attributes
    ----------
    tile
        Tile shape, one entry per spatial axis, e.g. ``(64, 64, 64)``; rounded up to a
        multiple of ``size_multiple``. Along an axis shorter than the tile a single tile of
        the axis length (rounded up likewise) is used.
    overlap
        Voxels shared by neighbouring tiles, ``0 <= overlap < tile``.
    blend
        ``"constant"``, ``"linear"`` or ``"gaussian"``, see
        :func:`~hpcdeconv.inference.tiling.blend_weights`.
    batch_size
        Tiles per forward pass.
    device
        Where the network runs; the network must already be there.
    autocast_dtype
        Autocast dtype (e.g. ``torch.bfloat16``), or ``None`` for full precision.
    size_multiple
        Tile sides must be multiples of this (``2**levels`` for a U-Net).
    progress
        Show a tqdm progress bar over tiles.
    """

    tile: tuple[int, ...] = (64, 64, 64)
    overlap: int = 16
    blend: BlendMode = "linear"
    batch_size: int = 1
    device: torch.device | str = "cpu"
    autocast_dtype: torch.dtype | None = None
    size_multiple: int = 1
    progress: bool = False

    def __post_init__(self) -> None:
        if self.blend not in BLEND_MODES:
            raise ConfigError(f"blend must be one of {', '.join(BLEND_MODES)}, got {self.blend!r}")
        if self.batch_size < 1 or self.size_multiple < 1:
            raise ConfigError("batch_size and size_multiple must be at least 1")
        if not self.tile or min(self.tile) < 1:
            raise ConfigError(f"tile {self.tile} must have positive sides")
        smallest = min(self.rounded_tile)
        if not 0 <= self.overlap < smallest:
            raise ConfigError(f"overlap {self.overlap} must lie in [0, {smallest}) for this tile")

    @property
    def rounded_tile(self) -> tuple[int, ...]:
        """``tile`` rounded up to multiples of ``size_multiple``."""
        return tuple(_round_up(t, self.size_multiple) for t in self.tile)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _plan(shape: Sequence[int], settings: PredictSettings) -> tuple[tuple[int, ...], list[int]]:
    """Tile shape and per-axis overlap actually used on an array of ``shape``.

    An axis no longer than the tile gets one tile of its own length (rounded up to the
    size multiple), so short axes are padded only as much as the network requires.
    """
    tile, overlap = [], []
    for size, t in zip(shape, settings.rounded_tile, strict=True):
        single = size <= t
        tile.append(_round_up(size, settings.size_multiple) if single else t)
        overlap.append(0 if single else settings.overlap)
    return tuple(tile), overlap


def _unpad(widths: Sides, shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(lo, lo + n) for (lo, _), n in zip(widths, shape, strict=True))


def _batches(tiles: list[Tile], size: int) -> Iterator[list[Tile]]:
    for start in range(0, len(tiles), size):
        yield tiles[start : start + size]


def _run_tiles(
    model: Model, image: np.ndarray, tiles: list[Tile], settings: PredictSettings
) -> Iterator[tuple[Tile, np.ndarray]]:
    """Yield ``(tile, output)`` for every tile, running the network one batch at a time.

    ``image`` is ``(C, *S)``; inputs are stacked to ``(B, C, *tile)`` and moved to the
    device; outputs come back as float32 numpy arrays of shape ``(C, *tile)``.
    """
    device = torch.device(settings.device)
    autocast = (
        torch.autocast(device.type, dtype=settings.autocast_dtype)
        if settings.autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with tqdm(total=len(tiles), unit="tile", disable=not settings.progress) as bar:
        for batch in _batches(tiles, settings.batch_size):
            inputs = torch.from_numpy(np.stack([image[(slice(None), *t.source)] for t in batch]))
            with torch.inference_mode(), autocast:
                outputs = model(inputs.to(device))
            if outputs.shape != inputs.shape:
                raise ValueError(
                    f"model output shape {tuple(outputs.shape)} differs from its input "
                    f"{tuple(inputs.shape)}; expected (B, C, *tile) out for (B, C, *tile) in"
                )
            bar.update(len(batch))
            yield from zip(batch, outputs.float().cpu().numpy(), strict=True)


def _predict_image(model: Model, image: np.ndarray, settings: PredictSettings) -> np.ndarray:
    """Tile, run and blend over one float32 image ``(C, *S)``; returns the same shape."""
    spatial = image.shape[1:]
    tile, overlap = _plan(spatial, settings)
    widths = pad_to(spatial, tile)
    if any(map(any, widths)):
        image = np.pad(image, ((0, 0), *widths), mode="symmetric")
    tiles = tile_grid(image.shape[1:], tile, overlap)
    logger.debug("%d tiles of %s over %s", len(tiles), tile, image.shape)
    out = stitch(_run_tiles(model, image, tiles, settings), image.shape, settings.blend)
    return out[(slice(None), *_unpad(widths, spatial))]


def predict_array(
    model: Model,
    array: np.ndarray,
    settings: PredictSettings,
    channels: int = 1,
    lead: int = 0,
) -> np.ndarray:
    """Tile, run and blend over every image of a float32 array; returns the same shape.

    The trailing ``len(settings.tile)`` axes are the network's spatial axes; ``lead``
    axes before them hold images run one by one (Z planes for a 2D network, channels for
    a 1-channel network). A network of ``channels > 1`` takes the first leading axis
    whole as its channels: ``array`` is then ``(C, ..., *S)``.

    Raises
    ------
    InputError
        ``array`` does not have ``lead + len(settings.tile)`` axes, or a channel axis that
        is not ``channels`` long.
    """
    spatial = len(settings.tile)
    whole = 1 if channels > 1 else 0
    if array.ndim != spatial + lead or lead < whole:
        raise InputError(
            f"volume has {array.ndim} axes but the tile {settings.tile} has {spatial}"
            + (f" and {lead} leading axes are expected" if lead else "")
            + (f", the first {channels} channels long" if whole else "")
        )
    if whole and array.shape[0] != channels:
        raise InputError(f"image has {array.shape[0]} channels, the network takes {channels}")
    out = np.empty(array.shape, dtype=np.float32)
    for index in np.ndindex(*array.shape[whole:lead]):
        where = (slice(None), *index) if whole else index
        image = array[where] if whole else array[where][None]
        result = _predict_image(model, image, settings)
        out[where] = result if whole else result[0]
    return out


def predict_volume(
    model: Model,
    volume: np.ndarray,
    tile: Sequence[int] = (64, 64, 64),
    overlap: int = 16,
    blend: BlendMode = "linear",
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    size_multiple: int = 1,
    progress: bool = False,
    channels: int = 1,
    lead: int = 0,
) -> np.ndarray:
    """Apply a network to a volume tile by tile and blend the tile outputs.

    Axes shorter than the tile are padded symmetrically (to the axis length rounded up to
    ``size_multiple``) and cropped back afterwards. With ``blend="constant"`` the result
    equals ``model`` applied to the whole (padded) volume whenever the network's
    receptive-field radius is at most ``overlap // 2``.

    Parameters
    ----------
    model
        Network mapping ``(B, C, Z, Y, X)`` to the same shape (or 2D analogues), already
        on ``device`` and in eval mode; it is called under :func:`torch.inference_mode`.
    volume
        Array of shape ``(Z, Y, X)`` (or ``(Y, X)`` with a 2D tile), after ``lead``
        leading axes of images run one by one (:func:`predict_array`); cast to float32.
    tile, overlap, blend, batch_size, device, autocast_dtype, size_multiple, progress
        See :class:`PredictSettings`.
    channels, lead
        Input channels of the network (above 1 the first leading axis is taken whole as
        the channels) and the number of leading axes, see :func:`predict_array`.

    Returns
    -------
    np.ndarray
        float32 array of the same shape as ``volume``.
    """
    settings = PredictSettings(
        tile=tuple(int(t) for t in tile),
        overlap=overlap,
        blend=blend,
        batch_size=batch_size,
        device=device,
        autocast_dtype=autocast_dtype,
        size_multiple=size_multiple,
        progress=progress,
    )
    return predict_array(model, np.asarray(volume, dtype=np.float32), settings, channels, lead)


def predict_block(
    model: Model, data: np.ndarray, block: Block, settings: PredictSettings, channels: int = 1
) -> np.ndarray:
    """Process one block of a :func:`~hpcdeconv.inference.tiling.block_grid` in memory.

    ``data`` is the block's read region; it is padded symmetrically by ``block.pad`` (the
    halo missing at volume borders), tiled and blended as in :func:`predict_volume`, and
    cropped to the region the block writes.

    Parameters
    ----------
    model
        Network mapping ``(B, C, Z, Y, X)`` (or ``(B, C, Y, X)``) to the same shape.
    data
        ``volume[block.read]``, e.g. ``(Z_r, Y_r, X_r)``; leading axes as in
        :func:`predict_array` (the block's halo is 0 along them).
    block
        The block being processed.
    settings
        Tiling, blending and device settings.
    channels
        Input channels of the network; the axes of ``data`` before the tile's are leading
        axes of :func:`predict_array`.

    Returns
    -------
    np.ndarray
        float32 array with the shape of ``block.write``.
    """
    expected = tuple(s.stop - s.start for s in block.read)
    if data.shape != expected:
        raise ValueError(f"block data has shape {data.shape}, its read region {expected}")
    padded = np.pad(np.asarray(data, dtype=np.float32), block.pad, mode="symmetric")
    lead = padded.ndim - len(settings.tile)
    return predict_array(model, padded, settings, channels, lead)[block.crop]
