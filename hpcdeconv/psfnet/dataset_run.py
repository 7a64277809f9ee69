"""Parallel, resumable generation of a PSF-samples store on a dask cluster.

The ``N`` samples are cut into tasks of ``chunk`` samples, one per storage chunk of the
store's arrays (:func:`~hpcdeconv.data.samples.create_psf_samples`). A task synthesises its
samples (:func:`~hpcdeconv.psfnet.dataset.synthesize`, a pure function of the seed and the
indices), writes its own chunks and then its ``done`` flag; no two tasks share a chunk.
``resume`` skips the tasks flagged done and recomputes the others, so a run that was killed
and resumed writes the same bytes as an uninterrupted one, whatever the number of workers.
The split is written, and the store marked complete, once every task is done.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from hpcdeconv.config import PSFDatasetConfig
from hpcdeconv.errors import ConfigError, InputError

if TYPE_CHECKING:
    from distributed import Client

    from hpcdeconv.psfnet.psf_models import PSFModel

logger = logging.getLogger(__name__)

#: ``new`` (refuse an existing output), ``overwrite`` or ``resume``.
DatasetMode = Literal["new", "overwrite", "resume"]
#: Root attribute holding the generating configuration, compared on ``resume``.
GENERATION_KEY = "generation"


@dataclass(frozen=True)
class DatasetReport:
    """What a run did.

    Attributes
    ----------
    computed, skipped
        Tasks computed now, and tasks already done by an earlier run.
    samples
        Samples computed now.
    seconds
        Wall time of the tasks.
    """

    computed: int
    skipped: int
    samples: int
    seconds: float

    @property
    def samples_per_second(self) -> float:
        """Samples computed per second of wall time."""
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def generation_record(cfg: PSFDatasetConfig) -> dict[str, Any]:
    """The settings that decide the samples' content (not where or on what they run)."""
    return cfg.model_dump(mode="json", exclude={"cluster", "device"})


def prepare_store(cfg: PSFDatasetConfig, model: PSFModel, out: Path, mode: DatasetMode) -> None:
    """Create the empty store (``new``/``overwrite``, or ``resume`` of a missing one), or
    check that an existing one was made by the same configuration (``resume``).

    Raises
    ------
    ConfigError
        ``resume`` of a store made with other settings.
    InputError
        ``resume`` of something that is not an incrementally written samples store.
    OutputExistsError
        ``new`` with an existing ``out``.
    """
    from hpcdeconv.data.samples import DONE, KIND, create_psf_samples
    from hpcdeconv.data.zarr_io import ROOT_KEY, open_dataset

    record = generation_record(cfg)
    if mode == "resume" and out.exists():
        group = open_dataset(out, mode="r")
        root = group.attrs.asdict().get(ROOT_KEY, {})
        if root.get("kind") != KIND or DONE not in group or GENERATION_KEY not in root:
            raise InputError(f"{out}: not a store written by 'psfnet make-dataset'; cannot resume")
        if root[GENERATION_KEY] != record:
            raise ConfigError(
                f"{out} was made with other settings; rerun with its configuration, "
                "or --overwrite to start again"
            )
        return
    pixel = cfg.psf.optics.pixel_size
    create_psf_samples(
        out,
        count=cfg.samples,
        patch_shape=(1, cfg.patch, cfg.patch),
        names=model.names,
        units=model.units,
        voxel_size=(pixel, pixel),
        chunk=cfg.chunk,
        psf_model=model.record(),
        extra={GENERATION_KEY: record},
        codec=cfg.codec,
        overwrite=mode == "overwrite",
    )


def run_task(cfg_json: str, out: str, task: int) -> int:
    """Synthesise and write the samples of ``task``; returns how many (runs on a worker)."""
    import zarr

    from hpcdeconv.data.samples import task_range, write_psf_task
    from hpcdeconv.psfnet.dataset import resolve_device, synthesize
    from hpcdeconv.psfnet.psf_models import build_psf_model
    from hpcdeconv.psfnet.sources import source_library

    cfg = PSFDatasetConfig.model_validate_json(cfg_json)
    group = zarr.open_group(out, mode="r+")
    start, stop = task_range(group, task)
    batch = synthesize(
        cfg,
        build_psf_model(cfg.psf),
        source_library(cfg),
        range(start, stop),
        resolve_device(cfg.device),
    )
    write_psf_task(group, task, batch.patches, batch.params, batch.valid)
    return stop - start


def pending_tasks(out: Path) -> tuple[list[int], int]:
    """Tasks of the store at ``out`` not done yet, and the number of tasks."""
    from hpcdeconv.data.samples import tasks_done
    from hpcdeconv.data.zarr_io import open_dataset

    done = tasks_done(open_dataset(out, mode="r"))
    return [int(t) for t in (~done).nonzero()[0]], int(done.size)


def _submit_options(client: Client, cfg: PSFDatasetConfig) -> dict[str, Any]:
    from hpcdeconv.inference.cluster import GPU_RESOURCE, workers_declare_gpus

    if cfg.device != "cpu" and workers_declare_gpus(client):
        return {"resources": {GPU_RESOURCE: 1}}
    return {}


def generate(
    cfg: PSFDatasetConfig, out: Path, client: Client | None, limit: int | None = None
) -> DatasetReport:
    """Compute every task of ``out`` that is not done, then write the split.

    Parameters
    ----------
    cfg
        The configuration the store was prepared with (:func:`prepare_store`).
    out
        The store.
    client
        dask client whose workers run the tasks; None runs them here, one after another.
    limit
        Compute at most this many tasks (an interrupted run, for tests); the split is then
        written only if every task is done.

    Returns
    -------
    DatasetReport
        Tasks computed and skipped, samples and time.
    """
    from hpcdeconv.data.samples import finalise_psf_samples
    from hpcdeconv.data.zarr_io import open_dataset
    from hpcdeconv.psfnet.dataset import split_indices

    pending, total = pending_tasks(out)
    todo = pending if limit is None else pending[:limit]
    cfg_json, path = cfg.model_dump_json(), str(out)
    began, samples = time.perf_counter(), 0
    if client is None:
        for task in todo:
            samples += run_task(cfg_json, path, task)
    else:
        from distributed import as_completed

        futures = client.map(
            run_task,
            [cfg_json] * len(todo),
            [path] * len(todo),
            todo,
            pure=False,
            **_submit_options(client, cfg),
        )
        for finished, future in enumerate(as_completed(futures), start=1):
            samples += int(future.result())
            if finished % max(1, len(todo) // 10) == 0 or finished == len(todo):
                logger.info("%d of %d task(s) done", finished, len(todo))
    seconds = time.perf_counter() - began
    if len(todo) == len(pending):
        split = split_indices(cfg.samples, cfg.split.val, cfg.split.test)
        finalise_psf_samples(open_dataset(out, mode="r+"), split)
    return DatasetReport(len(todo), total - len(pending), samples, seconds)


def prepare(cfg: PSFDatasetConfig, out: Path, mode: DatasetMode, local: bool = True) -> None:
    """Check the model and the sources, then prepare the store (:func:`prepare_store`).

    Parameters
    ----------
    cfg, out, mode
        As :func:`prepare_store`.
    local
        Whether the tasks run on this machine (a ``cuda`` device is then checked here).

    Raises
    ------
    ConfigError
        Bad parameter ranges or optics, sources smaller than a blurred patch, no GPU for
        ``device: cuda``, ``resume`` with other settings.
    InputError
        Unreadable or unfit sources.
    """
    from hpcdeconv.psfnet.dataset import resolve_device
    from hpcdeconv.psfnet.psf_models import build_psf_model
    from hpcdeconv.psfnet.sources import source_library

    model = build_psf_model(cfg.psf)
    if local:
        resolve_device(cfg.device)
    source_library(cfg)  # fails here, before anything is written, if a source is unfit
    prepare_store(cfg, model, out, mode)


def make_dataset(
    cfg: PSFDatasetConfig, out: Path, mode: DatasetMode, client: Client | None = None
) -> DatasetReport:
    """:func:`prepare` the store and :func:`generate` every task not done yet."""
    prepare(cfg, out, mode, local=client is None or cfg.cluster.kind == "local")
    return generate(cfg, out, client)
