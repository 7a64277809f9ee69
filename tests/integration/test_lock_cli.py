"""One writer per output, from the command line: a second ``hpcdeconv deconvolve`` to an output
that another run is writing (with ``--overwrite`` and another model) is refused with one line
naming the holder, and the first run's result is exactly that of a run alone; the other
verbs that write outputs refuse a held output the same way and leave it untouched."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from distributed import Client

from hpcdeconv.cli import main
from hpcdeconv.config import ExperimentConfig, load_config
from hpcdeconv.data.lock import lock_path
from hpcdeconv.data.zarr_io import create_dataset, write_volume
from hpcdeconv.training.checkpoint import list_checkpoints
from hpcdeconv.training.engine import train
from tests.conftest import TINY_TRAINING

REPO = Path(__file__).resolve().parents[2]

#: Set to let the dask worker's threads go: until then they are busy, so a deconvolve run
#: submitted meanwhile is held mid-write (its output prepared, its blocks queued).
RELEASE = threading.Event()


def _hold_a_thread() -> None:
    RELEASE.wait(120)


def cli(*args: str) -> subprocess.Popen:
    """``hpcdeconv <args>`` in a separate process."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("SLURM_JOB_ID", None)
    return subprocess.Popen(
        [sys.executable, "-m", "hpcdeconv.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def two_checkpoints(tiny_dataset: Path, run: Path) -> tuple[Path, Path]:
    """Checkpoints at steps 2 and 4 of a supervised U-Net (receptive field 19): two models."""
    overrides = [*TINY_TRAINING, f"data.path={tiny_dataset}", f"output={run}"]
    overrides += ["method.name=supervised", "train.steps=4", "train.ckpt_every=2"]
    overrides += ["method.generator.norm=none", "method.generator.depth=1"]
    train(load_config(ExperimentConfig, None, overrides), progress=False)
    first, second = list_checkpoints(run)
    return first, second


def read(path: Path) -> np.ndarray:
    return zarr.open_array(path / "deconvolved" / "v0" / "0", mode="r")[...]


def wait_for(condition, what: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"first run ended before {what}: {proc.communicate()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def tcp_client() -> Iterator[Client]:
    """A dask cluster in this process (one worker, two threads) that other processes reach;
    not the default client, which would take the dask work of every later in-process run."""
    from distributed import LocalCluster

    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=2,
            processes=False,
            protocol="tcp://",
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        Client(cluster, set_as_default=False) as dask_client,
    ):
        yield dask_client


@pytest.mark.slow  # two CLI processes (torch imports) and a training
def test_second_deconvolve_with_overwrite_is_refused_while_the_first_writes(
    tiny_dataset: Path, tcp_client: Client, tmp_path: Path
) -> None:
    client, scheduler = tcp_client, tcp_client.scheduler.address
    model_a, model_b = two_checkpoints(tiny_dataset, tmp_path / "run")
    volume = np.random.default_rng(7).random((32, 48, 40)).astype(np.float32)
    write_volume(create_dataset(tmp_path / "in.zarr"), "blurred/v0", volume, (0.2, 0.1, 0.1))
    source = str(tmp_path / "in.zarr" / "blurred" / "v0")
    exact = ["--block", "24", "--scheduler", scheduler, "--set", "chunks=[8, 8, 8]"]
    out = tmp_path / "out.zarr"

    RELEASE.clear()
    holders = [client.submit(_hold_a_thread, pure=False) for _ in range(2)]
    try:
        first = cli(
            "deconvolve", "--checkpoint", str(model_a), source, "--output", str(out), *exact
        )

        def blocks_queued() -> bool:
            return client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) > 2

        wait_for(blocks_queued, "its blocks were queued", first)
        assert lock_path(out).exists() and (out / "deconvolved" / "v0" / "0").is_dir()
        second = cli(
            "deconvolve", "--checkpoint", str(model_b), source, "--output", str(out),
            "--overwrite", *exact,
        )  # fmt: skip
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith(
            f"hpcdeconv deconvolve: error: {out} is being written by hpcdeconv deconvolve "
            f"(host {os.uname().nodename}, PID {first.pid}, since "
        )
        assert lines[0].endswith("UTC); wait for it or stop it")
        assert first.poll() is None  # still writing, untouched
    finally:
        RELEASE.set()
        client.gather(holders)
    printed, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert "8 block(s) computed" in printed
    assert not lock_path(out).exists()  # released at exit

    # The first run's output is exactly a run alone with model A, and says so.
    for model, name in ((model_a, "ref_a.zarr"), (model_b, "ref_b.zarr")):
        args = ["deconvolve", "--checkpoint", str(model), source, "--output"]
        assert main([*args, str(tmp_path / name), *exact]) == 0
    result = read(out)
    np.testing.assert_array_equal(result, read(tmp_path / "ref_a.zarr"))
    assert not np.allclose(result, read(tmp_path / "ref_b.zarr"))  # mixing would show
    provenance = zarr.open_group(out / "deconvolved" / "v0", mode="r").attrs["provenance"]
    assert provenance["checkpoint"] == str(model_a.absolute())
    assert provenance["checkpoint_sha256"] == hashlib.sha256(model_a.read_bytes()).hexdigest()
    assert provenance["step"] == 2


HOLDER = """
import sys
from hpcdeconv.data.lock import OutputLock
lock = OutputLock(sys.argv[1], "deconvolve").acquire()
print("held", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("verb", ["psf", "simulate", "ingest", "rl"])
def test_every_writing_verb_refuses_a_held_output_and_leaves_it_alone(
    verb: str, request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    volume = np.ones((8, 8, 8), np.float32)
    write_volume(create_dataset(tmp_path / "in.zarr"), "blurred/v0", volume, (0.2, 0.1, 0.1))
    if verb == "psf":
        out = tmp_path / "psf.tif"
        args = ["psf", "--model", "gaussian", "--out", str(out), "--set", "psf.shape=[5, 5, 5]"]
    elif verb == "simulate":
        out = tmp_path / "sim.zarr"
        args = ["simulate", str(out), "--set", "shape=[8, 8, 8]", "--set", "psf.shape=[3, 3, 3]"]
    elif verb == "ingest":
        tifffile.imwrite(tmp_path / "in.tif", volume)
        out = tmp_path / "ingested.zarr"
        args = ["ingest", str(tmp_path / "in.tif"), "--output", str(out)]
        args += ["--voxel-size", "0.2", "0.1", "0.1"]
    else:
        out = tmp_path / "rl.zarr"
        args = ["rl", str(tmp_path / "in.zarr" / "blurred" / "v0"), "--output", str(out)]
        args += ["--psf-model", "gaussian", "--set", "psf.shape=[3, 3, 3]", "--iterations", "1"]
        # Only rl gets a dask client: a live default client would take ingest's dask work.
        args += ["--scheduler", request.getfixturevalue("scheduler")]
    assert main(args) == 0
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} or {
        out: out.read_bytes()
    }
    capsys.readouterr()

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        assert main([*args, "--overwrite"]) == 2
    finally:
        holder.stdin.close()
        holder.wait()
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"hpcdeconv {verb}: error: {out} is being written by hpcdeconv")
    assert f"PID {holder.pid}" in err and len(err.splitlines()) == 1
    after = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} or {
        out: out.read_bytes()
    }
    assert after == before
