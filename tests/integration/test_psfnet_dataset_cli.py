"""``hpcdeconv psfnet make-dataset`` end to end: the same bytes whatever the number of workers,
an external scheduler, or a kill and ``--resume``; bad input refused in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from hpcdeconv.data.samples import PSFSampleStore

# A small zernike3 set: 40 tasks of 4 samples, 48-pixel patches, 31-pixel PSFs.
CONFIG = {
    "psf": {"model": "zernike3", "optics": {"psf_size": 31, "camera_pixel": 2.0}},
    "phantoms": {"count": 2, "size": 128, "kinds": ["cells", "microtubules"]},
    "patch": 48,
    "samples": 160,
    "chunk": 4,
    "device": "cpu",
}
ARRAYS = ("patches", "params", "valid", "done")


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "z3.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "hpcdeconv.cli", "psfnet", "make-dataset", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=180, **kwargs)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(path, mode="r")
    return {name: np.asarray(group[name][...]) for name in ARRAYS}


def _assert_same(a: Path, b: Path) -> None:
    left, right = _arrays(a), _arrays(b)
    for name in ARRAYS:
        np.testing.assert_array_equal(left[name], right[name], err_msg=name)
    assert PSFSampleStore(a).root == PSFSampleStore(b).root


@pytest.fixture(scope="module")
def serial(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: every task run in this process, one after another, no dask."""
    from hpcdeconv.config import PSFDatasetConfig
    from hpcdeconv.psfnet.dataset_run import make_dataset

    out = tmp_path_factory.mktemp("serial") / "z3.zarr"
    report = make_dataset(PSFDatasetConfig.model_validate(CONFIG), out, "new")
    assert (report.computed, report.samples) == (40, 160)
    return out


@pytest.mark.distributed
def test_workers_and_an_external_scheduler_write_the_serial_bytes(
    config: Path, serial: Path, tmp_path: Path
) -> None:
    from distributed import LocalCluster

    two = tmp_path / "two.zarr"
    done = cli("--config", str(config), "--workers", "2", str(two))
    assert done.returncode == 0, done.stderr
    assert "40 task(s) computed, 0 already done: 160 samples" in done.stdout
    _assert_same(serial, two)
    store = PSFSampleStore(two)
    assert store.names == ("focus", "cylinder", "axis")
    assert len(store.split("train")) == 128 and len(store.split("test")) == 16
    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, protocol="tcp", dashboard_address=":0"
    ) as cluster:
        external = tmp_path / "external.zarr"
        done = cli("--config", str(config), "--scheduler", cluster.scheduler_address, str(external))
        assert done.returncode == 0, done.stderr
    _assert_same(serial, external)


@pytest.mark.distributed
def test_killed_run_resumed_equals_the_serial_run(
    config: Path, serial: Path, tmp_path: Path
) -> None:
    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "hpcdeconv.cli", "psfnet", "make-dataset"]
    proc = subprocess.Popen(
        [*cmd, "--config", str(config), "--workers", "1", str(out)],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    flags = out / "done" / "c"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if flags.is_dir() and len(list(flags.iterdir())) >= 3:
            break
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the client, the scheduler and the worker
    proc.wait()
    written = int(np.asarray(zarr.open_group(out, mode="r")["done"][...]).sum())
    assert 3 <= written < 40, f"kill landed after {written} of 40 tasks"
    assert PSFSampleStore(out).split("train") == []  # not finalised
    # The killed run's lock is released by the kernel; a plain rerun refuses the output ...
    again = cli("--config", str(config), str(out))
    assert again.returncode == 2 and "--overwrite" in again.stderr
    # ... and --resume finishes it.
    resumed = cli("--config", str(config), "--workers", "2", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert f"{40 - written} task(s) computed, {written} already done" in resumed.stdout
    _assert_same(serial, out)


def _one_line_error(done: subprocess.CompletedProcess[str], match: str) -> None:
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("hpcdeconv psfnet: error:") and match in lines[0], lines[0]


def test_bad_input_is_refused_in_one_line(config: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    done = cli("--config", str(config), "--set", "psf.model=gaussian1",
               "--set", "psf.ranges={width: [-0.2, 1.0]}", str(out))  # fmt: skip
    _one_line_error(done, "outside its meaning")
    done = cli("--config", str(config), "--set", "patch=200", str(out))
    _one_line_error(done, "at least 230x230")
    assert not out.exists()
    # An output inside an input image (a zarr store) is refused before anything is written.
    source = tmp_path / "sharp.zarr"
    zarr.save_array(str(source), np.random.default_rng(0).random((100, 100)).astype(np.float32))
    inside = source / "samples.zarr"
    done = cli("--config", str(config), "--set", f"images=[{source}]", str(inside))
    _one_line_error(done, "lies inside")
    assert not inside.exists()
    # An existing output is left untouched without --overwrite.
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    done = cli("--config", str(config), str(out))
    _one_line_error(done, "exists; pass --overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
