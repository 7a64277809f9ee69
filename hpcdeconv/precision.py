"""Names of the arithmetic precisions (``fp32``, ``bf16``, ``fp16``) and their torch dtypes."""

from __future__ import annotations

from typing import Literal

import torch

Precision = Literal["fp32", "bf16", "fp16"]

#: Autocast dtype of each reduced precision; fp32 runs without autocast.
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision``, ``None`` for ``fp32`` (no autocast).

    Raises
    ------
    ValueError
        An unknown precision name.
    """
    if precision == "fp32":
        return None
    try:
        return AUTOCAST_DTYPES[precision]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}; one of fp32, bf16, fp16") from None
