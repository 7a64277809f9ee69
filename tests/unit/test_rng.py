"""RNG states survive checkpoints on any device (issue 12: resume on a GPU)."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcdeconv.methods.image_pool import ImagePool
from hpcdeconv.training.rng import capture_rng_state, cpu_state, restore_rng_state

GPU_STATE = Path(__file__).resolve().parents[1] / "data" / "gpu_rng_state.pt"


def _draws() -> dict[str, list[float]]:
    return {
        "torch": torch.rand(3).tolist(),
        "numpy": np.random.random(3).tolist(),
        "python": [random.random() for _ in range(3)],
    }


def _round_trip(obj: object) -> object:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu", weights_only=True)


def test_every_global_stream_is_restored_after_a_checkpoint() -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    state = _round_trip(capture_rng_state())
    expected = _draws()
    _draws()  # move every stream on
    restore_rng_state(state)
    assert _draws() == expected


def test_states_in_another_dtype_or_layout_are_accepted() -> None:
    # What a map_location or a conversion hands back is not necessarily the contiguous
    # uint8 CPU tensor that set_state insists on; restoring must not depend on it.
    pool = ImagePool(2, seed=5)
    torch.rand(3, generator=pool.generator)
    saved = pool.state_dict()
    expected = torch.rand(4, generator=pool.generator)
    generator = saved["generator"]
    odd = torch.stack([generator.to(torch.int64), generator.to(torch.int64)], dim=1)[:, 0]
    assert not odd.is_contiguous() or odd.dtype != torch.uint8
    fresh = ImagePool(2, seed=99)
    fresh.load_state_dict({**saved, "generator": odd})
    assert torch.equal(torch.rand(4, generator=fresh.generator), expected)
    assert cpu_state(odd).dtype == torch.uint8 and cpu_state(odd).is_contiguous()


@pytest.mark.skipif(not GPU_STATE.is_file(), reason="tests/data/gpu_rng_state.pt not made yet")
def test_a_state_made_on_a_gpu_restores_on_this_machine() -> None:
    # Made on an H200 by tests/data/make_gpu_rng_state.py: torch and pool states saved as
    # CUDA tensors, plus one CUDA stream per device. Loaded the way the trainer loads a
    # checkpoint (on the CPU) they restore the CPU streams exactly; on a machine without
    # CUDA the CUDA streams are skipped.
    data = torch.load(GPU_STATE, map_location="cpu", weights_only=True)
    state, expected = data["state"], data["expected"]
    assert len(state["rng"]["cuda"]) >= 1
    restore_rng_state(state["rng"])
    assert torch.equal(torch.rand(4), expected["torch"])
    assert np.random.random(4).tolist() == expected["numpy"].tolist()
    # Saved as float32 draws: compare at that precision.
    assert torch.tensor([random.random() for _ in range(4)]).tolist() == expected["python"].tolist()
    pool = ImagePool(4, seed=0)
    pool.load_state_dict(state["pool"])
    assert torch.equal(torch.rand(4, generator=pool.generator), expected["pool"])


@pytest.mark.gpu
def test_states_loaded_onto_the_gpu_restore() -> None:
    # The reported failure: a checkpoint loaded with map_location="cuda" hands every
    # generator state over as a CUDA tensor.
    pool = ImagePool(2, seed=5)
    state = {"rng": capture_rng_state(), "pool": pool.state_dict()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    on_gpu = torch.load(buffer, map_location="cuda", weights_only=True)
    assert on_gpu["pool"]["generator"].is_cuda
    expected = torch.rand(3).tolist()
    restore_rng_state(on_gpu["rng"])
    assert torch.rand(3).tolist() == expected
    ImagePool(2, seed=0).load_state_dict(on_gpu["pool"])
