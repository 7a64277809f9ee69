"""Lazy zarr patch datasets: chunk-bounded reads, pickling, pairing, DataLoader workers."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader
from zarr.storage import LocalStore, WrapperStore

from hpcdeconv.data.datasets import PairedPatches, UnpairedPatches, ZarrVolumes, read_patch
from hpcdeconv.data.sampling import PatchSampler, PatchSpec, chunks_touched
from hpcdeconv.data.zarr_io import create_dataset, open_array, set_split, write_volume
from hpcdeconv.errors import InputError

SHAPE = (12, 20, 20)
CHUNKS = (4, 8, 8)
PATCH = (4, 8, 8)
OFFSET = 100_000.0  # voxel values encode their volume: value // OFFSET == volume number


def _sharp(i: int) -> np.ndarray:
    return i * OFFSET + np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)


def _volume_of(sharp_patch: torch.Tensor) -> int:
    numbers = torch.unique(torch.div(sharp_patch, OFFSET, rounding_mode="floor"))
    assert numbers.numel() == 1
    return int(numbers)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    path = tmp_path / "ds.zarr"
    group = create_dataset(path)
    for i in range(3):
        write_volume(group, f"sharp/v{i}", _sharp(i), (0.2, 0.1, 0.1), chunks=CHUNKS)
        write_volume(group, f"blurred/v{i}", 2 * _sharp(i) + 1, (0.2, 0.1, 0.1), chunks=CHUNKS)
    set_split(group, {"train": ["v0", "v1", "v2"]})
    return path


class ChunkCountingStore(WrapperStore):
    """Records every chunk key read from the wrapped store."""

    def __init__(self, store: LocalStore) -> None:
        super().__init__(store)
        self.chunk_reads: list[str] = []

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        if "/c/" in key:
            self.chunk_reads.append(key)
        return await super().get(key, prototype, byte_range)


def test_patch_read_touches_only_its_chunks(dataset: Path) -> None:
    store = ChunkCountingStore(LocalStore(dataset, read_only=True))
    array = open_array(zarr.open_group(store, mode="r"), "sharp/v1")
    for spec, expected in [
        (PatchSpec("v1", (0, 0, 0), PATCH), 1),  # aligned: one chunk
        (PatchSpec("v1", (2, 5, 3), PATCH), 8),  # straddles a boundary on every axis
        (PatchSpec("v1", (8, 12, 12), (4, 8, 8)), 4),
    ]:
        store.chunk_reads.clear()
        patch = read_patch(array, spec)
        assert len(store.chunk_reads) == chunks_touched(spec, CHUNKS) == expected
        np.testing.assert_array_equal(patch, _sharp(1)[spec.slices])


def test_handle_opens_lazily_and_pickles_small(dataset: Path, tmp_path: Path) -> None:
    missing = ZarrVolumes(tmp_path / "nothing.zarr")  # constructing touches nothing
    with pytest.raises(InputError, match=r"nothing\.zarr"):
        missing.read("sharp", PatchSpec("v0", (0, 0, 0), PATCH))

    volumes = ZarrVolumes(dataset, ["v0", "v2"])
    spec = PatchSpec("v2", (3, 4, 5), PATCH)
    np.testing.assert_array_equal(volumes.read("blurred", spec), 2 * _sharp(2)[spec.slices] + 1)
    blob = pickle.dumps(volumes)
    assert len(blob) < 1000 and b"LocalStore" not in blob  # no open store travels
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(clone.read("sharp", spec), _sharp(2)[spec.slices])
    with pytest.raises(InputError, match="v1"):
        volumes.read("sharp", PatchSpec("v1", (0, 0, 0), PATCH))


def test_split_shapes_and_chunks(dataset: Path) -> None:
    volumes = ZarrVolumes.from_split(dataset, "train")
    assert volumes.paired_shapes() == {f"v{i}": SHAPE for i in range(3)}
    assert volumes.chunks("sharp") == CHUNKS
    with pytest.raises(InputError, match="lists no volumes"):
        ZarrVolumes.from_split(dataset, "val")


def test_paired_same_volume_and_location(dataset: Path) -> None:
    volumes = ZarrVolumes(dataset)
    sampler = PatchSampler(volumes.paired_shapes(), PATCH, seed=0, align=CHUNKS)
    plain = PairedPatches(volumes, sampler, batch_size=2, steps=3, augment=False)
    augmented = PairedPatches(volumes, sampler, batch_size=2, steps=3, augment=True)
    assert len(plain) == 6
    for i in range(len(plain)):
        step, index = divmod(i, 2)
        spec = sampler.sample(step, index)
        item = plain[i]
        assert item["x"].shape == (1, *PATCH) and item["x"].dtype == torch.float32
        expected = _sharp(int(spec.volume[1:]))[spec.slices]
        np.testing.assert_array_equal(item["x"][0].numpy(), expected)
        aug = augmented[i]
        torch.testing.assert_close(aug["y"], 2 * aug["x"] + 1, rtol=0, atol=0)
        assert torch.equal(aug["x"].flatten().sort().values, item["x"].flatten().sort().values)


def test_unpaired_draws_different_volumes(dataset: Path) -> None:
    volumes = ZarrVolumes(dataset)
    shapes = volumes.paired_shapes()
    data = UnpairedPatches(
        volumes,
        PatchSampler(shapes, PATCH, seed=4),
        PatchSampler(shapes, PATCH, seed=4),
        batch_size=4,
        steps=5,
    )
    pairs = [(_volume_of(s["x"]), _volume_of((s["y"] - 1) / 2)) for s in data]
    assert all(vx != vy for vx, vy in pairs)
    assert len({vx for vx, _ in pairs}) == 3
    with pytest.raises(InputError, match="other than 'v0'"):
        one = {"v0": SHAPE}
        UnpairedPatches(volumes, PatchSampler(one, PATCH, 0), PatchSampler(one, PATCH, 0), 1, 1)


def test_dataloader_workers_match_single_process(dataset: Path) -> None:
    volumes = ZarrVolumes(dataset)
    sampler = PatchSampler(volumes.paired_shapes(), PATCH, seed=1, rank=1, world_size=2)
    data = PairedPatches(volumes, sampler, batch_size=3, steps=4, start_step=10)
    reference = list(DataLoader(data, batch_size=3, num_workers=0))
    loader = DataLoader(data, batch_size=3, num_workers=2, persistent_workers=False)
    batches = list(loader)
    assert len(batches) == 4
    for got, want in zip(batches, reference, strict=True):
        assert got["x"].shape == (3, 1, *PATCH)
        assert torch.equal(got["x"], want["x"]) and torch.equal(got["y"], want["y"])
    # Resuming at step 12 reproduces the batches of the uninterrupted run.
    resumed = PairedPatches(volumes, sampler, batch_size=3, steps=2, start_step=12)
    again = list(DataLoader(resumed, batch_size=3, num_workers=0))
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(again, reference[2:], strict=True))


@pytest.mark.slow
def test_spawned_workers_reopen_the_store(dataset: Path) -> None:
    volumes = ZarrVolumes(dataset)
    volumes.read("sharp", PatchSpec("v0", (0, 0, 0), PATCH))  # opened in the parent first
    sampler = PatchSampler(volumes.paired_shapes(), PATCH, seed=2)
    data = PairedPatches(volumes, sampler, batch_size=2, steps=2)
    reference = list(DataLoader(data, batch_size=2, num_workers=0))
    spawned = DataLoader(data, batch_size=2, num_workers=1, multiprocessing_context="spawn")
    assert all(torch.equal(a["y"], b["y"]) for a, b in zip(spawned, reference, strict=True))


def test_single_channel_samples_are_todays_bit_for_bit(dataset: Path) -> None:
    """(1, Z, Y, X) samples equal a read of the (Z, Y, X) patch augmented by the sample's rng."""
    from hpcdeconv.data.augment import random_rot_flip_many

    volumes = ZarrVolumes(dataset)
    sampler = PatchSampler(volumes.paired_shapes(), PATCH, seed=5, rank=1, world_size=3)
    data = PairedPatches(volumes, sampler, batch_size=2, steps=3, start_step=7)
    for i in range(len(data)):
        step, index = divmod(i, 2)
        spec = sampler.sample(7 + step, index)
        x = _sharp(int(spec.volume[1:]))[spec.slices]
        (want,) = random_rot_flip_many([x], sampler.rng(7 + step, index, 2))
        assert np.array_equal(data[i]["x"].numpy(), want[None])


def _channel_image(i: int, spatial: tuple[int, ...], channels: int) -> np.ndarray:
    plane = i * OFFSET + np.arange(np.prod(spatial), dtype=np.float32).reshape(spatial)
    return np.stack([plane + 1000.0 * c for c in range(channels)])


@pytest.mark.parametrize(("spatial", "patch"), [((20, 24), (8, 8)), ((6, 20, 20), (4, 8, 8))])
def test_channel_images_give_c_first_samples(
    tmp_path: Path, spatial: tuple[int, ...], patch: tuple[int, ...]
) -> None:
    group = create_dataset(tmp_path / "rgb.zarr")
    voxel = (0.2, 0.1, 0.1)[-len(spatial) :]
    for i in range(2):
        image = _channel_image(i, spatial, 3)
        write_volume(group, f"sharp/v{i}", image, voxel, chunks=(4, 8, 8))
        write_volume(group, f"blurred/v{i}", 2 * image + 1, voxel, chunks=(4, 8, 8))
    volumes = ZarrVolumes(tmp_path / "rgb.zarr")
    assert volumes.shapes("sharp") == {"v0": spatial, "v1": spatial}
    assert volumes.layout("sharp") == (len(spatial), 3)
    assert volumes.chunks("blurred") == (4, 8, 8)[-len(spatial) :]
    sampler = PatchSampler(volumes.paired_shapes(), patch, seed=3)
    plain = PairedPatches(volumes, sampler, batch_size=2, steps=3, augment=False)
    augmented = PairedPatches(volumes, sampler, batch_size=2, steps=3, augment=True)
    for i in range(len(plain)):
        spec = sampler.sample(*divmod(i, 2))
        item, aug = plain[i], augmented[i]
        assert item["x"].shape == (3, *patch) and item["x"].dtype == torch.float32
        image = _channel_image(int(spec.volume[1:]), spatial, 3)
        np.testing.assert_array_equal(item["x"].numpy(), image[(slice(None), *spec.slices)])
        torch.testing.assert_close(aug["y"], 2 * aug["x"] + 1, rtol=0, atol=0)
        # One transform for every channel: channel c stays channel 0 plus 1000 c.
        for c in range(3):
            assert torch.equal(aug["x"][c], aug["x"][0] + 1000.0 * c)
    batch = next(iter(DataLoader(augmented, batch_size=2)))
    assert batch["x"].shape == (2, 3, *patch)
    unpaired = UnpairedPatches(volumes, sampler, sampler, batch_size=2, steps=1)
    assert unpaired[0]["y"].shape == (3, *patch)


def test_patch_of_other_dimensionality_is_one_input_error(tmp_path: Path) -> None:
    group = create_dataset(tmp_path / "flat.zarr")
    write_volume(group, "sharp/v0", np.zeros((16, 16), np.float32), (0.1, 0.1))
    write_volume(group, "blurred/v0", np.zeros((16, 16), np.float32), (0.1, 0.1))
    volumes = ZarrVolumes(tmp_path / "flat.zarr")
    assert volumes.layout("sharp") == (2, 1)
    with pytest.raises(InputError, match=r"has 3 spatial axes but volume 'v0'.*\(Y, X\)") as exc:
        PatchSampler(volumes.paired_shapes(), (4, 8, 8), seed=0)
    assert "\n" not in str(exc.value)


def test_mixed_layouts_in_one_domain_are_refused(tmp_path: Path) -> None:
    group = create_dataset(tmp_path / "mixed.zarr")
    write_volume(group, "sharp/v0", np.zeros((3, 16, 16), np.float32), (0.1, 0.1))
    write_volume(group, "sharp/v1", np.zeros((16, 16), np.float32), (0.1, 0.1))
    with pytest.raises(InputError, match="differ in layout"):
        ZarrVolumes(tmp_path / "mixed.zarr").layout("sharp")
