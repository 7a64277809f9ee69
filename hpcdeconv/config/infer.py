"""Inference configuration: ``deconvolve``, ``rl`` and ``predict``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from hpcdeconv.config.base import PositiveInt, Shape, Shape3D, StrictModel
from hpcdeconv.config.physics import BornWolfPSF, PSFConfig
from hpcdeconv.errors import ConfigError

_AXES = {2: "(Y, X)", 3: "(Z, Y, X)"}


class _TiledInference(StrictModel):
    """Tiled inference through a checkpoint's generator (``predict``, ``deconvolve``).

    Sizes are in voxels, with as many axes as the generator has, known once it is loaded
    (:meth:`shape_for`). ``tile`` and ``overlap`` left unset are the training run's
    ``train.val_tile`` and ``train.val_overlap`` (:meth:`tiling_for`): the tiling its
    validation scores were measured with. A generator with instance normalisation (the
    2D cycleGAN and COMI ResNets) normalises each tile by its own statistics, so its output
    depends on the tile size.
    """

    tile: Shape = (64, 64, 64)
    overlap: Annotated[int, Field(ge=0)] = 16
    blend: Literal["constant", "linear", "gaussian"] = "linear"
    batch_size: PositiveInt = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    #: On the CPU in fp32, run G_Θ through a frozen, optimised TorchScript trace per tile
    #: shape (hpcdeconv.inference.frozen): same output to ~1e-6, ~1.7x faster.
    freeze: bool = True

    def tiling_for(
        self, val_tile: tuple[int, ...], val_overlap: int, spatial_dims: int
    ) -> tuple[tuple[int, ...], int]:
        """``(tile, overlap)`` for a generator of ``spatial_dims`` trained (validated) with
        tiles ``val_tile`` overlapping by ``val_overlap`` voxels; a value set here wins.

        Raises
        ------
        ConfigError
            ``tile`` was set with a number of axes other than ``spatial_dims``.
        """
        if "tile" in self.model_fields_set or len(val_tile) != spatial_dims:
            tile = self.shape_for("tile", spatial_dims)
        else:
            tile = tuple(val_tile)
        overlap = self.overlap if "overlap" in self.model_fields_set else val_overlap
        return tile, overlap

    def shape_for(self, name: str, spatial_dims: int) -> tuple[int, ...]:
        """``self.<name>`` for a generator of ``spatial_dims`` (2 or 3).

        A size left at its 3D default drops Z for a 2D generator, as the training
        configuration's sizes follow its data; a size given with another number of axes
        is refused.

        Raises
        ------
        ConfigError
            ``name`` was set with a number of axes other than ``spatial_dims``.
        """
        value = tuple(getattr(self, name))
        if len(value) == spatial_dims:
            return value
        if name not in self.model_fields_set and len(value) > spatial_dims:
            return value[len(value) - spatial_dims :]
        raise ConfigError(
            f"{name} {value} has {len(value)} axes but the checkpoint's generator is "
            f"{spatial_dims}D: give {spatial_dims} sizes {_AXES[spatial_dims]}"
        )


class ClusterConfig(StrictModel):
    """Where the dask workers of ``hpcdeconv deconvolve`` / ``rl`` come from."""

    kind: Literal["local", "slurm", "mpi", "scheduler"] = "local"
    scheduler: str | None = None
    workers: Annotated[int, Field(ge=1)] | None = None
    threads_per_worker: PositiveInt = 1
    memory_per_worker: str = "4GiB"
    #: dask-jobqueue SLURMCluster settings (partition, walltime, GPUs per worker job).
    partition: str | None = None
    walltime: str = "01:00:00"
    gpus_per_worker: Annotated[int, Field(ge=0)] = 0
    dashboard: bool = True

    @field_validator("memory_per_worker")
    @classmethod
    def _size(cls, value: str) -> str:
        # Read here so that a typo fails when the configuration loads, not in dask.
        from dask.utils import parse_bytes

        if value.strip().lower() != "auto":
            try:
                parse_bytes(value)
            except ValueError:
                raise ValueError(f"{value!r} is not a size such as 4GiB or 'auto'") from None
        return value

    @model_validator(mode="after")
    def _scheduler_given(self) -> ClusterConfig:
        if self.kind == "scheduler" and not self.scheduler:
            raise ValueError("cluster.kind scheduler needs cluster.scheduler (tcp://host:port)")
        return self


class DeconvolveConfig(_TiledInference):
    """Block-wise, dask-distributed deconvolution of whole volumes into zarr.

    ``block``, ``tile`` and ``chunks`` have one size per axis of the checkpoint's
    generator: ``(Z, Y, X)``, or ``(Y, X)`` for a 2D generator, which runs on stacks of
    planes one plane per task (:meth:`shape_for`).
    """

    block: Shape = (128, 128, 128)
    halo: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    chunks: Shape = (64, 64, 64)
    retries: Annotated[int, Field(ge=0)] = 2
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)


class RLConfig(StrictModel):
    """Top level of ``hpcdeconv rl``: the PSF, the iterations and the decomposition.

    ``halo: auto`` reads ``rl_halo(psf.shape)`` voxels beyond each block side (three PSF
    widths), which keeps blocks within 1e-3 of whole-volume RL for 10-40 iterations.
    ``boundary`` is how RL treats the volume's border: ``reflect`` (the scene continues as
    its mirror image; a uniform field stays uniform) or ``truncated`` (dark outside the
    field of view, as scikit-image; the estimate overshoots within half a PSF of the
    border). See :mod:`hpcdeconv.classical.rl`.

    ``psf_crop`` (``--psf-map`` only) is the largest fraction of its energy a map PSF may
    lose when all are cropped to one centred support (0 keeps them whole); the halo
    scales with the cropped size (:func:`hpcdeconv.classical.sv_rl.crop_size`). With
    ``--psf-map`` the images are 2D: blocks are ``map_block`` (``--block N`` sets it) and
    chunks take the ``(Y, X)`` sizes of ``chunks``. 2D blocks are cheap in memory, and
    small ones redo much of their neighbours' work: each reads a halo of three cropped PSF
    widths and convolves every map node it touches over that node's whole mask support
    (two map strides). A 2048² image with a stride-128 map took 4× as long in 256² blocks
    as in 1024² ones (``docs/benchmarks.md``).
    """

    psf: PSFConfig = Field(default_factory=BornWolfPSF)
    iterations: PositiveInt = 20
    tv: Annotated[float, Field(ge=0)] = 0.0
    boundary: Literal["reflect", "truncated"] = "reflect"
    psf_crop: Annotated[float, Field(ge=0, lt=1)] = 1e-4
    block: Shape3D = (256, 256, 256)
    map_block: tuple[PositiveInt, PositiveInt] = (1024, 1024)
    halo: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    chunks: Shape3D = (64, 64, 64)
    retries: Annotated[int, Field(ge=0)] = 2
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)


class PredictConfig(_TiledInference):
    """In-memory tiled prediction of one image (``tile``: one size per generator axis)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
