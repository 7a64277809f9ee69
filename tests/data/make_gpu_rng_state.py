"""Write ``gpu_rng_state.pt``: RNG states captured on a CUDA machine, for the CPU tests.

Run on a GPU node from the repository root: ``python tests/data/make_gpu_rng_state.py``.
The file holds what a trainer checkpoint written there holds (``capture_rng_state()`` with
its per-device CUDA streams and an image pool's generator, saved while the tensors sat on
the GPU, as ``torch.load(map_location="cuda")`` hands them to a resuming trainer) and the
draws each CPU-side stream gives right after, so ``tests/unit/test_rng.py`` can check on
a CPU-only machine that a GPU-made state restores to the same streams.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from hpcdeconv.methods.image_pool import ImagePool
from hpcdeconv.training.rng import capture_rng_state


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("make_gpu_rng_state.py: needs a CUDA GPU")
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    pool = ImagePool(4, seed=14)
    torch.rand(5, generator=pool.generator)
    state = capture_rng_state()
    pool_state = pool.state_dict()
    on_gpu = {
        "rng": {
            **state,
            "torch": state["torch"].cuda(),
            "cuda": [s.cuda() for s in state["cuda"]],
        },
        "pool": {**pool_state, "generator": pool_state["generator"].cuda()},
    }
    expected = {
        "torch": torch.rand(4),
        "numpy": torch.from_numpy(np.random.random(4)),
        "python": torch.tensor([random.random() for _ in range(4)]),
        "pool": torch.rand(4, generator=pool.generator),
    }
    out = Path(__file__).with_name("gpu_rng_state.pt")
    torch.save({"state": on_gpu, "expected": expected, "device": torch.cuda.get_device_name()}, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
