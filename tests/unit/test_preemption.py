"""Stop signals: StopRequest records them, training checkpoints and stops on SIGUSR1 and
``--auto-resume`` finishes the run; ``requeue_slurm_job`` asks scontrol for the right job."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpcdeconv.cli import main as cli_main
from hpcdeconv.training.checkpoint import list_checkpoints, load_checkpoint
from hpcdeconv.training.preemption import StopRequest, requeue_slurm_job
from hpcdeconv.training.runlog import read_metrics
from tests.conftest import TINY_TRAINING

STEPS = 10


@pytest.fixture
def harmless_usr1() -> Iterator[list[int]]:
    """A SIGUSR1 handler of the test's own, so a signal arriving outside StopRequest's
    lifetime is recorded here instead of killing pytest; restored afterwards."""
    seen: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    yield seen
    signal.signal(signal.SIGUSR1, previous)


@pytest.fixture
def outside_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SLURM job variables: a stop must not requeue the job running pytest."""
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)


def test_stop_request_records_own_sigusr1(harmless_usr1: list[int]) -> None:
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopRequest().install()
    try:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested
        assert stop.signum == signal.SIGUSR1
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is before
    assert harmless_usr1 == [], "the signal reached the previous handler too"


def test_stop_request_keeps_the_first_signal(harmless_usr1: list[int]) -> None:
    stop = StopRequest().install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
    finally:
        stop.uninstall()
    assert stop.signum == signal.SIGTERM


def test_stop_request_outside_main_thread_installs_nothing() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    stops: list[StopRequest] = []
    worker = threading.Thread(target=lambda: stops.append(StopRequest().install()))
    worker.start()
    worker.join()
    assert signal.getsignal(signal.SIGUSR1) is before
    stops[0].uninstall()
    assert signal.getsignal(signal.SIGUSR1) is before


def _fake_scontrol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: int) -> Path:
    """Put an ``scontrol`` first on PATH that records its arguments and exits ``status``."""
    calls = tmp_path / "calls"
    exe = tmp_path / "bin" / "scontrol"
    exe.parent.mkdir()
    exe.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\nexit {status}\n')
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{exe.parent}{os.pathsep}{os.environ['PATH']}")
    return calls


def test_requeue_without_slurm_returns_false(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _fake_scontrol(tmp_path, monkeypatch, status=0)
    assert requeue_slurm_job({}) is False
    assert not calls.exists(), "scontrol was run outside a SLURM job"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"SLURM_JOB_ID": "42"}, "requeue 42"),
        (
            {"SLURM_JOB_ID": "45", "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "5"},
            "requeue 40_5",
        ),
    ],
)
def test_requeue_names_the_job(
    env: dict[str, str], expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _fake_scontrol(tmp_path, monkeypatch, status=0)
    assert requeue_slurm_job(env) is True
    assert calls.read_text().splitlines() == [expected]


def test_requeue_refused_returns_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_scontrol(tmp_path, monkeypatch, status=1)
    assert requeue_slurm_job({"SLURM_JOB_ID": "42"}) is False
    assert calls.read_text().splitlines() == ["requeue 42"]


def _train_argv(data: Path, run: Path, *extra: str) -> list[str]:
    argv = ["train", "--output", str(run)]
    for item in [
        # Supervised: the cheapest method to build and step, and it exports nothing.
        "method.name=supervised",
        *TINY_TRAINING,
        f"data.path={data}",
        f"train.steps={STEPS}",
        # Only the stop and the final step write checkpoints, so each one is attributable.
        "train.ckpt_every=1000",
        "train.image_every=1000",
        "train.keep_checkpoints=10",
    ]:
        argv += ["--set", item]
    return [*argv, *extra]


def _signal_after_step(run: Path, step: int, timeout: float = 120.0) -> threading.Thread:
    """Send SIGUSR1 to this process once ``metrics.jsonl`` records ``step``."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            logged = [r["step"] for r in read_metrics(run, "train")] if run.is_dir() else []
            if logged and max(logged) >= step:
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher


@pytest.mark.usefixtures("outside_slurm")
def test_sigusr1_checkpoints_then_auto_resume_finishes(
    tiny_dataset: Path,
    tmp_path: Path,
    harmless_usr1: list[int],
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run"
    watcher = _signal_after_step(run, 2)
    assert cli_main(_train_argv(tiny_dataset, run, "--auto-resume")) == 0
    watcher.join()
    out = capsys.readouterr().out
    assert harmless_usr1 == [], "SIGUSR1 arrived after the training loop had ended"
    assert "stopped by signal after step" in out, out
    stopped = int(out.split("stopped by signal after step ")[1].split(";")[0])
    assert 2 <= stopped < STEPS
    # The checkpoint is the state after the last completed step: nothing is lost.
    assert [p.name for p in list_checkpoints(run)] == [f"step_{stopped:08d}.pt"]
    assert load_checkpoint(run)["step"] == stopped
    assert [r["step"] for r in read_metrics(run, "train")] == list(range(1, stopped + 1))

    assert cli_main(_train_argv(tiny_dataset, run, "--auto-resume")) == 0
    assert f"trained supervised for {STEPS} steps" in capsys.readouterr().out
    assert [p.name for p in list_checkpoints(run)] == [
        f"step_{stopped:08d}.pt",
        f"step_{STEPS:08d}.pt",
    ]
    assert load_checkpoint(run)["step"] == STEPS
    # Every step trained exactly once across the two runs.
    assert [r["step"] for r in read_metrics(run, "train")] == list(range(1, STEPS + 1))


def test_only_usr1_and_usr2_ask_for_a_requeue() -> None:
    """scancel (SIGTERM) stops after a checkpoint; the time-limit warnings (USR1: our batch
    scripts, USR2: submitit's) requeue."""
    stop = StopRequest()
    assert stop.level == 0
    stop._handle(signal.SIGTERM, None)
    assert stop.level == 1
    usr1 = StopRequest()
    usr1._handle(signal.SIGUSR1, None)
    assert usr1.level == 2
    usr2 = StopRequest()
    usr2._handle(signal.SIGUSR2, None)
    assert usr2.level == 2


@pytest.fixture
def usr2_owner() -> Iterator[list[int]]:
    """A SIGUSR2 handler standing where submitit's checkpoint-and-requeue handler stands:
    installed before training; records each call."""
    calls: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    yield calls
    signal.signal(signal.SIGUSR2, previous)


@pytest.mark.parametrize("owner", ["trainer", "submitit", "none"])
def test_exactly_the_configured_owner_requeues(
    owner: str,
    tiny_dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    usr2_owner: list[int],
) -> None:
    """SIGUSR2 during training: the trainer checkpoints, then exactly one of scontrol
    (trainer), the handler installed before the trainer's (submitit) or nobody requeues."""
    from hpcdeconv.config import ExperimentConfig, load_config
    from hpcdeconv.training.engine import train

    calls = _fake_scontrol(tmp_path, monkeypatch, status=0)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    for name in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    run = tmp_path / "run"
    overrides = [
        *_train_argv(tiny_dataset, run)[4::2],
        f"output={run}",
        f"train.requeue={owner}",
        "train.val_every=2",
        "train.val_crop=[16, 16, 16]",
    ]
    cfg = load_config(ExperimentConfig, None, overrides)

    def signal_at_first_validation(step: int, scores: object) -> bool:
        # Delivered now, in the main thread: the next step's agreement sees it.
        if step == 2:
            os.kill(os.getpid(), signal.SIGUSR2)
        return False

    summary = train(cfg, progress=False, on_validation=signal_at_first_validation)
    assert summary.stopped_at == 3
    assert load_checkpoint(run)["step"] == 3
    scontrol = calls.read_text().splitlines() if calls.exists() else []
    assert scontrol == (["requeue 77"] if owner == "trainer" else [])
    assert usr2_owner == ([signal.SIGUSR2] if owner == "submitit" else [])


def test_validation_hook_stops_the_run_after_a_checkpoint(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    """A sweep's pruner: the hook sees each validation on rank 0; True ends the run there."""
    from hpcdeconv.config import ExperimentConfig, load_config
    from hpcdeconv.training.engine import train

    run = tmp_path / "run"
    overrides = [
        *_train_argv(tiny_dataset, run)[4::2],
        f"output={run}",
        "train.val_every=2",
        "train.val_crop=[16, 16, 16]",
    ]
    seen: list[tuple[int, float]] = []

    def prune_at_four(step: int, scores: dict[str, float]) -> bool:
        seen.append((step, scores["psnr"]))
        return step == 4

    summary = train(
        load_config(ExperimentConfig, None, overrides), progress=False, on_validation=prune_at_four
    )
    assert summary.pruned_at == 4 and summary.stopped_at is None
    assert [step for step, _ in seen] == [2, 4]
    assert all(psnr == psnr for _, psnr in seen)  # real scores, not NaN
    assert load_checkpoint(run)["step"] == 4
    assert [r["step"] for r in read_metrics(run, "train")] == [1, 2, 3, 4]
