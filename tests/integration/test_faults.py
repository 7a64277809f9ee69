"""Faults of multi-process training end every rank with one line and never poison a run.

Each case is a regression test of issue 13: a NaN on one rank only, a user error seen by
rank 0 only (under mpirun), a full disk at checkpoint time, and exact DDP resume with the
per-rank history pools and random streams of every rank.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from hpcdeconv.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from hpcdeconv.training.runlog import read_metrics
from tests.conftest import TINY_TRAINING

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = str(REPO / "launch" / "torchrun.sh")
MPIRUN = str(REPO / "launch" / "mpirun.sh")

# hpcdeconv train with one batch of one rank blown up to Inf (NAN_RANK, NAN_AT: 1-based
# call of the method's step); everything else is the real CLI.
FAULTY_TRAIN = r"""
import os, sys
from hpcdeconv import cli
from hpcdeconv.methods.cycle import CycleGANMethod

real_step = CycleGANMethod.step
calls = 0

def step(self, batch):
    global calls
    calls += 1
    if calls == int(os.environ["NAN_AT"]) and os.environ["RANK"] == os.environ["NAN_RANK"]:
        batch = {**batch, "y": batch["y"] * float("inf")}
    return real_step(self, batch)

CycleGANMethod.step = step
sys.exit(cli.main(sys.argv[1:]))
"""


def _args(data: Path, run: Path, *extra: str) -> list[str]:
    items = [
        *TINY_TRAINING,
        f"data.path={data}",
        "method.kernel.size=[7, 7, 7]",
        "strategy.name=ddp",
        "strategy.timeout_s=60",
        "train.deterministic=true",
        *extra,
    ]
    return ["train", "--output", str(run), *[a for i in items for a in ("--set", i)]]


def _env(launch_env: dict[str, str]) -> dict[str, str]:
    return launch_env | {"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _torchrun(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [TORCHRUN, "2", "--", sys.executable, *argv]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _error_lines(stderr: str) -> list[str]:
    # A rank's line may follow its progress bar's last carriage-return update.
    return re.findall(r"hpcdeconv train: error: [^\r\n]*", stderr)


def test_nan_on_one_rank_stops_every_rank_before_any_checkpoint_of_it(
    tiny_dataset: Path, tmp_path: Path, launch_env: dict[str, str]
) -> None:
    run = tmp_path / "run"
    (tmp_path / "faulty.py").write_text(FAULTY_TRAIN)
    env = _env(launch_env) | {"NAN_RANK": "1", "NAN_AT": "3"}
    proc = _torchrun([str(tmp_path / "faulty.py"), *_args(tiny_dataset, run, "train.steps=6")], env)
    assert proc.returncode != 0
    lines = _error_lines(proc.stderr)
    good = run / "checkpoints" / "step_00000002.pt"
    # Both ranks print the same line, naming the rank, the step and the real last good file.
    assert len(lines) == 2 and lines[0] == lines[1], proc.stderr[-3000:]
    assert "non-finite loss at step 3 (rank 1: " in lines[0]
    assert f"last good checkpoint: {good}" in lines[0]
    assert str(REPO / "hpcdeconv") not in proc.stderr  # no traceback of ours
    # Nothing of the bad step was written or pointed to.
    assert latest_checkpoint(run) == good
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002.pt"]
    state = load_checkpoint(run)
    for tree in (state["deblur"], state["groups"]["G"]["module"], state["groups"]["D"]["module"]):
        assert all(torch.isfinite(t).all() for t in tree.values() if t.is_floating_point())
    # The run resumes from it (no fault this time) and finishes.
    proc = _torchrun(
        ["-m", "hpcdeconv.cli", *_args(tiny_dataset, run, "train.steps=4"), "--resume"],
        _env(launch_env),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_checkpoint(run)["step"] == 4


def test_ddp_resume_equals_the_uninterrupted_run(
    tiny_dataset: Path, tmp_path: Path, launch_env: dict[str, str]
) -> None:
    """History pools (size 50, filled per rank) and random streams come back to their rank."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    env = _env(launch_env)
    cli = ["-m", "hpcdeconv.cli"]
    proc = _torchrun([*cli, *_args(tiny_dataset, whole, "train.steps=6")], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _torchrun([*cli, *_args(tiny_dataset, parts, "train.steps=3")], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pools = load_checkpoint(parts)["method_state"]["pools"]
    assert len(pools["x"]["images"]) == 3  # rank 0's pool is filled and travels
    assert (parts / "checkpoints" / "ranks" / "step_00000003" / "rank_00001.pt").is_file()
    # A longer budget is a change a resume applies (and says so); the rest is identical.
    proc = _torchrun([*cli, *_args(tiny_dataset, parts, "train.steps=6"), "--resume"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resume: train.steps 3 -> 6 (applied" in proc.stderr
    assert yaml.safe_load((parts / "config.yaml").read_text())["train"]["steps"] == 6

    def losses(run: Path) -> dict[int, dict[str, float]]:
        return {r["step"]: r for r in read_metrics(run, "train")}

    expected, got = losses(whole), losses(parts)
    assert sorted(got) == list(range(1, 7))  # each step logged once
    for step in range(4, 7):
        for key in ("loss_g", "loss_d", "cycle"):
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-6), (step, key)
    a, b = load_checkpoint(whole)["deblur"], load_checkpoint(parts)["deblur"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


def test_resume_with_another_number_of_ranks_is_refused(
    tiny_dataset: Path, tmp_path: Path, launch_env: dict[str, str]
) -> None:
    run = tmp_path / "run"
    env = _env(launch_env)
    proc = _torchrun(["-m", "hpcdeconv.cli", *_args(tiny_dataset, run, "train.steps=2")], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = latest_checkpoint(run)
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "hpcdeconv.cli",
            *_args(tiny_dataset, run, "train.steps=4"),
            "--resume",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 2
    last = one.stderr.strip().splitlines()[-1]
    assert "was written by 2 process(es), this launch has 1" in last
    assert latest_checkpoint(run) == before


@pytest.mark.mpi
def test_an_error_seen_by_rank_0_only_is_one_line_on_every_rank(
    tiny_dataset: Path, tmp_path: Path, launch_env: dict[str, str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("a previous run's notes")
    command = [MPIRUN, "2", "--", sys.executable, "-m", "hpcdeconv.cli"]
    command += _args(tiny_dataset, run, "train.steps=2")
    proc = subprocess.run(
        command, env=_env(launch_env), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    lines = _error_lines(proc.stderr)
    assert len(lines) == 2 and lines[0] == lines[1], proc.stderr[-3000:]
    assert f"run directory {run} is not empty" in lines[0]
    assert str(REPO / "hpcdeconv") not in proc.stderr  # no traceback of ours
    assert (run / "notes.txt").read_text() == "a previous run's notes"


def _mount_tmpfs(path: Path, size: int) -> None:
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem to fill needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


def test_a_state_that_does_not_fit_is_an_oserror_and_leaves_no_file(tmp_path: Path) -> None:
    """torch's zip writer reports a disk that fills while it finishes the archive as a
    RuntimeError; checkpoints and rank states are written as one buffer, so the full disk
    reaches the engine as the OSError it turns into one line (found by CI: a checkpoint
    grown by its artefact record filled the disk at exactly that point)."""
    from hpcdeconv.training.checkpoint import save_state

    disk = tmp_path / "disk"
    _mount_tmpfs(disk, 64 * 1024)
    state = {"weights": torch.rand(30_000)}  # 120 kB
    try:
        with pytest.raises(RuntimeError, match="unexpected pos"):
            torch.save(state, disk / "plain.pt")
        (disk / "plain.pt").unlink(missing_ok=True)
        with pytest.raises(OSError) as caught:
            save_state(disk / "state.pt", state)
        assert caught.value.errno == errno.ENOSPC
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_full_disk_at_checkpoint_time_keeps_the_previous_checkpoint(
    tiny_dataset: Path, tmp_path: Path, launch_env: dict[str, str]
) -> None:
    env = _env(launch_env)
    cli = ["-m", "hpcdeconv.cli"]
    extra = ("train.keep_checkpoints=1", "train.image_every=1000")
    # Size of a run after its first checkpoint, measured on a normal disk.
    probe = tmp_path / "probe"
    proc = _torchrun([*cli, *_args(tiny_dataset, probe, "train.steps=2", *extra)], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    used = sum(p.stat().st_size for p in probe.rglob("*") if p.is_file())
    first = (probe / "checkpoints" / "step_00000002.pt").stat().st_size
    # Room for that, but not for the second (larger: fuller pools) checkpoint beside it.
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, used + first // 2)
    try:
        run = disk / "run"
        proc = _torchrun([*cli, *_args(tiny_dataset, run, "train.steps=6", *extra)], env)
        assert proc.returncode != 0
        lines = _error_lines(proc.stderr)
        assert len(lines) == 2 and lines[0] == lines[1], proc.stderr[-3000:]
        assert "could not write the checkpoint of step 4 (No space left on device" in lines[0]
        assert f"last good checkpoint: {run / 'checkpoints' / 'step_00000002.pt'}" in lines[0]
        assert str(REPO / "hpcdeconv") not in proc.stderr  # no traceback of ours
        assert latest_checkpoint(run).name == "step_00000002.pt"
        assert load_checkpoint(run)["step"] == 2
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_second_train_on_a_running_run_directory_is_refused(
    tiny_dataset: Path, tmp_path: Path, launch_env: dict[str, str]
) -> None:
    """A job submitted twice: the second ``--auto-resume`` must not resume under the first."""
    run = tmp_path / "run"
    single = ["strategy.name=single", "train.steps=12", "train.ckpt_every=2"]
    argv = [sys.executable, "-m", "hpcdeconv.cli", *_args(tiny_dataset, run, *single)]
    first = subprocess.Popen(
        [*argv, "--auto-resume"], env=_env(launch_env), stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 240
        while latest_checkpoint(run) is None and time.monotonic() < deadline:
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.05)
        # Held still (alive, lock held) while the second is tried, whatever the machine's speed.
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run(
            [*argv, "--auto-resume"], env=_env(launch_env), capture_output=True, text=True
        )
    finally:
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=300)
    assert second.returncode == 2
    line = second.stderr.strip().splitlines()[-1]
    assert line.startswith(f"hpcdeconv train: error: {run} is being written by hpcdeconv train")
    assert f"PID {first.pid}" in line
    assert first.returncode == 0, err[-3000:]
    steps = [r["step"] for r in read_metrics(run, "train")]
    assert steps == list(range(1, 13))  # every step logged once, by the first run
