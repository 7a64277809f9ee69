"""Random-number-generator states that survive a checkpoint on any device.

``torch.load(map_location=...)`` moves *every* tensor of a checkpoint, the generator states
included, to the device asked for; ``torch.Generator.set_state``, ``torch.set_rng_state``
and ``torch.cuda.set_rng_state`` accept only CPU ``uint8`` tensors. Every RNG state of the
project is therefore captured as CPU tensors and plain Python values, and brought back to
the CPU before it is restored, whatever device the checkpoint was mapped to. A checkpoint
written on a GPU resumes on a CPU (the CUDA streams are then skipped) and the reverse.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def cpu_state(state: torch.Tensor) -> torch.Tensor:
    """A generator state as ``set_state`` wants it: a contiguous CPU ``uint8`` tensor."""
    return state.detach().to(device="cpu", dtype=torch.uint8).contiguous()


def capture_rng_state() -> dict[str, Any]:
    """The global streams of Python, numpy, torch (CPU) and every visible CUDA device.

    Returns
    -------
    dict
        ``python``: ``random.getstate()``; ``numpy``: the MT19937 key as an int64 tensor
        with its position and Gaussian cache; ``torch``: CPU ``uint8`` tensor; ``cuda``:
        one CPU ``uint8`` tensor per device (absent without CUDA). Loadable with
        ``torch.load(weights_only=True)``.
    """
    name, key, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": str(name),
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": cpu_state(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [cpu_state(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore :func:`capture_rng_state`, whatever device its tensors were loaded onto.

    CUDA streams are restored only where CUDA is available, for as many devices as both
    the checkpoint and this process have. Older checkpoints without the Python/numpy
    streams restore the torch streams only.
    """
    torch.set_rng_state(cpu_state(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        saved = [cpu_state(s) for s in state["cuda"]]
        for device, generator_state in enumerate(saved[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(generator_state, device)
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        np_state = state["numpy"]
        key = torch.as_tensor(np_state["key"]).detach().cpu().numpy().astype(np.uint32)
        np.random.set_state(
            (
                np_state["name"],
                key,
                int(np_state["pos"]),
                int(np_state["has_gauss"]),
                float(np_state["cached_gaussian"]),
            )
        )
