"""Patch sampling: determinism, rank sharding, bounds, uniformity, chunk alignment."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
from scipy.stats import chisquare

from hpcdeconv.data.sampling import PatchSampler, PatchSpec, axis_starts, chunks_touched
from hpcdeconv.errors import ConfigError, InputError

VOLUMES = {"v0": (40, 64, 64), "v1": (32, 80, 72), "v2": (48, 48, 48)}
PATCH = (16, 32, 32)


def _brute_chunks(spec: PatchSpec, chunks: tuple[int, ...]) -> int:
    per_axis = [
        len({i // c for i in range(s, e)})
        for s, e, c in zip(spec.start, spec.stop, chunks, strict=True)
    ]
    return math.prod(per_axis)


def test_same_arguments_same_draws() -> None:
    a = PatchSampler(VOLUMES, PATCH, seed=3, rank=1, world_size=2)
    b = PatchSampler(dict(reversed(VOLUMES.items())), PATCH, seed=3, rank=1, world_size=2)
    other = PatchSampler(VOLUMES, PATCH, seed=4, rank=1, world_size=2)
    keys = list(itertools.product(range(5), range(4)))
    assert [a.sample(s, i) for s, i in keys] == [b.sample(s, i) for s, i in keys]
    assert [a.sample(s, i) for s, i in keys] != [other.sample(s, i) for s, i in keys]
    assert a.sample(2, 1, stream=0) != a.sample(2, 1, stream=1)


def test_ranks_partition_the_single_process_draws() -> None:
    world, batch = 3, 4
    single = PatchSampler(VOLUMES, PATCH, seed=11)
    ranks = [PatchSampler(VOLUMES, PATCH, seed=11, rank=r, world_size=world) for r in range(world)]
    for step in range(3):
        per_rank = [{s.sample(step, i) for i in range(batch)} for s in ranks]
        for r0, r1 in itertools.combinations(range(world), 2):
            assert not per_rank[r0] & per_rank[r1]
        assert set().union(*per_rank) == {single.sample(step, g) for g in range(world * batch)}


def test_draws_stay_inside_their_volume() -> None:
    sampler = PatchSampler(VOLUMES, PATCH, seed=0)
    for step in range(200):
        spec = sampler.sample(step, 0)
        assert spec.size == PATCH
        assert all(s >= 0 for s in spec.start)
        assert all(e <= n for e, n in zip(spec.stop, VOLUMES[spec.volume], strict=True))


def test_uniform_over_all_placements() -> None:
    volumes = {"a": (2, 3, 3), "b": (2, 2, 2)}  # 8 and 2 placements of a (1, 2, 2) patch
    sampler = PatchSampler(volumes, (1, 2, 2), seed=5)
    counts = Counter((s.volume, s.start) for s in (sampler.sample(k, 0) for k in range(4000)))
    assert len(counts) == 10
    assert chisquare(list(counts.values())).pvalue > 1e-3


@pytest.mark.parametrize(
    ("length", "patch", "chunk"), [(100, 48, 64), (64, 64, 16), (37, 10, 8), (20, 7, 3), (9, 9, 4)]
)
def test_aligned_starts_touch_fewest_chunks(length: int, patch: int, chunk: int) -> None:
    fewest = math.ceil(patch / chunk)
    last = length - patch

    def touched(s: int) -> int:
        return len({i // chunk for i in range(s, s + patch)})

    expected = {s for s in range(last + 1) if touched(s) == fewest} | {last}
    assert set(axis_starts(length, patch, chunk).tolist()) == expected
    covered = {i for s in expected for i in range(s, s + patch)}
    assert covered == set(range(length))  # every voxel stays reachable
    assert axis_starts(length, patch, None).tolist() == list(range(last + 1))


def test_chunks_touched_matches_brute_force(rng: np.random.Generator) -> None:
    for _ in range(50):
        chunks = tuple(int(c) for c in rng.integers(1, 9, size=3))
        size = tuple(int(n) for n in rng.integers(1, 12, size=3))
        start = tuple(int(s) for s in rng.integers(0, 20, size=3))
        spec = PatchSpec("v", start, size)
        assert chunks_touched(spec, chunks) == _brute_chunks(spec, chunks)


def test_aligned_sampler_reads_minimal_chunks() -> None:
    align = (16, 32, 32)
    patch = (12, 24, 40)
    sampler = PatchSampler(VOLUMES, patch, seed=2, align=align)
    interior = 0
    for step in range(100):
        spec = sampler.sample(step, 0)
        shape = VOLUMES[spec.volume]
        tails = [s == n - p for s, n, p in zip(spec.start, shape, patch, strict=True)]
        if not any(tails):
            interior += 1
            assert chunks_touched(spec, align) == 1 * 1 * 2  # ceil(patch / chunk) per axis
    assert interior > 50


def test_patch_larger_than_volume_is_an_input_error() -> None:
    with pytest.raises(InputError, match="v2"):
        PatchSampler(VOLUMES, (16, 32, 64), seed=0)


def test_exclude_never_draws_that_volume() -> None:
    sampler = PatchSampler(VOLUMES, PATCH, seed=1)
    assert all(sampler.sample(k, 0, exclude="v1").volume != "v1" for k in range(100))
    lonely = PatchSampler({"only": (20, 40, 40)}, PATCH, seed=1)
    with pytest.raises(InputError, match="only"):
        lonely.sample(0, 0, exclude="only")


def test_state_dict_checks_resume() -> None:
    sampler = PatchSampler(VOLUMES, PATCH, seed=9, rank=0, world_size=2, align=(16, 32, 32))
    state = sampler.state_dict()
    PatchSampler(VOLUMES, PATCH, seed=9, rank=1, world_size=4, align=(16, 32, 32)).load_state_dict(
        state
    )
    with pytest.raises(ConfigError, match="seed"):
        PatchSampler(VOLUMES, PATCH, seed=8, align=(16, 32, 32)).load_state_dict(state)
    with pytest.raises(ConfigError, match="volumes"):
        PatchSampler({"v0": (40, 64, 64)}, PATCH, seed=9, align=(16, 32, 32)).load_state_dict(state)


def test_2d_patches_are_uniform_and_rank_disjoint() -> None:
    images = {"a": (3, 4), "b": (2, 3)}  # 6 and 2 placements of a (2, 2) patch
    sampler = PatchSampler(images, (2, 2), seed=5, align=(2, 2))
    spec = sampler.sample(0, 0)
    assert len(spec.start) == 2 and spec.size == (2, 2)
    plain = PatchSampler(images, (2, 2), seed=5)
    counts = Counter((s.volume, s.start) for s in (plain.sample(k, 0) for k in range(3000)))
    assert len(counts) == 8
    assert chisquare(list(counts.values())).pvalue > 1e-3
    ranks = [PatchSampler(images, (2, 2), seed=1, rank=r, world_size=2) for r in range(2)]
    draws = [[r.rng(s, i).random() for s in range(3) for i in range(2)] for r in ranks]
    assert not set(draws[0]) & set(draws[1])


@pytest.mark.parametrize(
    ("volumes", "patch", "message"),
    [
        ({"v0": (32, 32)}, (8, 8, 8), r"has 3 spatial axes but volume 'v0'.*\(Y, X\)"),
        ({"v0": (8, 32, 32)}, (8, 8), r"has 2 spatial axes but volume 'v0'.*\(Z, Y, X\)"),
        ({"v0": (8, 8, 8, 8)}, (8, 8, 8), "two .* or three"),
        ({"v0": (8, 8)}, (8,), "two .* or three"),
    ],
)
def test_patch_axes_must_match_the_data(
    volumes: dict[str, tuple[int, ...]], patch: tuple[int, ...], message: str
) -> None:
    with pytest.raises(InputError, match=message) as exc:
        PatchSampler(volumes, patch, seed=0)
    assert "\n" not in str(exc.value)
