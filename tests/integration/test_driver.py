"""The block-wise driver on dask clusters inside the test process: seamless stitching against
whole-volume inference, resume after an interruption, NaN blocks, TIFF and multiple inputs,
block-wise Richardson-Lucy against whole-volume RL, a worker process killed mid-run, and the
environment local worker processes get."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
import zarr
from distributed import Client, LocalCluster

from hpcdeconv.classical.rl import richardson_lucy, rl_halo
from hpcdeconv.config import ClusterConfig, ExperimentConfig, load_config
from hpcdeconv.data.layout import volume_meta
from hpcdeconv.data.zarr_io import create_dataset, write_volume
from hpcdeconv.errors import InputError, OutputExistsError
from hpcdeconv.inference.cluster import open_client
from hpcdeconv.inference.driver import NonFiniteOutputError, deconvolve_volumes
from hpcdeconv.inference.manifest import read_record
from hpcdeconv.inference.model import LoadedModel, load_model
from hpcdeconv.inference.plan import BlockPlan
from hpcdeconv.inference.processors import NetworkProcessor, RLProcessor
from hpcdeconv.inference.sources import open_sources
from hpcdeconv.inference.tiling import Block
from hpcdeconv.physics.forward import convolve
from hpcdeconv.physics.phantoms import microtubules
from hpcdeconv.physics.psf import gaussian
from hpcdeconv.training.engine import train
from tests.conftest import TINY_TRAINING

VOXEL = (0.2, 0.1, 0.1)


@pytest.fixture(scope="module")
def local_model(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """A depth-1 U-Net without normalisation (strictly local; receptive field 19)."""
    run = tmp_path_factory.mktemp("checkpoint") / "run"
    overrides = [
        *TINY_TRAINING,
        f"data.path={tiny_dataset}",
        f"output={run}",
        "method.name=supervised",
        "train.steps=2",
        "method.generator.norm=none",
        "method.generator.depth=1",
        # PyTorch's head: the data-mean start's small head makes a too-small halo's seam
        # after 2 steps smaller than the 1e-4 the seam check below asserts.
        "method.generator.head_init=default",
    ]
    train(load_config(ExperimentConfig, None, overrides), progress=False)
    return load_model(run)


def write_input(store: Path, volume: np.ndarray, name: str = "v0") -> Path:
    group = create_dataset(store)
    write_volume(group, f"blurred/{name}", volume, VOXEL, chunks=(16, 16, 16))
    return store / "blurred" / name


def read_output(store: Path, name: str = "v0") -> np.ndarray:
    return zarr.open_array(store / "deconvolved" / name / "0", mode="r")[...]


def exact_processor(model: LoadedModel) -> NetworkProcessor:
    """One tile per padded block and no blending: the block sees exactly its halo."""
    return NetworkProcessor.from_model(model, (64, 64, 64), 0, "constant", 1, "fp32")


def whole_volume(model: LoadedModel, volume: np.ndarray, halo: int) -> np.ndarray:
    """G on the whole volume padded symmetrically by ``halo`` (and to even sizes), cropped."""
    padded = np.pad(volume, halo, mode="symmetric")
    extra = [(0, (-n) % model.size_multiple) for n in padded.shape]
    padded = np.pad(padded, extra, mode="symmetric")
    with torch.inference_mode():
        out = model.net(torch.from_numpy(padded)[None, None])[0, 0].numpy()
    return out[tuple(slice(halo, halo + n) for n in volume.shape)]


def distance_to_internal_edges(shape: tuple[int, ...], block: int) -> np.ndarray:
    """Per voxel, the fewest voxels between it and a block border inside the volume."""
    per_axis = []
    for n in shape:
        index = np.arange(n)
        start = index // block * block
        stop = np.minimum(start + block, n)
        before = np.where(start > 0, index - start, n)
        after = np.where(stop < n, stop - 1 - index, n)
        per_axis.append(np.minimum(before, after))
    return np.minimum.reduce(np.meshgrid(*per_axis, indexing="ij"))


def test_stitched_blocks_equal_whole_volume_inference(
    local_model: LoadedModel, client: Client, tmp_path: Path
) -> None:
    radius = local_model.receptive_field // 2
    volume = np.random.default_rng(0).random((60, 64, 70)).astype(np.float32)
    sources = open_sources([write_input(tmp_path / "in.zarr", volume)])
    plan = BlockPlan((24, 24, 24), (radius,) * 3, (8, 8, 8))
    # 3 x 3 x 3 blocks: interior, face, edge and corner blocks, the last ones cut short.
    assert [b.index for b in plan.grid(volume.shape)][-1] == (2, 2, 2)
    report = deconvolve_volumes(
        client, sources, tmp_path / "out.zarr", exact_processor(local_model), plan, progress=False
    )
    assert (report.total_blocks, report.processed, report.voxels) == (27, 27, volume.size)
    assert report.complete and report.voxels_per_second > 0
    error = np.abs(read_output(tmp_path / "out.zarr") - whole_volume(local_model, volume, radius))
    assert error.max() <= 1e-5

    array = zarr.open_array(tmp_path / "out.zarr" / "deconvolved" / "v0" / "0", mode="r")
    assert array.chunks == (8, 8, 8) and volume_meta(array).voxel_size == VOXEL
    image = zarr.open_group(tmp_path / "out.zarr" / "deconvolved" / "v0", mode="r")
    provenance = image.attrs["provenance"]
    assert provenance["halo"] == [radius] * 3 and provenance["block"] == [24] * 3
    assert provenance["input"] == str(sources[0].path)
    assert provenance["processor"]["checkpoint_sha256"] == exact_processor(local_model).sha256

    # A halo below the receptive-field radius: exact far from block borders, seams at them.
    small = 2
    deconvolve_volumes(
        client,
        sources,
        tmp_path / "out.zarr",
        exact_processor(local_model),
        BlockPlan((24, 24, 24), (small,) * 3, (8, 8, 8)),
        "overwrite",
        progress=False,
    )
    error = np.abs(read_output(tmp_path / "out.zarr") - whole_volume(local_model, volume, small))
    far = distance_to_internal_edges(volume.shape, 24) >= radius - small
    assert error[far].max() <= 1e-5
    assert error[~far].max() > 1e-4  # ~8e-4 for this barely trained network


def test_interrupted_run_resumes_to_the_same_output(
    local_model: LoadedModel, client: Client, tmp_path: Path
) -> None:
    volume = np.random.default_rng(1).random((48, 48, 48)).astype(np.float32)
    sources = open_sources([write_input(tmp_path / "in.zarr", volume)])
    processor = exact_processor(local_model)
    plan = BlockPlan((24, 24, 24), (9, 9, 9), (8, 8, 8))
    run_args: dict[str, Any] = {"processor": processor, "plan": plan, "progress": False}
    deconvolve_volumes(client, sources, tmp_path / "full.zarr", **run_args)
    full = read_output(tmp_path / "full.zarr")

    part = tmp_path / "part.zarr"
    first = deconvolve_volumes(client, sources, part, max_blocks=3, **run_args)
    assert (first.processed, first.complete) == (3, False)
    record = read_record(zarr.open_group(part, mode="r"))
    assert record is not None and record["completed"] == {"v0": [[0, 3]]}
    written = read_output(part)
    done = np.zeros(volume.shape, bool)
    for block in plan.grid(volume.shape)[:3]:
        done[block.write] = True
    np.testing.assert_array_equal(written[done], full[done])
    assert not written[~done].any()  # the rest was never computed

    with pytest.raises(OutputExistsError, match="--resume"):
        deconvolve_volumes(client, sources, part, **run_args)
    second = deconvolve_volumes(client, sources, part, mode="resume", **run_args)
    assert (second.skipped, second.processed, second.complete) == (3, 5, True)
    np.testing.assert_array_equal(read_output(part), full)
    third = deconvolve_volumes(client, sources, part, mode="resume", **run_args)
    assert (third.skipped, third.processed) == (8, 0)

    other = BlockPlan((24, 24, 24), (10, 10, 10), (8, 8, 8))
    with pytest.raises(InputError, match="different 'halo'"):
        deconvolve_volumes(client, sources, part, processor, other, mode="resume", progress=False)


def test_nan_voxels_name_the_block_and_input(
    local_model: LoadedModel, client: Client, tmp_path: Path
) -> None:
    volume = np.random.default_rng(2).random((48, 48, 48)).astype(np.float32)
    volume[40, 5, 40] = np.nan  # read by block (1, 0, 1) only: z >= 24 + 9, y < 24 - 9
    source = write_input(tmp_path / "in.zarr", volume)
    plan = BlockPlan((24, 24, 24), (9, 9, 9), (8, 8, 8))
    with pytest.raises(InputError, match=r"in\.zarr/blurred/v0: block \(1, 0, 1\).* 1 NaN or Inf"):
        deconvolve_volumes(
            client,
            open_sources([source]),
            tmp_path / "out.zarr",
            exact_processor(local_model),
            plan,
            progress=False,
        )


@dataclass(frozen=True)
class OverflowOnOneBlock:
    """Ones everywhere but Inf on block (0, 0, 1), like fp16 activations overflowing there."""

    @property
    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "overflow"}

    def __call__(self, data: np.ndarray, block: Block) -> np.ndarray:
        shape = tuple(s.stop - s.start for s in block.write)
        return np.full(shape, np.inf if block.index == (0, 0, 1) else 1.0, np.float32)


def test_non_finite_output_is_reported_and_not_written(client: Client, tmp_path: Path) -> None:
    volume = np.ones((24, 24, 48), np.float32)
    sources = open_sources([write_input(tmp_path / "in.zarr", volume)])
    with pytest.raises(NonFiniteOutputError, match=r"block \(0, 0, 1\) .* 13824 NaN or Inf"):
        deconvolve_volumes(
            client,
            sources,
            tmp_path / "out.zarr",
            OverflowOnOneBlock(),
            BlockPlan((24, 24, 24), (4, 4, 4), (8, 8, 8)),
            progress=False,
        )
    assert not read_output(tmp_path / "out.zarr")[:, :, 24:].any()


def test_tiff_and_zarr_inputs_in_one_batch(
    local_model: LoadedModel, client: Client, tmp_path: Path
) -> None:
    rng = np.random.default_rng(3)
    volumes = {name: rng.random((24, 40, 36)).astype(np.float32) for name in "abc"}
    plain, packed = tmp_path / "b.tif", tmp_path / "c.tif"
    meta = {"spacing": 0.3, "unit": "um", "axes": "ZYX"}
    tifffile.imwrite(plain, volumes["b"], imagej=True, resolution=(5.0, 5.0), metadata=meta)
    tifffile.imwrite(packed, volumes["c"][:, None], compression="zlib")  # (Z, 1, Y, X)
    inputs = [write_input(tmp_path / "in.zarr", volumes["a"], name="a"), plain, packed]
    sources = open_sources(inputs)
    assert [s.name for s in sources] == ["a", "b", "c"]
    report = deconvolve_volumes(
        client,
        sources,
        tmp_path / "out.zarr",
        exact_processor(local_model),
        BlockPlan((24, 24, 24), (9, 9, 9), (8, 8, 8)),
        progress=False,
    )
    assert report.total_blocks == 3 * 1 * 2 * 2
    for name, volume in volumes.items():
        expected = whole_volume(local_model, volume, 9)
        assert np.abs(read_output(tmp_path / "out.zarr", name) - expected).max() <= 1e-5
    voxel = volume_meta(
        zarr.open_array(tmp_path / "out.zarr" / "deconvolved" / "b" / "0")
    ).voxel_size
    np.testing.assert_allclose(voxel, (0.3, 0.2, 0.2))
    with pytest.raises(InputError, match="would both be written to 'deconvolved/a'"):
        open_sources([inputs[0], inputs[0]])


@pytest.fixture(scope="module")
def rl_input(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """(zarr input, its data, PSF): blurred microtubules on a small background."""
    rng = np.random.default_rng(4)
    psf = gaussian((5, 5, 5), (1.5, 1.0, 1.0)).astype(np.float32)
    volume = np.clip(convolve(microtubules((48, 48, 48), rng), psf), 0, None) + 0.01
    volume = volume.astype(np.float32)
    return write_input(tmp_path_factory.mktemp("rl") / "in.zarr", volume), volume, psf


def blockwise_rl_error(
    client: Client, rl_input: tuple[Path, np.ndarray, np.ndarray], out: Path, **kwargs: Any
) -> float:
    """Max deviation of block-wise from whole-volume RL, relative to the maximum."""
    source, volume, psf = rl_input
    halo, iterations, tv = kwargs["halo"], kwargs["iterations"], kwargs.get("tv", 0.0)
    plan = BlockPlan((24, 24, 24), (halo,) * 3, (8, 8, 8))
    processor = RLProcessor(psf, iterations, tv)
    deconvolve_volumes(client, open_sources([source]), out, processor, plan, progress=False)
    whole = richardson_lucy(volume, psf, iterations, tv=tv)
    return float(np.abs(read_output(out) - whole).max() / whole.max())


def test_blockwise_rl_equals_whole_volume_rl_when_the_halo_covers_every_iteration(
    client: Client, rl_input: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    # n RL iterations couple voxels 2 n r apart (H, then H^T): with r = 2 and n = 3 a halo
    # of 12 leaves every block core the same as whole-volume RL, up to float32 round-off.
    halo = 2 * 3 * 2
    assert rl_halo((5, 5, 5), widths=3) == (halo,) * 3
    error = blockwise_rl_error(client, rl_input, tmp_path / "o.zarr", halo=halo, iterations=3)
    assert error <= 1e-5


def test_blockwise_rl_with_the_default_halo_is_close_to_whole_volume_rl(
    client: Client, rl_input: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    # 20 iterations reach 80 voxels in principle, but the influence decays about tenfold
    # per PSF width of halo: rl_halo's 3 widths measure ~6e-4 here (its docstring: 7e-4 for
    # a 9^3 PSF). TV-RL in float32 is limited to ~2e-4 anyway: its |grad x|_eps with
    # eps = 1e-6 turns round-off into that much difference even for the whole volume.
    default = rl_halo((5, 5, 5))[0]
    kwargs = {"halo": default, "iterations": 20}
    assert blockwise_rl_error(client, rl_input, tmp_path / "a.zarr", **kwargs) <= 2e-3
    kwargs["tv"] = 0.002
    assert blockwise_rl_error(client, rl_input, tmp_path / "b.zarr", **kwargs) <= 2e-3
    # A halo of one PSF radius leaves visible block borders (~9e-2 here).
    kwargs = {"halo": 2, "iterations": 20}
    assert blockwise_rl_error(client, rl_input, tmp_path / "c.zarr", **kwargs) > 2e-2


@dataclass(frozen=True)
class SlowProcessor:
    """A network processor that takes ``delay`` seconds longer, so blocks stay in flight."""

    inner: NetworkProcessor
    delay: float

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.inner.fingerprint

    def __call__(self, data: np.ndarray, block: Block) -> np.ndarray:
        time.sleep(self.delay)
        return self.inner(data, block)


def _kill_when_busy(client: Client, address: str, pid: int, killed: threading.Event) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(key.startswith("hpcdeconv-block") for key in client.processing().get(address, ())):
            time.sleep(0.3)  # inside the block's delay
            os.kill(pid, signal.SIGKILL)
            killed.set()
            return
        time.sleep(0.05)


@pytest.mark.distributed
def test_a_killed_worker_does_not_fail_the_run(local_model: LoadedModel, tmp_path: Path) -> None:
    volume = np.random.default_rng(5).random((48, 48, 48)).astype(np.float32)
    sources = open_sources([write_input(tmp_path / "in.zarr", volume)])
    processor = SlowProcessor(exact_processor(local_model), delay=1.0)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster) as c,
    ):
        pids = c.run(os.getpid)
        address, victim = sorted(pids.items())[0]
        killed = threading.Event()
        killer = threading.Thread(target=_kill_when_busy, args=(c, address, victim, killed))
        killer.start()
        report = deconvolve_volumes(
            c,
            sources,
            tmp_path / "out.zarr",
            processor,
            BlockPlan((24, 24, 24), (9, 9, 9), (8, 8, 8), retries=0),
            progress=False,
        )
        killer.join()
        assert killed.is_set()
        assert victim not in c.run(os.getpid).values()
    assert report.complete and report.processed == 8
    error = np.abs(read_output(tmp_path / "out.zarr") - whole_volume(local_model, volume, 9))
    assert error.max() <= 1e-5


@pytest.mark.distributed
def test_local_workers_get_glibcs_malloc_thresholds_and_one_arena(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A LocalCluster started earlier in this process leaves dask's value in os.environ.
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    cfg = ClusterConfig(workers=1, threads_per_worker=1, dashboard=False)
    with open_client(cfg) as c:
        environ = next(iter(c.run(lambda: dict(os.environ)).values()))
    assert "MALLOC_TRIM_THRESHOLD_" not in environ
    assert environ["MALLOC_ARENA_MAX"] == "1"
    assert environ["OMP_NUM_THREADS"] == "1"  # dask's other spawn settings still apply
    assert "MALLOC_TRIM_THRESHOLD_" not in os.environ
