"""``hpcdeconv deconvolve`` and ``hpcdeconv rl`` from the command line: results and provenance
through a scheduler address, resume and overwrite, and every bad input as one error line with
a non-zero exit that leaves an existing output untouched."""

from __future__ import annotations

import ast
import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
from distributed import Client

from hpcdeconv.classical.rl import richardson_lucy
from hpcdeconv.cli import main
from hpcdeconv.config import ClusterConfig, DeconvolveConfig, ExperimentConfig, load_config
from hpcdeconv.data.layout import volume_meta
from hpcdeconv.data.zarr_io import create_dataset, write_volume
from hpcdeconv.errors import ConfigError
from hpcdeconv.inference.cluster import connect, local_worker_count, slurm_cluster_options
from hpcdeconv.inference.manifest import decode_ranges, encode_ranges, read_record
from hpcdeconv.physics.psf import gaussian
from hpcdeconv.training.checkpoint import latest_checkpoint
from hpcdeconv.training.engine import train
from tests.conftest import TINY_TRAINING

REPO = Path(__file__).resolve().parents[2]
SHAPE = (32, 48, 40)
# One tile per block (the run validated with smaller ones) and no blending, so outputs can
# be compared with whole-volume results.
EXACT = ["--block", "24", "--set", "chunks=[8, 8, 8]", "--set", "blend=constant"]
EXACT += ["--set", "overlap=0", "--set", "tile=[64, 64, 64]"]


@pytest.fixture(scope="module")
def run_dir(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run directory of a depth-1, norm-free U-Net (receptive field 19, halo 9)."""
    run = tmp_path_factory.mktemp("checkpoint") / "run"
    overrides = [
        *TINY_TRAINING,
        f"data.path={tiny_dataset}",
        f"output={run}",
        "method.name=supervised",
        "train.steps=2",
        "method.generator.norm=none",
        "method.generator.depth=1",
    ]
    train(load_config(ExperimentConfig, None, overrides), progress=False)
    return run


@pytest.fixture
def volume_path(tmp_path: Path) -> Path:
    volume = np.random.default_rng(7).random(SHAPE).astype(np.float32)
    group = create_dataset(tmp_path / "in.zarr")
    write_volume(group, "blurred/v0", volume, (0.2, 0.1, 0.1), chunks=(16, 16, 16))
    return tmp_path / "in.zarr" / "blurred" / "v0"


def read(path: Path) -> np.ndarray:
    """Full resolution of an OME-NGFF image group."""
    return zarr.open_array(path / "0", mode="r")[...]


def whole_volume(run_dir: Path, volume: np.ndarray, halo: int) -> np.ndarray:
    from hpcdeconv.inference.model import load_model

    net = load_model(run_dir).net
    with torch.inference_mode():
        out = net(torch.from_numpy(np.pad(volume, halo, mode="symmetric"))[None, None])
    return out[0, 0, halo:-halo, halo:-halo, halo:-halo].numpy()


def test_deconvolve_writes_the_result_and_its_provenance(
    run_dir: Path,
    scheduler: str,
    volume_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out.zarr"
    args = ["deconvolve", "--checkpoint", str(run_dir), str(volume_path), "--output", str(out)]
    args += ["--scheduler", scheduler, *EXACT]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "8 block(s) computed, 0 already done" in printed and "voxels/s" in printed
    assert f"dask scheduler {scheduler}" in printed
    result = read(out / "deconvolved" / "v0")
    assert np.abs(result - whole_volume(run_dir, read(volume_path), 9)).max() <= 1e-5

    meta = volume_meta(zarr.open_array(out / "deconvolved" / "v0" / "0", mode="r"))
    assert meta.voxel_size == (0.2, 0.1, 0.1) and meta.axes == ("z", "y", "x")
    provenance = zarr.open_group(out / "deconvolved" / "v0", mode="r").attrs["provenance"]
    checkpoint = latest_checkpoint(run_dir)
    assert provenance["checkpoint"] == str(checkpoint.absolute())
    assert provenance["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert (provenance["method"], provenance["step"]) == ("supervised", 2)
    assert provenance["halo"] == [9, 9, 9] and provenance["block"] == [24, 24, 24]
    assert provenance["config"]["blend"] == "constant"
    assert provenance["input"] == str(volume_path.absolute())
    assert provenance["version"] == "0.1.0"
    record = read_record(zarr.open_group(out, mode="r"))
    assert record is not None and record["completed"] == {"v0": [[0, 8]]}

    assert main([*args, "--resume"]) == 0
    assert "0 block(s) computed, 8 already done" in capsys.readouterr().out
    np.testing.assert_array_equal(read(out / "deconvolved" / "v0"), result)
    assert main([*args, "--overwrite", "--halo", "4"]) == 0
    assert "8 block(s) computed" in capsys.readouterr().out
    halo4 = zarr.open_group(out / "deconvolved" / "v0", mode="r")
    assert halo4.attrs["provenance"]["halo"] == [4, 4, 4]
    assert not np.array_equal(read(out / "deconvolved" / "v0"), result)


def test_rl_from_a_model_or_a_file_equals_whole_volume_rl(
    scheduler: str, volume_path: Path, tmp_path: Path
) -> None:
    volume = read(volume_path)
    psf = gaussian((5, 5, 5), (1.5, 1.0, 1.0)).astype(np.float32)
    np.save(tmp_path / "psf.npy", psf)
    common = [str(volume_path), "--iterations", "3", "--halo", "12", "--scheduler", scheduler]
    common += ["--block", "24", "--set", "chunks=[8, 8, 8]"]
    model = ["--psf-model", "gaussian", "--set", "psf.shape=[5, 5, 5]"]
    model += ["--set", "psf.sigma=[1.5, 1.0, 1.0]"]
    from_file = ["--psf", str(tmp_path / "psf.npy")]
    assert main(["rl", *model, *common, "--output", str(tmp_path / "m.zarr")]) == 0
    assert main(["rl", *from_file, *common, "--output", str(tmp_path / "f.zarr")]) == 0
    whole = richardson_lucy(volume, psf, 3)
    for name in ("m", "f"):
        result = read(tmp_path / f"{name}.zarr" / "deconvolved" / "v0")
        assert np.abs(result - whole).max() <= 1e-5 * whole.max()
    provenance = zarr.open_group(tmp_path / "m.zarr" / "deconvolved" / "v0").attrs["provenance"]
    assert provenance["psf"]["model"]["model"] == "gaussian"
    assert provenance["processor"]["iterations"] == 3
    provenance = zarr.open_group(tmp_path / "f.zarr" / "deconvolved" / "v0").attrs["provenance"]
    assert provenance["psf"]["file"] == str((tmp_path / "psf.npy").absolute())


def test_deconvolve_block_halo_rule_applies_only_where_the_volume_is_split(
    run_dir: Path, scheduler: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hpcdeconv.inference.driver import deconvolve_volumes
    from hpcdeconv.inference.model import load_model
    from hpcdeconv.inference.plan import BlockPlan
    from hpcdeconv.inference.processors import NetworkProcessor
    from hpcdeconv.inference.sources import open_sources

    rng = np.random.default_rng(8)
    small, wide = rng.random((16, 20, 24), np.float32), rng.random((16, 48, 40), np.float32)
    group = create_dataset(tmp_path / "in.zarr")
    for name, volume in (("small", small), ("wide", wide)):
        write_volume(group, f"blurred/{name}", volume, (0.2, 0.1, 0.1), chunks=(8, 8, 8))
    # A halo of 20 is more than half the 24-voxel block, but the volume fits in one block:
    # taken whole (halo clipped to z's 16 voxels), equal to whole-volume inference.
    args = ["deconvolve", "--checkpoint", str(run_dir), str(tmp_path / "in.zarr/blurred/small")]
    args += ["--output", str(tmp_path / "s.zarr"), "--scheduler", scheduler, *EXACT]
    assert main([*args, "--halo", "20"]) == 0
    assert "1 block(s) computed" in capsys.readouterr().out
    result = read(tmp_path / "s.zarr" / "deconvolved" / "small")
    assert np.abs(result - whole_volume(run_dir, small, 20)).max() <= 1e-5
    # Split along y and x only: a z halo of 30 is allowed, and stitched == whole volume.
    processor = NetworkProcessor.from_model(
        load_model(run_dir), (64,) * 3, 0, "constant", 1, "fp32"
    )
    plan = BlockPlan((24, 24, 24), (30, 9, 9), (8, 8, 8))
    source = open_sources([tmp_path / "in.zarr" / "blurred" / "wide"])
    with Client(scheduler) as client:
        report = deconvolve_volumes(
            client, source, tmp_path / "w.zarr", processor, plan, progress=False
        )
    assert report.total_blocks == 4
    result = read(tmp_path / "w.zarr" / "deconvolved" / "wide")
    # The reference pads as the blocks do (16 in z, 9 in y and x): the U-Net's pooling grid
    # must line up with the volume the same way.
    padded = np.pad(wide, [(16, 16), (9, 9), (9, 9)], mode="symmetric")
    with torch.inference_mode():
        whole = load_model(run_dir).net(torch.from_numpy(padded)[None, None])[0, 0].numpy()
    assert np.abs(result - whole[16:-16, 9:-9, 9:-9]).max() <= 1e-5


def test_nan_input_names_the_block(
    run_dir: Path, scheduler: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    volume = np.ones(SHAPE, np.float32)
    volume[5, 2, 39] = np.inf  # read by block (0, 0, 1) alone
    tifffile.imwrite(tmp_path / "bad.tif", volume)
    args = ["deconvolve", "--checkpoint", str(run_dir), str(tmp_path / "bad.tif")]
    args += ["--output", str(tmp_path / "o.zarr"), "--scheduler", scheduler, *EXACT]
    assert main(args) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert last.startswith("hpcdeconv deconvolve: error: ")
    assert "bad.tif: block (0, 0, 1) (z 0:24, y 0:24, x 24:40) reads 1 NaN or Inf" in last


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _bad_cases(tmp_path: Path, run_dir: Path, volume_path: Path) -> dict[str, tuple[list, str]]:
    """name -> (arguments after the verb, expected error text)."""
    store = volume_path.parents[1]
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, np.ones((16, 16), np.float32))
    ckpt = ["--checkpoint", str(run_dir)]
    return {
        "same path": (
            [*ckpt, str(volume_path), "--output", str(volume_path)],
            "overlap",
        ),
        "inside the input store": (
            [*ckpt, str(volume_path), "--output", str(store)],
            "overlap",
        ),
        "missing checkpoint": (
            ["--checkpoint", str(tmp_path / "nope"), str(volume_path)],
            "no checkpoint found",
        ),
        "other checkpoint format": (
            ["--checkpoint", str(tmp_path / "other.pt"), str(volume_path)],
            "not an hpcdeconv checkpoint",
        ),
        "block below twice the halo": (
            [*ckpt, str(volume_path), "--block", "16", "--set", "chunks=[8, 8, 8]"],
            "block (16, 16, 16) is smaller than 2 x halo (9, 9, 9)",
        ),
        "block not a multiple of chunks": (
            [*ckpt, str(volume_path), "--block", "100"],
            "must be a multiple of chunks",
        ),
        # 2D images are read (for 2D generators); this checkpoint's generator is 3D.
        "2D TIFF": ([*ckpt, str(flat)], "a 2D image (axes YX); the checkpoint's generator is 3D"),
        "missing input": ([*ckpt, str(tmp_path / "none.tif")], "no such file"),
        "unreachable scheduler": (
            [*ckpt, str(volume_path), "--scheduler", f"tcp://127.0.0.1:{_free_port()}"],
            "cannot reach the dask scheduler",
        ),
    }


CASES = [
    "same path",
    "inside the input store",
    "missing checkpoint",
    "other checkpoint format",
    "block below twice the halo",
    "block not a multiple of chunks",
    "2D TIFF",
    "missing input",
    "unreachable scheduler",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_leaves_the_output_alone(
    case: str,
    run_dir: Path,
    volume_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args, expected = _bad_cases(tmp_path, run_dir, volume_path)[case]
    existing = tmp_path / "existing.zarr"  # an earlier result that --overwrite may replace
    write_volume(create_dataset(existing), "keep", np.ones((2, 2, 2), np.float32), (1, 1, 1))
    before = sorted(p.name for p in existing.rglob("*"))
    if "--output" not in args:
        args = [*args, "--output", str(existing), "--overwrite"]
    start = time.monotonic()
    assert main(["deconvolve", *args]) == 2
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    assert err.startswith("hpcdeconv deconvolve: error: ") and err.count("\n") == 1
    assert expected in err
    assert sorted(p.name for p in existing.rglob("*")) == before
    assert read(existing / "keep").sum() == 8
    assert read(volume_path).shape == SHAPE


def test_existing_output_is_refused_without_overwrite_or_resume(
    run_dir: Path, volume_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    existing = tmp_path / "existing.zarr"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    args = ["deconvolve", "--checkpoint", str(run_dir), str(volume_path)]
    assert main([*args, "--output", str(existing)]) == 2
    err = capsys.readouterr().err
    assert "exists; pass --overwrite to replace it or --resume to continue it" in err
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--output", str(existing), "--overwrite", "--resume"])
    assert exc.value.code == 2


def test_rl_bad_psf(volume_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "flat.npy", np.ones((5, 5), np.float32))
    np.save(tmp_path / "zero.npy", np.zeros((3, 3, 3), np.float32))
    args = ["rl", str(volume_path), "--output", str(tmp_path / "o.zarr")]
    assert main([*args, "--psf", str(tmp_path / "flat.npy")]) == 2
    assert "expected a 3D (Z, Y, X) PSF" in capsys.readouterr().err
    assert main([*args, "--psf", str(tmp_path / "zero.npy")]) == 2
    assert "PSF has no positive values" in capsys.readouterr().err
    assert main([*args, "--psf-model", "gaussian", "--tv", "0.9"]) == 2
    assert "tv must lie in" in capsys.readouterr().err
    # The volume (32, 48, 40) fits in a block of 64: the halo of 90 is then no reason to
    # refuse; split into blocks of 16 it is, with the flag values that fix it.
    assert (
        main([*args, "--psf-model", "born-wolf", "--block", "16", "--set", "chunks=[8, 8, 8]"]) == 2
    )
    assert (
        "block (16, 16, 16) is smaller than 2 x halo (90, 90, 90) along z, y, x, where the "
        "volume needs several blocks; use --block 48 or more, or --halo 8 or less"
    ) in capsys.readouterr().err
    assert not (tmp_path / "o.zarr").exists()
    for wrong in (["--psf", "x.npy", "--psf-model", "gaussian"], []):
        with pytest.raises(SystemExit) as exc:
            main([*args, *wrong])
        assert exc.value.code == 2


def test_a_silent_scheduler_times_out_with_one_line() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(ConfigError, match=f"cannot reach the dask scheduler at {address}"):
            connect(address, timeout=1.0)
        assert time.monotonic() - start < 8


def test_manifest_ranges_round_trip(rng: np.random.Generator) -> None:
    indices = set(rng.choice(500, size=200, replace=False).tolist())
    ranges = encode_ranges(indices)
    assert decode_ranges(ranges) == indices
    assert all(a < b for a, b in ranges)
    assert all(ranges[i][1] < ranges[i + 1][0] for i in range(len(ranges) - 1))
    assert encode_ranges([3, 4, 5, 9]) == [[3, 6], [9, 10]]


def test_cluster_sizing_and_slurm_options() -> None:
    cfg = load_config(DeconvolveConfig, REPO / "configs" / "deconvolve.yaml").cluster
    assert local_worker_count(cfg, gpus=4) == 4
    assert local_worker_count(cfg.model_copy(update={"workers": 3}), gpus=4) == 3
    gpu = cfg.model_copy(update={"gpus_per_worker": 1, "partition": "gpu", "threads_per_worker": 4})
    options = slurm_cluster_options(gpu)
    assert options["job_extra_directives"] == ["--gres=gpu:1"]
    assert options["worker_extra_args"] == ["--resources", "GPU=1"]
    assert (options["cores"], options["processes"], options["queue"]) == (4, 1, "gpu")
    assert options["scheduler_options"]["dashboard_address"].startswith("127.0.0.1:")
    assert "job_extra_directives" not in slurm_cluster_options(cfg)


def test_slurm_worker_jobs_get_the_local_workers_malloc_settings() -> None:
    """The job-script prologue, run by bash, changes the worker's dask configuration."""
    (prologue,) = slurm_cluster_options(ClusterConfig(kind="slurm"))["job_script_prologue"]
    probe = (
        "import dask, distributed; print(dask.config.get('distributed.nanny.pre-spawn-environ'))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    shown = subprocess.run(
        ["bash", "-c", f'{prologue} && "{sys.executable}" -c "{probe}"'],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    environ = ast.literal_eval(shown)
    assert environ["MALLOC_TRIM_THRESHOLD_"] is None
    assert environ["MALLOC_ARENA_MAX"] == "1"
    assert environ["OMP_NUM_THREADS"] == 1
