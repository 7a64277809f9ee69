"""ImagePool: fill phase, ½ swap statistics, determinism and state round trip."""

from __future__ import annotations

import io

import pytest
import torch

from hpcdeconv.errors import ConfigError
from hpcdeconv.methods.image_pool import ImagePool


def tagged(values: list[int]) -> torch.Tensor:
    """A batch (B, 1, 2, 2, 2) whose image b is filled with values[b], to identify it."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1, 1).expand(-1, 1, 2, 2, 2)


def tags(batch: torch.Tensor) -> list[int]:
    return [int(v) for v in batch[:, 0, 0, 0, 0]]


def test_fill_phase_returns_and_stores_every_image() -> None:
    pool = ImagePool(size=5, seed=0)
    out = pool.query(tagged([1, 2, 3]))
    assert tags(out) == [1, 2, 3]
    out = pool.query(tagged([4, 5]))
    assert tags(out) == [4, 5]
    assert len(pool) == 5
    assert sorted(tags(torch.stack(pool.images))) == [1, 2, 3, 4, 5]


def test_full_pool_swaps_half_the_time_and_keeps_contents_consistent() -> None:
    pool = ImagePool(size=10, seed=7)
    pool.query(tagged(list(range(10))))
    n_queries, swaps = 4000, 0
    for step in range(n_queries):
        new = 1000 + step
        before = sorted(tags(torch.stack(pool.images)))
        (returned,) = tags(pool.query(tagged([new])))
        after = sorted(tags(torch.stack(pool.images)))
        if returned == new:
            assert after == before  # pool untouched
        else:
            swaps += 1
            assert returned in before  # an old image comes back ...
            assert after == sorted([*(t for t in before if t != returned), new])  # ... replaced
        assert len(pool) == 10
    # Binomial(4000, ½): standard deviation ≈ 0.0079; allow 4σ.
    assert abs(swaps / n_queries - 0.5) < 0.032


def test_returned_old_images_are_drawn_uniformly() -> None:
    pool = ImagePool(size=4, seed=3)
    counts = dict.fromkeys(range(4), 0)
    for _ in range(4000):
        pool.images = list(tagged([0, 1, 2, 3]))  # reset so every slot holds a known tag
        (returned,) = tags(pool.query(tagged([99])))
        if returned != 99:
            counts[returned] += 1
    # About 2000 swaps spread over 4 slots: 500 ± 22 each; allow 5σ.
    assert all(abs(c - 500) < 110 for c in counts.values()), counts


def test_same_seed_same_sequence_different_seed_differs() -> None:
    def run(seed: int) -> list[int]:
        pool = ImagePool(size=3, seed=seed)
        return [t for step in range(60) for t in tags(pool.query(tagged([step, 100 + step])))]

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_size_zero_is_pass_through() -> None:
    pool = ImagePool(size=0)
    x = torch.rand(3, 1, 4, 4, 4, requires_grad=True)
    out = pool.query(x)
    assert torch.equal(out, x)
    assert not out.requires_grad
    assert len(pool) == 0


def test_output_keeps_shape_dtype_and_is_detached() -> None:
    pool = ImagePool(size=2, seed=0)
    x = torch.rand(4, 2, 4, 6, 8, dtype=torch.float64, requires_grad=True)
    out = pool.query(x)
    assert out.shape == x.shape
    assert out.dtype == torch.float64
    assert not out.requires_grad
    x.data.add_(1.0)  # stored images are copies, not views of the caller's tensor
    assert all(float(img.max()) <= 1.0 for img in pool.images)


def test_state_round_trip_reproduces_the_sequence() -> None:
    pool = ImagePool(size=6, seed=11)
    for step in range(20):
        pool.query(tagged([step, 50 + step]))
    buffer = io.BytesIO()
    torch.save(pool.state_dict(), buffer)
    buffer.seek(0)
    restored = ImagePool(size=6, seed=999)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert all(img.device.type == "cpu" for img in restored.state_dict()["images"])
    for step in range(20, 60):
        batch = tagged([step, 50 + step, 90 + step])
        assert tags(pool.query(batch)) == tags(restored.query(batch))
    assert tags(torch.stack(pool.images)) == tags(torch.stack(restored.images))


def test_load_state_rejects_other_capacity_and_negative_size() -> None:
    with pytest.raises(ConfigError, match="differs"):
        ImagePool(size=4).load_state_dict(ImagePool(size=5).state_dict())
    with pytest.raises(ConfigError):
        ImagePool(size=-1)
