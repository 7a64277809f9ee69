"""The DeepSpeed strategy: the JSON built from the YAML, and 2-rank ZeRO-1/ZeRO-2 training
through ``launch/torchrun.sh 2 -- hpcdeconv train`` that checkpoints, resumes and then
matches the uninterrupted run step for step.

DeepSpeed JIT-compiles a communication op on its first use (minutes on 2 busy cores); it is
cached in ``TORCH_EXTENSIONS_DIR``, which these tests point at
``~/.cache/hpcdeconv/torch_extensions`` unless it is set, so only the first run pays.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from hpcdeconv.config import DeepSpeedConfig, ExperimentConfig, load_config
from hpcdeconv.errors import ConfigError
from hpcdeconv.training.checkpoint import load_checkpoint
from hpcdeconv.training.deepspeed_strategy import deepspeed_config
from hpcdeconv.training.launch import build_strategy
from hpcdeconv.training.runlog import read_metrics
from hpcdeconv.training.strategy import linear_decay
from tests.conftest import TINY_TRAINING

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = str(REPO / "launch" / "torchrun.sh")
EXTENSIONS = Path.home() / ".cache" / "hpcdeconv" / "torch_extensions"
STEPS, STOP, LR, DECAY_START = 6, 3, 1e-3, 2


def test_json_is_built_from_the_yaml_and_extra_adds_to_it() -> None:
    ds = DeepSpeedConfig(
        zero_stage=2,
        extra={
            "zero_optimization.overlap_comm": True,
            "gradient_clipping": 1.0,
            "torch_autocast.enabled": True,  # agrees with train.precision: accepted
        },
    )
    config = deepspeed_config(ds, "bf16", micro_batch=3, world_size=4)
    assert config["train_batch_size"] == 12
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == 1
    assert config["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    # Mixed precision is torch autocast inside the engine, weights stay fp32.
    assert config["torch_autocast"] == {
        "enabled": True,
        "dtype": "bfloat16",
        "lower_precision_safe_modules": [],
    }
    assert config["gradient_clipping"] == 1.0
    for absent in ("optimizer", "scheduler", "fp16", "bf16"):
        assert absent not in config
    fp16 = deepspeed_config(DeepSpeedConfig(zero_stage=1), "fp16", micro_batch=1, world_size=2)
    assert fp16["torch_autocast"]["dtype"] == "float16" and "fp16" not in fp16
    fp32 = deepspeed_config(DeepSpeedConfig(zero_stage=1), "fp32", micro_batch=1, world_size=2)
    assert "bf16" not in fp32 and "fp16" not in fp32 and "torch_autocast" not in fp32
    assert fp32["zero_optimization"] == {"stage": 1}


@pytest.mark.parametrize(
    ("precision", "extra", "message"),
    [
        ("fp32", {"bf16": {"enabled": True}}, r"extra\.bf16\.enabled=True contradicts train"),
        ("bf16", {"fp16.enabled": True}, r"extra\.fp16\.enabled=True contradicts train"),
        ("bf16", {"bf16": True}, r"extra\.bf16=True contradicts the YAML"),
        # DeepSpeed's half-precision weights break CUDA autocast inside the engine.
        ("bf16", {"bf16": {"enabled": True}}, r"extra\.bf16\.enabled=True contradicts train"),
        ("fp16", {"torch_autocast.dtype": "bfloat16"}, r"torch_autocast\.dtype='bfloat16'"),
        ("fp32", {"torch_autocast": {"enabled": True}}, r"extra\.torch_autocast\.enabled"),
        ("fp32", {"train_batch_size": 8}, r"extra\.train_batch_size=8 contradicts data"),
        ("fp32", {"train_micro_batch_size_per_gpu": 2}, r"micro_batch_size_per_gpu=2"),
        ("fp32", {"gradient_accumulation_steps": 4}, r"extra\.gradient_accumulation_steps=4"),
        ("fp32", {"zero_optimization": {"stage": 2}}, r"stage=2 contradicts strategy"),
        ("fp32", {"optimizer": {"type": "AdamW"}}, r"extra\.optimizer\.type contradicts the"),
        ("fp32", {"scheduler.type": "WarmupLR"}, r"scheduler comes from optim\.decay_start"),
    ],
)
def test_extra_keys_that_contradict_the_yaml_are_config_errors(
    precision: str, extra: dict[str, Any], message: str
) -> None:
    ds = DeepSpeedConfig(zero_stage=1, extra=extra)
    with pytest.raises(ConfigError, match=message) as info:
        deepspeed_config(ds, precision, micro_batch=1, world_size=2)
    assert "\n" not in str(info.value)


def test_zero_stage_3_is_refused_before_any_rendezvous(tmp_path: Path) -> None:
    cfg = load_config(
        ExperimentConfig,
        None,
        [f"output={tmp_path}", "strategy.name=deepspeed", "strategy.deepspeed.zero_stage=3"],
    )
    # MASTER_PORT=1 cannot be joined: reaching the rendezvous would be a RendezvousError.
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1"}
    with pytest.raises(ConfigError, match="zero_stage 3 is not supported"):
        build_strategy(cfg, env=env | {"MASTER_PORT": "1"})
    assert not torch.distributed.is_initialized()


def _train(
    data: Path, run: Path, stage: int, precision: str, env: dict[str, str], *extra: str
) -> None:
    overrides = [
        *TINY_TRAINING,
        f"data.path={data}",
        f"output={run}",
        "method.kernel.size=[7, 7, 7]",
        # No history pool: after a resume every rank holds rank 0's pool, so an exact
        # comparison with the uninterrupted run needs a pool-free (deterministic) method.
        "method.loss.pool_size=0",
        f"train.steps={STEPS}",
        f"train.ckpt_every={STOP}",
        "train.keep_checkpoints=10",
        f"train.precision={precision}",
        f"optim.lr={LR}",
        f"optim.decay_start={DECAY_START}",
        "strategy.name=deepspeed",
        f"strategy.deepspeed.zero_stage={stage}",
    ]
    command = [TORCHRUN, "2", "--", sys.executable, "-m", "hpcdeconv.cli", "train"]
    command += [arg for item in overrides for arg in ("--set", item)]
    proc = subprocess.run([*command, *extra], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"train exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    assert proc.stdout.count(f"trained blind_cyclegan for {STEPS} steps") == 1


def _metrics(run: Path) -> dict[int, dict[str, float]]:
    """Logged training values by step (losses averaged over the ranks, and the lr)."""
    return {
        r["step"]: {k: v for k, v in r.items() if k not in ("step", "kind")}
        for r in read_metrics(run, "train")
    }


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(("stage", "precision"), [(1, "fp32"), (2, "bf16")])
def test_zero_trains_checkpoints_and_resumes_like_the_uninterrupted_run(
    tiny_dataset: Path,
    tmp_path: Path,
    launch_env: dict[str, str],
    stage: int,
    precision: str,
) -> None:
    env = {"TORCH_EXTENSIONS_DIR": str(EXTENSIONS)} | launch_env
    whole = tmp_path / "whole"
    _train(tiny_dataset, whole, stage, precision, env)

    state = load_checkpoint(whole)
    assert state["step"] == STEPS
    shards = whole / "checkpoints" / "deepspeed"
    for group in ("G", "D"):
        assert state["groups"][group] == {"deepspeed": {"tag": "step_00000006", "group": group}}
        # ZeRO partitions the optimiser state: one file per rank.
        parts = sorted(p.name for p in (shards / "step_00000006" / group).iterdir())
        assert [p for p in parts if "zero_pp_rank_" in p] == [
            f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)
        ]
    assert sorted(p.name for p in shards.iterdir()) == ["step_00000003", "step_00000006"]
    metrics = _metrics(whole)
    factor = linear_decay(STEPS, DECAY_START)
    assert [metrics[k]["lr"] for k in range(1, STEPS + 1)] == pytest.approx(
        [LR * factor(k) for k in range(1, STEPS + 1)]
    )

    # The state a run killed between the checkpoints of steps 3 and 6 leaves behind.
    broken = tmp_path / "broken"
    shutil.copytree(whole, broken)
    (broken / "checkpoints" / "step_00000006.pt").unlink()
    shutil.rmtree(broken / "checkpoints" / "deepspeed" / "step_00000006")
    (broken / "metrics.jsonl").unlink()
    # Shards of a save that died before rank 0 wrote its checkpoint: nothing refers to them.
    (broken / "checkpoints" / "deepspeed" / "step_00000005").mkdir()
    _train(tiny_dataset, broken, stage, precision, env, "--resume")
    kept = sorted(p.name for p in (broken / "checkpoints" / "deepspeed").iterdir())
    assert kept == ["step_00000003", "step_00000006"]

    resumed = _metrics(broken)
    assert sorted(resumed) == list(range(STOP + 1, STEPS + 1))
    for step in resumed:
        assert resumed[step] == pytest.approx(metrics[step], rel=1e-6, abs=1e-7), step
    a, b = load_checkpoint(whole)["deblur"], load_checkpoint(broken)["deblur"]
    # bf16 is autocast inside the engine: the weights stay fp32 (DeepSpeed's own bf16 mode
    # would hold them in bf16 and, on CUDA, switch autocast off inside the engine).
    assert {t.dtype for t in a.values() if t.is_floating_point()} == {torch.float32}
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7)


_TWO_TRAININGS = """
import sys
import torch.distributed as dist
from hpcdeconv.config import ExperimentConfig, load_config
from hpcdeconv.training.engine import train
for i in range(2):
    cfg = load_config(ExperimentConfig, None, [*sys.argv[2:], f"output={sys.argv[1]}/run{i}"])
    summary = train(cfg, progress=False)
    print("trained", summary.steps, "group left:", not dist.is_initialized())
"""


@pytest.mark.distributed
def test_train_leaves_the_process_group_it_joined(
    tiny_dataset: Path, tmp_path: Path, launch_env: dict[str, str]
) -> None:
    """A sweep worker trains its trials one after the other in one process: ``train()``
    closes the strategy it built, so the second DeepSpeed run can join a group again
    (it failed with "process group already initialised")."""
    overrides = [
        *TINY_TRAINING,
        "method.name=supervised",
        f"data.path={tiny_dataset}",
        "train.steps=2",
        "strategy.name=deepspeed",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", _TWO_TRAININGS, str(tmp_path), *overrides],
        env=launch_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained 2 group left: True") == 2, proc.stdout
