"""PSF-parameter samples: store layout, deterministic rank-sharded batches, resume, errors."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from hpcdeconv.config import PSFSamplesData
from hpcdeconv.data.sample_feed import PSFSampleFeed
from hpcdeconv.data.samples import PSFSampleStore, write_psf_samples
from hpcdeconv.errors import InputError, OutputExistsError

N, C, P = 24, 2, 3
SPATIAL = (8, 10)
NAMES = ("defocus", "astig_0", "astig_45")
UNITS = ("micrometer", "rad", "rad")


def _arrays(n: int = N, spatial: tuple[int, ...] = SPATIAL) -> tuple[np.ndarray, ...]:
    # Sample i's patch is filled with i (channel c: i + 1000 c), its parameters are i + p / 10.
    patches = np.zeros((n, C, *spatial), np.float32)
    patches += np.arange(n, dtype=np.float32).reshape(n, 1, *([1] * len(spatial)))
    patches += 1000.0 * np.arange(C, dtype=np.float32).reshape(1, C, *([1] * len(spatial)))
    params = np.arange(n, dtype=np.float32)[:, None] + np.arange(P, dtype=np.float32) / 10
    valid = (np.arange(n)[:, None] + np.arange(P)) % 4 != 0
    return patches, params, valid


@pytest.fixture
def store(tmp_path: Path) -> Path:
    patches, params, valid = _arrays()
    path = tmp_path / "samples.zarr"
    split = {"train": list(range(4, N)), "val": [0, 1, 2], "test": [3]}
    write_psf_samples(path, patches, params, NAMES, UNITS, (0.1, 0.1), valid, split)
    return path


def _feed(path: Path, **kw: object) -> PSFSampleFeed:
    cfg = PSFSamplesData(path=path, batch_size=int(kw.pop("batch_size", 2)), val_samples=2)
    return PSFSampleFeed(cfg, **kw)  # type: ignore[arg-type]


def _take(feed: PSFSampleFeed, start: int, n: int) -> list[dict[str, torch.Tensor]]:
    return list(itertools.islice(feed.loader(start), n))


def _ids(batch: dict[str, torch.Tensor]) -> list[int]:
    return [int(v) for v in batch["patch"][:, 0, 0, 0]]


def test_layout_on_disk_and_batches_hold_the_stored_samples(store: Path) -> None:
    group = zarr.open_group(store, mode="r")
    assert group["patches"].shape == (N, C, *SPATIAL) and group["patches"].dtype == np.float32
    assert group["params"].shape == (N, P) and group["valid"].dtype == np.bool_
    root = json.loads((store / "zarr.json").read_text())["attributes"]["hpcdeconv"]
    assert root["kind"] == "psf_samples" and root["split"]["val"] == [0, 1, 2]
    assert [p["name"] for p in root["parameters"]] == list(NAMES)
    feed = _feed(store, seed=0)
    info = feed.info()
    assert (info.spatial_dims, info.channels, info.voxel_size) == (2, C, (0.1, 0.1))
    assert feed.names == NAMES
    _, params, valid = _arrays()
    for batch in _take(feed, 0, 5):
        assert batch["patch"].shape == (2, C, *SPATIAL) and batch["patch"].dtype == torch.float32
        assert batch["params"].shape == (2, P) and batch["valid"].dtype == torch.bool
        for row, i in enumerate(_ids(batch)):
            assert 4 <= i < N  # training samples only
            assert torch.equal(batch["patch"][row, 1], torch.full(SPATIAL, 1000.0 + i))
            assert torch.equal(batch["params"][row], torch.from_numpy(params[i]))
            assert torch.equal(batch["valid"][row], torch.from_numpy(valid[i]))


def test_same_seed_same_batches_and_every_sample_once_per_epoch(store: Path) -> None:
    a = [_ids(b) for b in _take(_feed(store, seed=3), 0, 20)]
    b = [_ids(b) for b in _take(_feed(store, seed=3), 0, 20)]
    other = [_ids(b) for b in _take(_feed(store, seed=4), 0, 20)]
    assert a == b and a != other
    flat = [i for batch in a for i in batch]
    train = N - 4
    for epoch in range(2):
        assert sorted(flat[epoch * train : (epoch + 1) * train]) == list(range(4, N))


def test_ranks_draw_disjoint_samples_that_make_up_the_single_process_batch(store: Path) -> None:
    single = _take(_feed(store, seed=1, batch_size=4), 0, 5)  # 20 samples: one epoch
    ranks = [_take(_feed(store, seed=1, rank=r, world_size=2), 0, 5) for r in range(2)]
    for step in range(5):
        per_rank = [set(_ids(r[step])) for r in ranks]
        assert not per_rank[0] & per_rank[1]
        assert per_rank[0] | per_rank[1] == set(_ids(single[step]))


def test_a_resumed_loader_repeats_the_uninterrupted_batches(store: Path) -> None:
    whole = _take(_feed(store, seed=2), 0, 8)
    resumed = _take(_feed(store, seed=2), 5, 3)
    for a, b in zip(whole[5:], resumed, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("patch", "params", "valid"))
    cfg = PSFSamplesData(path=store, batch_size=2, num_workers=1)
    workers = list(itertools.islice(PSFSampleFeed(cfg, seed=2).loader(5), 3))
    assert all(torch.equal(a["patch"], b["patch"]) for a, b in zip(resumed, workers, strict=True))
    feed = _feed(store, seed=2)
    feed.load_state_dict(feed.state_dict())
    with pytest.raises(InputError, match="cannot resume: data seed"):
        _feed(store, seed=5).load_state_dict(feed.state_dict())


def test_validation_samples_and_crop(store: Path, tmp_path: Path) -> None:
    val = _feed(store, seed=0).validation()
    assert val is not None and val.patches.shape == (2, C, *SPATIAL)
    assert [int(v) for v in val.patches[:, 0, 0, 0]] == [0, 1]
    _, params, valid = _arrays()
    np.testing.assert_array_equal(val.params, params[:2])
    np.testing.assert_array_equal(val.valid, valid[:2])
    assert val.names == NAMES and val.units == UNITS
    cropped = _feed(store, seed=0).validation(crop=(4, 20))
    assert cropped is not None and cropped.patches.shape == (2, C, 4, 10)
    patches, params, _ = _arrays()
    write_psf_samples(tmp_path / "nval.zarr", patches, params, NAMES, UNITS, (0.1, 0.1))
    assert _feed(tmp_path / "nval.zarr", seed=0).validation() is None


def test_3d_patches(tmp_path: Path) -> None:
    patches, params, _ = _arrays(6, (4, 6, 6))
    write_psf_samples(tmp_path / "v.zarr", patches, params, NAMES, UNITS, (0.3, 0.1, 0.1))
    feed = _feed(tmp_path / "v.zarr", seed=0)
    assert feed.info().spatial_dims == 3
    assert _take(feed, 0, 1)[0]["patch"].shape == (2, C, 4, 6, 6)


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda g: g["valid"].resize((N, P + 1)), "must both be"),
        (lambda g: g.create_array("params", shape=(N, P), dtype="f8", overwrite=True), "float64"),
    ],
)
def test_bad_layouts_are_one_input_error(store: Path, damage: object, message: str) -> None:
    PSFSampleStore(store)  # the untouched store opens
    damage(zarr.open_group(store, mode="r+"))  # type: ignore[operator]
    with pytest.raises(InputError, match=message) as exc:
        _feed(store, seed=0)
    _one_line(exc)


def test_missing_array_wrong_kind_and_bad_split(store: Path, tmp_path: Path) -> None:
    group = zarr.open_group(store, mode="r+")
    del group["patches"]
    with pytest.raises(InputError, match="no 'patches' array") as exc:
        PSFSampleStore(store)
    _one_line(exc)
    image = tmp_path / "image.zarr"
    from hpcdeconv.data.zarr_io import create_dataset

    create_dataset(image)
    with pytest.raises(InputError, match="not a PSF-samples store"):
        PSFSampleStore(image)
    patches, params, valid = _arrays()
    for split, text in [
        ({"train": [0, N]}, "outside"),
        ({"train": [0, 1], "val": [1]}, "listed twice"),
        ({"training": [0]}, "unknown split"),
    ]:
        with pytest.raises(InputError, match=text) as exc:
            write_psf_samples(
                tmp_path / "x.zarr", patches, params, NAMES, UNITS, (1, 1), valid, split
            )
        _one_line(exc)
    with pytest.raises(InputError, match=r"must be \(N, C, Y, X\)"):
        write_psf_samples(tmp_path / "x.zarr", patches[:, 0], params, NAMES, UNITS, (1, 1))
    with pytest.raises(InputError, match="2 positive sizes"):
        write_psf_samples(tmp_path / "x.zarr", patches, params, NAMES, UNITS, (1, 1, 1))
    assert not (tmp_path / "x.zarr").exists()
    with pytest.raises(OutputExistsError):
        write_psf_samples(store, patches, params, NAMES, UNITS, (0.1, 0.1))
