"""Shared pytest fixtures and the GPU skip rule."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

if TYPE_CHECKING:
    from distributed import Client


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu``-marked tests cleanly on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is available here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded generator so every test is reproducible."""
    return np.random.default_rng(1234)


TINY_SIMULATION = [
    "shape=[16, 32, 32]",
    "psf.shape=[7, 7, 7]",
    "split={train: 3, val: 1, test: 1}",
    "storage.chunks=[16, 16, 16]",
    "noise.snr_db=25",
]

#: Overrides that make every method train in well under a second per step on a CPU.
TINY_TRAINING = [
    "data.patch=[16, 16, 16]",
    "method.generator.channels=4",
    "method.generator.depth=2",
    "method.discriminator.channels=4",
    "method.discriminator.n_layers=2",
    "method.discriminator.n_scales=2",
    "train.log_every=1",
    "train.val_every=1000",
    "train.ckpt_every=2",
    "train.image_every=2",
    "train.val_tile=[16, 32, 32]",
    "train.val_overlap=4",
    "train.device=cpu",
]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory):
    """A 3+1+1 volume simulated dataset of 16x32x32 voxels with a 7^3 PSF."""
    from hpcdeconv.config import SimulateConfig, load_config
    from hpcdeconv.data.simulate import simulate

    out = tmp_path_factory.mktemp("data") / "tiny.zarr"
    simulate(load_config(SimulateConfig, None, TINY_SIMULATION), out)
    return out


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    """An in-process dask cluster (one worker, two threads) and its client."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster) as dask_client,
    ):
        yield dask_client


@pytest.fixture(scope="module")
def scheduler(client: Client) -> str:
    """Address of :func:`client`'s scheduler, for ``--scheduler``."""
    return client.scheduler.address


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``hpcdeconv argv...`` in this process: its exit code, stdout and stderr."""
    from hpcdeconv.cli import main

    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    """The CLI refused with exit code 2 and one error line holding ``fragment``, no
    traceback."""
    assert code == 2
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert fragment in lines[0]
    assert "Traceback" not in err
