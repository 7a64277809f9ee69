"""Faults of the dask cluster end a block-wise run in one line, and what was finished stays.

* The estimate of what one block needs bounds the peak memory measured on real blocks.
* ``cluster.memory_per_worker`` below that estimate is refused before a cluster starts.
* Workers killed again and again for memory, or all paused for memory, end the run in one
  ``WorkerMemoryError`` naming the setting; a rerun with ``--resume`` continues.
* A killed dask scheduler (``dask scheduler`` / ``dask worker`` processes) ends the run in
  one line with exit 2; the output is resumed once a scheduler is back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pytest
import zarr
from distributed import Client, LocalCluster

from hpcdeconv.config import ExperimentConfig, load_config
from hpcdeconv.data.zarr_io import create_dataset, write_volume
from hpcdeconv.inference import driver
from hpcdeconv.inference.driver import deconvolve_volumes
from hpcdeconv.inference.manifest import read_record
from hpcdeconv.inference.memory import WORKER_BASE_BYTES, WorkerMemoryError
from hpcdeconv.inference.plan import BlockPlan
from hpcdeconv.inference.processors import NetworkProcessor, RLProcessor
from hpcdeconv.inference.sources import open_sources
from hpcdeconv.inference.tiling import Block, block_grid
from hpcdeconv.training.engine import train
from tests.conftest import TINY_TRAINING

REPO = Path(__file__).resolve().parents[2]
MiB = 2**20

# Workers unpickle the test processors below by value: they cannot import this module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(REPO)}


def _rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


# --------------------------------------------------------------------------------------
# The estimate against measured peaks
# --------------------------------------------------------------------------------------

# The peak is this process image's VmHWM, not getrusage's ru_maxrss: Linux carries
# ru_maxrss across fork and exec, so a child of a large pytest process would report the
# parent's size (1015 MiB in a full run) as its own peak.
_MEASURE = """
import json, pickle, sys
import numpy as np, torch
from hpcdeconv.inference import driver
torch.set_num_threads(1)

def status(key):
    with open("/proc/self/status") as lines:
        return [int(x.split()[1]) * 1024 for x in lines if x.startswith(key)][0]

processor, block = pickle.load(open(sys.argv[1], "rb"))
base = status("VmRSS:")
shape = tuple(s.stop - s.start for s in block.read)
data = np.random.default_rng(0).random(shape, dtype=np.float32)
processor(data, block)
print(json.dumps({"base": base, "peak": status("VmHWM:")}))
"""


def _measured(processor: Any, block: Block, tmp_path: Path) -> tuple[int, int]:
    """(RSS before, peak RSS) of a fresh process running ``processor`` on one block."""
    pickled = tmp_path / "job.pkl"
    pickled.write_bytes(cloudpickle.dumps((processor, block)))
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(pickled)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return report["base"], report["peak"]


@pytest.fixture(scope="module")
def tiny_model(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-channel, depth-2 U-Net checkpoint (receptive-field radius 23)."""
    run = tmp_path_factory.mktemp("faults") / "run"
    overrides = [
        *TINY_TRAINING,
        f"data.path={tiny_dataset}",
        f"output={run}",
        "method.name=supervised",
        "train.steps=2",
    ]
    train(load_config(ExperimentConfig, None, overrides), progress=False)
    return run


def _interior_block(block: int, halo: int) -> Block:
    grid = block_grid((3 * block,) * 3, (block,) * 3, (halo,) * 3, (block,) * 3)
    return grid[len(grid) // 2]


def test_rl_block_estimate_bounds_measured_peak(tmp_path: Path) -> None:
    psf = np.random.default_rng(1).random((7, 7, 7)).astype(np.float32)
    processor = RLProcessor(psf, iterations=5)
    block = _interior_block(64, 21)  # read 106^3
    base, peak = _measured(processor, block, tmp_path)
    estimate = processor.block_bytes(block)
    measured = f"measured {(peak - base) / MiB:.0f} MiB (base {base / MiB:.0f} MiB)"
    print(f"RL block: {measured}, estimate {estimate / MiB:.0f} MiB")
    assert peak - base <= estimate <= 3 * (peak - base)
    # The worker's own share: the process before the block, with torch imported.
    assert base <= WORKER_BASE_BYTES <= 1.5 * base


def test_network_block_estimate_bounds_measured_peak(tiny_model: Path, tmp_path: Path) -> None:
    from hpcdeconv.inference.model import load_model

    model = load_model(tiny_model, "cpu")
    processor = NetworkProcessor.from_model(model, (64, 64, 64), 16, "linear", 1, "fp32")
    assert processor.channels == 4
    block = _interior_block(48, model.receptive_field // 2)  # padded 94^3
    base, peak = _measured(processor, block, tmp_path)
    estimate = processor.block_bytes(block)
    print(f"U-Net block: measured {(peak - base) / MiB:.0f} MiB, estimate {estimate / MiB:.0f} MiB")
    assert peak - base <= estimate <= 3 * (peak - base)


# --------------------------------------------------------------------------------------
# Refused up front
# --------------------------------------------------------------------------------------


def _hpcdeconv() -> list[str]:
    return [sys.executable, "-m", "hpcdeconv.cli"]


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 x 64 x 64 random volume in zarr."""
    root = tmp_path_factory.mktemp("volume")
    data = np.random.default_rng(3).random((64, 64, 64)).astype(np.float32)
    write_volume(create_dataset(root / "in.zarr"), "blurred/v0", data, (0.1, 0.1, 0.1))
    return root / "in.zarr" / "blurred" / "v0"


@pytest.mark.parametrize("limit", ["300MiB", "380MiB"])
def test_memory_per_worker_below_a_block_is_refused_up_front(
    volume: Path, tmp_path: Path, limit: str
) -> None:
    psf = tmp_path / "psf.npy"
    np.save(psf, np.ones((9, 9, 9), np.float32))
    out = tmp_path / "out.zarr"
    command = [*_hpcdeconv(), "rl", "--psf", str(psf), str(volume), "--output", str(out)]
    command += ["--set", f"cluster.memory_per_worker={limit}", "--workers", "1"]
    start = time.monotonic()
    proc = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    # Block 64^3, read 64^3 (the whole volume), FFT 72^3: 40 MiB + 80 B x 373248 = 68 MiB.
    assert f"cluster.memory_per_worker={limit} is too small" in lines[0]
    assert "needs ~452MiB (worker ~384MiB + 1 x block (64, 64, 64) ~68MiB)" in lines[0]
    assert "set cluster.memory_per_worker=576MiB or more" in lines[0]
    assert not out.exists()
    assert seconds < 60


# --------------------------------------------------------------------------------------
# Killed or paused at runtime
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HungryProcessor:
    """Copies each block, and on blocks from ``first_hungry`` on grows the worker's memory to
    ``fraction`` of its dask memory limit and holds it (a processor whose estimate is wrong).
    """

    fraction: float
    first_hungry: int = 1

    @property
    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "hungry-test"}

    def __call__(self, data: np.ndarray, block: Block) -> np.ndarray:
        from distributed import get_worker

        if self.fraction and np.ravel_multi_index(block.index, (2, 2, 2)) >= self.first_hungry:
            limit = get_worker().memory_manager.memory_limit
            time.sleep(3.0)  # lets the client collect the blocks finished before
            grow = max(int(self.fraction * limit) - _rss(), 0)
            held = np.ones(grow // 8)  # touched: resident
            _HELD.append(held)
            time.sleep(2.0)
        return np.array(data, dtype=np.float32)  # halo 0: read == write


_HELD: list[np.ndarray] = []


@pytest.fixture
def process_cluster() -> Iterator[Client]:
    """One worker process (one thread) behind a nanny, limited to 700 MiB."""
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            memory_limit="700MiB",
            dashboard_address="127.0.0.1:0",
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


PLAN = BlockPlan((32, 32, 32), (0, 0, 0), (32, 32, 32), retries=0)


def _done(output: Path) -> set[int]:
    record = read_record(zarr.open_group(output, mode="r"))
    assert record is not None
    from hpcdeconv.inference.manifest import decode_ranges

    return decode_ranges(record["completed"].get("v0", []))


@pytest.mark.slow
def test_workers_killed_for_memory_end_in_one_line_and_resume(
    process_cluster: Client, volume: Path, tmp_path: Path
) -> None:
    sources = open_sources([volume])
    out = tmp_path / "out.zarr"
    start = time.monotonic()
    with pytest.raises(WorkerMemoryError) as err:
        deconvolve_volumes(
            process_cluster, sources, out, HungryProcessor(1.2), PLAN, progress=False
        )
    seconds = time.monotonic() - start
    message = str(err.value)
    print(f"killed for memory: error after {seconds:.1f} s")
    assert "dask workers died" in message
    assert "exceeding cluster.memory_per_worker=700MiB" in message
    assert "one block was estimated at ~384MiB" in message and "--resume" in message
    assert "raise cluster.memory_per_worker above 700MiB" in message
    assert "\n" not in message
    assert seconds < 60
    # Blocks recorded as finished (block 0, when dask ran it first) are skipped on resume.
    done = _done(out)
    assert done <= {0}
    report = deconvolve_volumes(
        process_cluster, sources, out, HungryProcessor(0.0), PLAN, "resume", progress=False
    )
    assert report.complete and report.skipped == len(done)
    result = zarr.open_array(out / "deconvolved" / "v0" / "0", mode="r")[...]
    assert np.array_equal(result, sources[0].read((slice(0, 64),) * 3))


def test_workers_paused_for_memory_end_in_one_line(
    process_cluster: Client, volume: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(driver, "PAUSED_LIMIT_S", 5.0)
    sources = open_sources([volume])
    out = tmp_path / "out.zarr"
    start = time.monotonic()
    with pytest.raises(WorkerMemoryError) as err:
        # 88 %: above dask's pause (80 %), below its kill (95 %).
        deconvolve_volumes(
            process_cluster, sources, out, HungryProcessor(0.88), PLAN, progress=False
        )
    seconds = time.monotonic() - start
    message = str(err.value)
    print(f"paused for memory: error after {seconds:.1f} s")
    assert "every dask worker has been paused for memory, running nothing, for 5 s" in message
    assert "cluster.memory_per_worker=700MiB" in message
    assert "one block was estimated at ~384MiB" in message
    assert seconds < 60
    # The block that filled the worker finished and is recorded; none after it started.
    assert len(_done(out)) == 1


# --------------------------------------------------------------------------------------
# A killed scheduler
# --------------------------------------------------------------------------------------


def _dask(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("dask")
    return [str(script), *args] if script.is_file() else [sys.executable, "-m", "dask", *args]


@pytest.fixture
def external_cluster(
    tmp_path: Path,
) -> Iterator[tuple[Callable[..., Path], list[subprocess.Popen[bytes]]]]:
    """``start(name, memory)``: a ``dask scheduler`` and one ``dask worker`` process (one
    thread, ``--memory-limit memory``), returning the scheduler file; and the processes,
    scheduler first, all killed at the end."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(name: str, memory: str = "2GiB") -> Path:
        file = tmp_path / f"{name}.json"
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        processes.append(
            subprocess.Popen(
                _dask(
                    "scheduler",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "0",
                    "--scheduler-file",
                    str(file),
                    "--no-dashboard",
                ),
                env=_env(),
                stdout=log,
                stderr=log,
            )
        )
        processes.append(
            subprocess.Popen(
                _dask(
                    "worker",
                    "--scheduler-file",
                    str(file),
                    "--nthreads",
                    "1",
                    "--memory-limit",
                    memory,
                    "--no-dashboard",
                ),
                env=_env(),
                stdout=log,
                stderr=log,
            )
        )
        deadline = time.monotonic() + 60
        while not file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        return file

    try:
        yield start, processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)


def _address(file: Path) -> str:
    return json.loads(file.read_text())["address"]


@pytest.mark.slow
@pytest.mark.distributed
def test_killed_scheduler_ends_in_one_line_and_output_resumes(
    external_cluster: Any, client: Client, tmp_path: Path
) -> None:
    start_cluster, processes = external_cluster
    data = np.random.default_rng(5).random((32, 64, 256)).astype(np.float32)
    write_volume(create_dataset(tmp_path / "in.zarr"), "blurred/v0", data, (0.1, 0.1, 0.1))
    psf = tmp_path / "psf.npy"
    np.save(psf, np.ones((5, 5, 5), np.float32))
    out = tmp_path / "out.zarr"
    args = ["rl", "--psf", str(psf), str(tmp_path / "in.zarr" / "blurred" / "v0")]
    args += ["--output", str(out), "--block", "32", "--set", "chunks=[32, 32, 32]"]
    args += ["--iterations", "40", "--halo", "8"]
    scheduler = start_cluster("first")
    run = subprocess.Popen(
        [*_hpcdeconv(), *args, "--scheduler", _address(scheduler)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    chunks = out / "deconvolved" / "v0" / "0" / "c"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and len(list(chunks.rglob("*"))) < 6:
        time.sleep(0.2)
    processes[0].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = run.communicate(timeout=90)
    seconds = time.monotonic() - killed
    print(f"scheduler killed: error after {seconds:.1f} s")
    assert run.returncode == 2, stderr[-3000:]
    (tmp_path / "killed.err").write_text(stderr)
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("hpcdeconv rl: error:")]
    assert len(lines) == 1
    assert "lost the dask scheduler at tcp://127.0.0.1:" in lines[0]
    assert "run again with --resume" in lines[0]
    assert seconds < 60
    done = _done(out)
    assert 0 < len(done) < 16
    # Back with a new scheduler: the run continues where it stopped.
    processes[1].kill()
    scheduler = start_cluster("second")
    proc = subprocess.run(
        [*_hpcdeconv(), *args, "--scheduler", _address(scheduler), "--resume"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{16 - len(done)} block(s) computed, {len(done)} already done" in proc.stdout
    # The blocks of both runs together equal one uninterrupted run.
    plan = BlockPlan((32, 32, 32), (8, 8, 8), (32, 32, 32))
    whole = tmp_path / "whole.zarr"
    sources = open_sources([tmp_path / "in.zarr" / "blurred" / "v0"])
    rl = RLProcessor(np.ones((5, 5, 5), np.float32), 40)
    deconvolve_volumes(client, sources, whole, rl, plan, progress=False)
    resumed = zarr.open_array(out / "deconvolved" / "v0" / "0", mode="r")[...]
    expected = zarr.open_array(whole / "deconvolved" / "v0" / "0", mode="r")[...]
    np.testing.assert_allclose(resumed, expected, rtol=1e-5, atol=1e-6)


def test_workers_of_an_existing_scheduler_below_a_block_are_refused(
    external_cluster: Any, volume: Path, tmp_path: Path
) -> None:
    start_cluster, _ = external_cluster
    scheduler = start_cluster("small", memory="300MiB")
    psf = tmp_path / "psf.npy"
    np.save(psf, np.ones((9, 9, 9), np.float32))
    out = tmp_path / "out.zarr"
    command = [*_hpcdeconv(), "rl", "--psf", str(psf), str(volume), "--output", str(out)]
    command += ["--scheduler", _address(scheduler)]
    proc = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("hpcdeconv rl: error:")]
    assert len(lines) == 1
    assert (
        "dask worker --memory-limit=300MiB is too small: one dask worker needs ~452MiB" in lines[0]
    )
    assert "set dask worker --memory-limit=576MiB or more" in lines[0]
    assert not out.exists()
