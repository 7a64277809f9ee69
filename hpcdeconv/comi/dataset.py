"""COMI training pairs: fields of view → split by field → one intensity mapping → a store.

The store has the dataset layout of :mod:`hpcdeconv.data.zarr_io`. For every image
series ``s`` (a stack, a stain of a field, a synthetic field) and every out-of-focus
plane ``k`` of it there is one id ``<s>_z<k>`` (real planes, ``k`` the offset from the
in-focus plane, e.g. ``a01_s1_w1_z-3``) or ``<s>_d<k>`` (synthetic, ``k`` the draw), with

* ``sharp/<id>``: the in-focus plane of ``s``, ``(Y, X)`` or ``(C, Y, X)``;
* ``blurred/<id>``: the out-of-focus plane (registered to the in-focus one when asked).

The in-focus plane is thus stored once per out-of-focus plane, so that the paired feed
(same id in both domains) and the unpaired feed of :mod:`hpcdeconv.data.datasets` read the
store unchanged. Cost: ``2·n`` planes per series instead of ``n + 1``, i.e. 12 instead of
7 (1.7×) for the paper's six offsets; Blosc compresses each copy alike.

Every plane is stored mapped by ONE affine intensity mapping
(:class:`~hpcdeconv.data.intensity.IntensityMap`) fitted on the training split's in-focus
planes, so that all images share one scale; the split is by field of view (all planes and
stains of one field in one split, as the paper's 8:2 split of fields). The root attribute
``hpcdeconv`` records ``intensity`` (the mapping) and ``comi_dataset`` (the generating
configuration, the fields of each split, counts); each image's attribute ``comi`` records
its provenance (source file(s), field, plane, offset, the registration shift ``(dy, dx)``
in pixels, or the synthetic defocus in waves).

Nothing is written until every input has been opened and checked and the mapping fitted:
a refused run leaves no output.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from hpcdeconv.config.comi_data import COMIDatasetConfig, COMISplit, IntensityFit
from hpcdeconv.data.intensity import INTENSITY_KEY, IntensityMap, fit_intensity_map
from hpcdeconv.data.zarr_io import (
    BLURRED,
    SHARP,
    SPLITS,
    create_dataset,
    set_split,
    update_root_attrs,
    write_volume,
)
from hpcdeconv.errors import InputError

__all__ = [
    "COMIField",
    "DatasetReport",
    "build_fields",
    "fit_mapping",
    "make_dataset",
    "split_fields",
]

logger = logging.getLogger(__name__)

#: Root attribute key of the generation record.
RECORD_KEY = "comi_dataset"
#: At most this many values of the training in-focus planes estimate the percentiles.
FIT_VALUES = 1 << 22
#: ``pyramid_min_size`` of :func:`~hpcdeconv.data.zarr_io.write_volume` that adds no level.
NO_PYRAMID = 1 << 30


class COMIField(Protocol):
    """One image series of one field of view (a stack, a stain, a synthetic field)."""

    @property
    def name(self) -> str:
        """Prefix of its ids."""

    @property
    def field(self) -> str:
        """The field of view: the unit of the split."""

    @property
    def voxel_size(self) -> tuple[float, float]:
        """``(dy, dx)`` µm."""

    @property
    def shape(self) -> tuple[int, ...]:
        """``(C?, Y, X)`` of its planes."""

    def target(self) -> np.ndarray:
        """The in-focus plane, raw values, ``(C?, Y, X)`` float32."""

    def target_record(self) -> dict[str, Any]:
        """Provenance of the in-focus plane."""

    def pairs(self, target: np.ndarray) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
        """``(id suffix, raw out-of-focus plane, provenance)`` per out-of-focus plane."""


@dataclass(frozen=True)
class DatasetReport:
    """What :func:`make_dataset` wrote."""

    series: int
    pairs: dict[str, int]
    fields: dict[str, int]
    mapping: IntensityMap
    seconds: float


def build_fields(cfg: COMIDatasetConfig) -> list[COMIField]:
    """Every image series of ``cfg.source``, opened and checked (nothing read but headers,
    and the phantoms' parameters).

    Raises
    ------
    InputError
        Any bad input (see :mod:`hpcdeconv.comi.stacks`, :mod:`hpcdeconv.comi.defocus`),
        or series of different channel counts.
    """
    from hpcdeconv.comi.bbbc006 import bbbc006_series
    from hpcdeconv.comi.defocus import synthetic_fields
    from hpcdeconv.comi.stacks import stack_series

    source = cfg.source
    fields: Sequence[COMIField]
    if source.kind == "stacks":
        fields = stack_series(source)
    elif source.kind == "bbbc006":
        fields = bbbc006_series(source)
    else:
        fields = synthetic_fields(source, cfg.seed)
    first = fields[0]
    for series in fields[1:]:
        if len(series.shape) != len(first.shape) or (
            len(first.shape) == 3 and series.shape[0] != first.shape[0]
        ):
            raise InputError(
                f"field {series.name} has planes {series.shape} but {first.name} has "
                f"{first.shape}: the fields of one dataset share their channel count"
            )
    return list(fields)


def split_fields(fields: Sequence[str], split: COMISplit, seed: int) -> dict[str, list[str]]:
    """Fields of view per split, drawn by ``seed``: ``round(test·n)`` test fields, then
    ``round(val·rest)`` validation fields, at least one training field.

    Parameters
    ----------
    fields
        Distinct field names (their order does not matter: they are sorted first).
    split
        Test share of all fields, validation share of the rest.
    seed
        Seed of the draw.

    Raises
    ------
    InputError
        No field would be left for training.
    """
    names = sorted(set(fields))
    order = [names[i] for i in np.random.default_rng([seed, 0]).permutation(len(names))]
    n_test = round(split.test * len(names))
    n_val = round(split.val * (len(names) - n_test))
    if len(names) - n_test - n_val < 1:
        raise InputError(
            f"{len(names)} field(s) of view leave none for training with split.test "
            f"{split.test} and split.val {split.val}"
        )
    for name, share, count in (("val", split.val, n_val), ("test", split.test, n_test)):
        if share > 0 and count == 0:
            # A training run on this store would report no validation scores, or a
            # benchmark no test scores: said here, where the split is made.
            logger.warning(
                "split.%s %g of %d field(s) of view rounds to no %s field; give more fields "
                "or a larger share",
                name, share, len(names), name,
            )  # fmt: skip
    return {
        "train": sorted(order[n_test + n_val :]),
        "val": sorted(order[n_test : n_test + n_val]),
        "test": sorted(order[:n_test]),
    }


def _values(plane: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """``plane``'s values, at most ``budget`` of them drawn without replacement."""
    flat = plane.ravel()
    return flat if flat.size <= budget else rng.choice(flat, budget, replace=False)


def fit_mapping(targets: Sequence[COMIField], fit: IntensityFit, seed: int) -> IntensityMap:
    """The affine mapping that sends ``fit.percentiles`` of the in-focus planes of
    ``targets`` (the training series) to ``fit.target``.

    Each plane gives at most ``FIT_VALUES / len(targets)`` values (drawn by ``seed``), so
    the fit holds a bounded number of values whatever the size of the set; a small set
    is fitted on every value.

    Raises
    ------
    InputError
        Flat planes (their percentiles coincide).
    """
    rng = np.random.default_rng([seed, 1])
    budget = max(1, FIT_VALUES // max(1, len(targets)))
    values = [_values(series.target(), budget, rng) for series in targets]
    return fit_intensity_map(values, fit.percentiles, fit.target, max_values=FIT_VALUES, seed=seed)


def _record(cfg: COMIDatasetConfig, fields: Mapping[str, list[str]], pairs: int) -> dict[str, Any]:
    return {
        "config": cfg.model_dump(mode="json"),
        "fields": fields,
        "pairs": pairs,
        "ids": "<series>_z<offset> (planes) or <series>_d<draw> (synthetic)",
    }


def make_dataset(cfg: COMIDatasetConfig, output: Path, overwrite: bool = False) -> DatasetReport:
    """Check the inputs, split by field, fit the mapping, and write the store.

    Parameters
    ----------
    cfg
        Validated configuration.
    output
        The zarr store to create (checked against the inputs by the caller).
    overwrite
        Replace an existing store that hpcdeconv wrote.

    Raises
    ------
    InputError
        Any bad input; raised before the output is touched.
    OutputExistsError
        ``output`` exists without ``overwrite``.
    """
    start = time.perf_counter()
    series = build_fields(cfg)
    by_field = split_fields([s.field for s in series], cfg.split, cfg.seed)
    where = {field: name for name, members in by_field.items() for field in members}
    mapping = fit_mapping([s for s in series if where[s.field] == "train"], cfg.intensity, cfg.seed)
    logger.info("intensity mapping: raw [%g, %g] -> %s", mapping.low, mapping.high, mapping.target)
    group = create_dataset(output, overwrite=overwrite)
    # No downsampled levels: training reads planes at full resolution only, and writing
    # the pyramid took 3/4 of the time (a 256² plane: 70 ms with it, 20 ms without).
    storage = {
        "chunks": cfg.storage.chunks,
        "codec": cfg.storage.codec,
        "pyramid_min_size": NO_PYRAMID,
    }
    ids: dict[str, list[str]] = {name: [] for name in SPLITS}
    for s in series:
        split = where[s.field]
        raw = s.target()
        sharp = mapping.forward(raw)
        common = {"field": s.field, "series": s.name, "split": split}
        for suffix, plane, record in s.pairs(raw):
            vid = f"{s.name}_{suffix}"
            attrs = {"comi": {**common, **s.target_record()}}
            write_volume(group, f"{SHARP}/{vid}", sharp, s.voxel_size, attrs=attrs, **storage)
            attrs = {"comi": {**common, **record}}
            blurred = mapping.forward(plane)
            write_volume(group, f"{BLURRED}/{vid}", blurred, s.voxel_size, attrs=attrs, **storage)
            ids[split].append(vid)
        logger.debug("%s (%s) written", s.name, split)
    set_split(group, ids)
    total = sum(len(v) for v in ids.values())
    update_root_attrs(
        group, **{INTENSITY_KEY: mapping.record(), RECORD_KEY: _record(cfg, by_field, total)}
    )
    return DatasetReport(
        series=len(series),
        pairs={k: len(v) for k, v in ids.items()},
        fields={k: len(v) for k, v in by_field.items()},
        mapping=mapping,
        seconds=time.perf_counter() - start,
    )
