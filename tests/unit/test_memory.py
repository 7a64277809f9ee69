"""The worker-memory check of the block-wise driver: sizes, the refusal and its advice."""

from __future__ import annotations

import pytest

from hpcdeconv.errors import ConfigError
from hpcdeconv.inference.memory import (
    MiB,
    WorkerMemoryError,
    check_worker_memory,
    describe_need,
    network_block_bytes,
    parse_limit,
    rl_block_bytes,
    suggested_limit,
    worker_need,
)


def test_parse_limit_reads_sizes_and_leaves_auto_unchecked() -> None:
    assert parse_limit("300MiB") == 300 * MiB
    assert parse_limit("4GiB") == 4096 * MiB
    assert parse_limit("auto") is None and parse_limit("0") is None and parse_limit(None) is None
    with pytest.raises(ConfigError, match=r"cluster\.memory_per_worker='lots' is not a size"):
        parse_limit("lots")


def test_estimates_grow_with_block_tile_channels_and_tv() -> None:
    small = network_block_bytes((64,) * 3, (64,) * 3, 4)
    assert network_block_bytes((128,) * 3, (64,) * 3, 4) > small
    assert network_block_bytes((64,) * 3, (64,) * 3, 16) > small
    assert network_block_bytes((64,) * 3, (64,) * 3, 4, batch_size=2) > small
    assert rl_block_bytes((64,) * 3, (7,) * 3, tv=True) > rl_block_bytes((64,) * 3, (7,) * 3)
    # 40 MiB + 80 B x 70^3 voxels of the FFT shape.
    assert rl_block_bytes((64,) * 3, (7,) * 3) == 40 * MiB + 80 * 70**3
    assert worker_need(100 * MiB, 2) == 584 * MiB


def test_a_limit_below_the_need_is_refused_with_the_setting_and_a_fix() -> None:
    need = worker_need(270 * MiB, 1)
    text = describe_need(need, 270 * MiB, 1, (128, 128, 128))
    assert text == "~654MiB (worker ~384MiB + 1 x block (128, 128, 128) ~270MiB)"
    with pytest.raises(WorkerMemoryError) as err:
        check_worker_memory(380 * MiB, need, text)
    assert str(err.value) == (
        "cluster.memory_per_worker=380MiB is too small: one dask worker needs "
        + text
        + " and stalls at 80% of its limit; set cluster.memory_per_worker=832MiB or more,"
        " or use a smaller --block"
    )
    # dask pauses a worker at 80 % of its limit (and kills it at 95 %): 654 MiB / 0.8 =
    # 818 MiB, rounded up to 64 MiB; that limit passes; 768 MiB (paused at 614 MiB) does not.
    assert suggested_limit(need) == "832MiB"
    check_worker_memory(832 * MiB, need, text)
    with pytest.raises(WorkerMemoryError):
        check_worker_memory(768 * MiB, need, text)
    check_worker_memory(None, need, text)
