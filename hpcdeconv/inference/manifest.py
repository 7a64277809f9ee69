"""Completion records of a block-wise run, kept in the output group's attributes.

The record lives in the root attribute ``hpcdeconv`` of the output zarr group, under
``deconvolve``::

    {"fingerprint": {...},            # what must match for --resume (inputs, plan, method)
     "provenance": {...},             # what produced the output (checkpoint, config, version)
     "completed": {"<name>": [[0, 12], [14, 20]], ...}}   # finished blocks, flat indices

Only the client writes it, after a worker has reported that a block's chunks are stored,
so no two processes ever update it at once and a block is never recorded before its data
exists. zarr writes metadata by atomic rename, so a client killed mid-update leaves the
previous record intact; blocks finished after the last flush are simply computed again.
Finished blocks are stored as half-open ranges of flat block indices (C order over the
block grid), which stays short because blocks tend to finish roughly in order.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import zarr

from hpcdeconv.data.zarr_io import ROOT_KEY, update_root_attrs
from hpcdeconv.errors import InputError

#: Key of the record inside the root ``hpcdeconv`` attribute.
RECORD_KEY = "deconvolve"


def encode_ranges(indices: Iterable[int]) -> list[list[int]]:
    """Sorted half-open ``[start, stop)`` ranges covering exactly ``indices``.

    >>> encode_ranges([0, 1, 2, 5, 7, 8])
    [[0, 3], [5, 6], [7, 9]]
    """
    ranges: list[list[int]] = []
    for index in sorted(set(indices)):
        if ranges and ranges[-1][1] == index:
            ranges[-1][1] = index + 1
        else:
            ranges.append([index, index + 1])
    return ranges


def decode_ranges(ranges: Sequence[Sequence[int]]) -> set[int]:
    """Inverse of :func:`encode_ranges`."""
    return {i for start, stop in ranges for i in range(int(start), int(stop))}


def read_record(group: zarr.Group) -> dict[str, Any] | None:
    """The completion record of an output group, or ``None`` if it has none."""
    root = group.attrs.asdict().get(ROOT_KEY)
    if not isinstance(root, Mapping):
        return None
    record = root.get(RECORD_KEY)
    return dict(record) if isinstance(record, Mapping) else None


def fingerprint_mismatch(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> str | None:
    """Name of the first top-level fingerprint entry that differs, or ``None``."""
    for key in sorted(set(stored) | set(wanted)):
        if stored.get(key) != wanted.get(key):
            return key
    return None


class Manifest:
    """Finished blocks per output array, flushed to the group attributes now and then.

    Parameters
    ----------
    group
        The output group, open for writing (client side only).
    fingerprint, provenance
        JSON-serialisable descriptions stored next to the completed blocks.
    completed
        Finished blocks already on record, per array name (flat block indices).
    min_interval_s
        Shortest time between two automatic flushes; each rewrites the root metadata.
    """

    def __init__(
        self,
        group: zarr.Group,
        fingerprint: Mapping[str, Any],
        provenance: Mapping[str, Any],
        completed: Mapping[str, set[int]] | None = None,
        min_interval_s: float = 2.0,
    ) -> None:
        self._group = group
        self._fingerprint = dict(fingerprint)
        self._provenance = dict(provenance)
        self._done: dict[str, set[int]] = {k: set(v) for k, v in (completed or {}).items()}
        self._interval = min_interval_s
        self._last_flush = time.monotonic()
        self._dirty = False

    @classmethod
    def resume(
        cls, group: zarr.Group, fingerprint: Mapping[str, Any], min_interval_s: float = 2.0
    ) -> Manifest:
        """Pick up the record of an earlier run whose fingerprint equals ``fingerprint``.

        Raises
        ------
        InputError
            The group holds no record, or one written with other inputs or settings.
        """
        record = read_record(group)
        if record is None or not isinstance(record.get("fingerprint"), Mapping):
            raise InputError(
                f"{group.store} holds no deconvolution record to resume; use --overwrite"
            )
        differs = fingerprint_mismatch(record["fingerprint"], fingerprint)
        if differs is not None:
            raise InputError(
                f"cannot resume {group.store}: it was written with a different '{differs}'; "
                "use --overwrite or the original settings"
            )
        completed = record.get("completed") or {}
        done = {str(name): decode_ranges(ranges) for name, ranges in completed.items()}
        provenance = record.get("provenance") or {}
        return cls(group, fingerprint, provenance, done, min_interval_s)

    def done(self, name: str) -> set[int]:
        """Flat indices of the finished blocks of array ``name`` (a copy)."""
        return set(self._done.get(name, ()))

    def mark(self, name: str, index: int) -> None:
        """Record block ``index`` of ``name`` as stored; flush if the last flush is old."""
        self._done.setdefault(name, set()).add(int(index))
        self._dirty = True
        if time.monotonic() - self._last_flush >= self._interval:
            self.flush()

    def flush(self) -> None:
        """Write the record to the group attributes (a no-op if nothing changed)."""
        if not self._dirty and read_record(self._group) is not None:
            return
        record = {
            "fingerprint": self._fingerprint,
            "provenance": self._provenance,
            "completed": {name: encode_ranges(done) for name, done in sorted(self._done.items())},
        }
        update_root_attrs(self._group, **{RECORD_KEY: record})
        self._last_flush = time.monotonic()
        self._dirty = False
