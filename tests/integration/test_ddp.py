"""The DDP strategy under torchrun: gradients, identical ranks, global-batch equivalence, and
the launch errors a user can meet.

Two ranks of batch ``b`` must take exactly the step one process takes with batch ``2 b``: the
sampler gives rank ``r`` the samples a single process draws at global indices ``2 i + r``,
losses are batch means and DDP averages the gradients. That is exact for the supervised
method (MSE, deterministic); the cycleGANs keep per-rank history pools and draw per-rank
WGAN-GP interpolates, so for them the checks are on gradients of one step and on ranks
staying identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpcdeconv.config import ExperimentConfig, load_config
from hpcdeconv.errors import ConfigError
from hpcdeconv.training.checkpoint import load_checkpoint
from hpcdeconv.training.launch import build_strategy
from hpcdeconv.training.runlog import read_metrics
from hpcdeconv.training.strategy import SingleStrategy
from tests.conftest import TINY_TRAINING

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = str(REPO / "launch" / "torchrun.sh")
HPCDECONV = [sys.executable, "-m", "hpcdeconv.cli"]
BLIND_STEPS = 8
# What a launcher tells its processes; the module-scoped fixture below cannot use the
# function-scoped ``launch_env`` fixture, so it strips them itself.
_LAUNCHER = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_LAUNCHER_PREFIXES = ("SLURM_", "SLURMD_", "PMI_", "PMIX_", "OMPI_", "TORCHELASTIC_", "MPI_")

# Runs under torchrun: (1) checks DDPStrategy.wrap and one G-step / WGAN-GP D-step against
# the same computation without DDP, (2) trains with the Trainer and dumps this rank's groups.
WORKER = r'''
import copy, json, sys
from pathlib import Path

import torch
import torch.distributed as tdist

from hpcdeconv.config import DiscriminatorConfig, ExperimentConfig, UNetConfig, load_config
from hpcdeconv.losses.adversarial import WGANGP
from hpcdeconv.losses.cycle import cycle_loss
from hpcdeconv.methods.cycle import CycleGenerators, DomainDiscriminators
from hpcdeconv.models.factory import build_discriminator, build_generator
from hpcdeconv.models.psf_layer import PSFLayer
from hpcdeconv.training.engine import Trainer
from hpcdeconv.training.launch import build_strategy


def gathered(t):
    out = [torch.empty_like(t) for _ in range(tdist.get_world_size())]
    tdist.all_gather(out, t.detach().contiguous())
    return out


def same_as_rank0(module):
    return all(
        all(torch.equal(g, gathered(p)[0]) for g in gathered(p))
        for p in [*module.parameters(), *module.buffers()]
    )


def grad_error(ddp_module, ref_module):
    """Max |DDP grad - mean over ranks of the local grads| and max |grad|."""
    err, scale = 0.0, 0.0
    for p, q in zip(ddp_module.parameters(), ref_module.parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None
            continue
        mean = torch.stack(gathered(q.grad)).mean(0)
        err = max(err, float((p.grad - mean).abs().max()))
        scale = max(scale, float(mean.abs().max()))
    return err, scale


def g_loss(gens, discs, x, y):
    out = gens(x, y)
    adv = sum(discs.adversarial.generator_loss(d(f)) for d, f in
              zip(discs.discs.values(), (out.x_fake, out.y_fake)))
    return out, adv + 10.0 * cycle_loss(x, out.x_rec, y, out.y_rec)


def checks(strategy, cfg, report_dir):
    rank = strategy.rank
    torch.manual_seed(100 + rank)  # rank-dependent initialisation on purpose
    unet = build_generator(UNetConfig(channels=4, depth=2), spatial_dims=3, in_channels=1,
                           out_channels=1)
    gens = CycleGenerators(unet,
                           PSFLayer((5, 5, 5), init="gaussian", sigma=1.0))
    discs = DomainDiscriminators(
        WGANGP(10.0),
        x=build_discriminator(DiscriminatorConfig(channels=4, n_layers=2, n_scales=2),
                              spatial_dims=3, in_channels=1),
        y=build_discriminator(DiscriminatorConfig(channels=4, n_layers=2, n_scales=2),
                              spatial_dims=3, in_channels=1),
    )
    fixed = PSFLayer((5, 5, 5), init=torch.rand(5, 5, 5).numpy(), learnable=False)
    G = strategy.wrap(gens, cfg.optim, 10, name="G")
    D = strategy.wrap(discs, cfg.optim, 10, name="D")
    F = strategy.wrap(fixed, cfg.optim, 10, name="fixed")
    report = {
        "rank": rank,
        "wrapped": type(G.wrapped).__name__,
        "init_equal": same_as_rank0(gens) and same_as_rank0(discs),
        "frozen_type": type(F).__name__,
        "frozen_equal": same_as_rank0(fixed),
    }
    ref_g, ref_d = copy.deepcopy(gens), copy.deepcopy(discs)
    torch.manual_seed(rank)
    x, y = torch.rand(2, 1, 16, 16, 16), torch.rand(2, 1, 16, 16, 16)
    # G-step: frozen discriminators called unwrapped, gradients through them into G.
    with D.frozen():
        out = G(x, y)
        fakes = {"x": out.x_fake, "y": out.y_fake}
        adv = sum(D.module.adversarial.generator_loss(d(fakes[n]))
                  for n, d in D.module.discs.items())
        G.backward(adv + 10.0 * cycle_loss(x, out.x_rec, y, out.y_rec))
    for p in ref_d.parameters():
        p.requires_grad_(False)
    ref_out, ref_loss = g_loss(ref_g, ref_d, x, y)
    ref_loss.backward()
    for p in ref_d.parameters():
        p.requires_grad_(True)
    report["g_err"], report["g_scale"] = grad_error(gens, ref_g)
    report["d_untouched"] = all(p.grad is None for p in discs.parameters())
    # D-step with WGAN-GP: a double backward inside the DDP forward.
    reals = {"x": x, "y": y}
    torch.manual_seed(1000 + rank)
    D.backward(D(reals, {k: v.detach() for k, v in fakes.items()}))
    torch.manual_seed(1000 + rank)
    ref_d(reals, {"x": ref_out.x_fake.detach(), "y": ref_out.y_fake.detach()}).backward()
    report["d_err"], report["d_scale"] = grad_error(discs, ref_d)
    (report_dir / f"report{rank}.json").write_text(json.dumps(report))


def main():
    out = Path(sys.argv[1])
    cfg = load_config(ExperimentConfig, None, sys.argv[2:])
    strategy = build_strategy(cfg)
    try:
        checks(strategy, cfg, out)
        trainer = Trainer(cfg, strategy, progress=False)
        trainer.fit()
        groups = {n: t.module.state_dict() for n, t in trainer.trainables.items()}
        torch.save(groups, out / f"rank{strategy.rank}.pt")
    finally:
        strategy.close()


main()
'''


def _overrides(data: Path, run: Path, *extra: str) -> list[str]:
    return [
        *TINY_TRAINING,
        f"data.path={data}",
        f"output={run}",
        "train.ckpt_every=1000",
        # PyTorch's head: a start at the data's mean leaves the cycle loss too little to
        # lose in 8 steps, and so many near-zero gradients that Adam's rounding-sized
        # steps (see below) are no longer "a handful".
        "method.generator.head_init=default",
        *extra,
    ]


def _cli_args(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def _run(command: list[str], env: dict[str, str], timeout: float = 240) -> str:
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{command[:4]} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def _train_losses(run: Path, key: str) -> list[float]:
    return [record[key] for record in read_metrics(run, "train")]


@pytest.fixture(scope="module")
def blind_ddp(
    tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[dict]]:
    """One torchrun launch: the wrap/gradient checks, then a 2-rank blind cycleGAN run."""
    root = tmp_path_factory.mktemp("blind_ddp")
    (root / "worker.py").write_text(WORKER)
    run = root / "run"
    overrides = _overrides(
        tiny_dataset,
        run,
        "method.kernel.size=[7, 7, 7]",
        "strategy.name=ddp",
        f"train.steps={BLIND_STEPS}",
        "optim.lr=1e-3",
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _LAUNCHER and not k.startswith(_LAUNCHER_PREFIXES)
    } | {"OMP_NUM_THREADS": "1"}
    _run([TORCHRUN, "2", "--", sys.executable, str(root / "worker.py"), str(root), *overrides], env)
    return run, [json.loads((root / f"report{r}.json").read_text()) for r in (0, 1)]


def test_ddp_wraps_broadcasts_and_averages_gradients(blind_ddp: tuple[Path, list[dict]]) -> None:
    _, reports = blind_ddp
    assert [r["rank"] for r in reports] == [0, 1]
    for r in reports:
        assert r["wrapped"] == "DistributedDataParallel"
        # Rank-dependent initialisations are replaced by rank 0's when wrapping.
        assert r["init_equal"] and r["frozen_equal"]
        assert r["frozen_type"] == "FrozenTrainable"
        # G-step through frozen, unwrapped discriminators: DDP's gradient is the mean of
        # the ranks' local gradients, and no discriminator parameter receives one.
        assert r["g_scale"] > 0 and r["g_err"] <= 1e-5 * r["g_scale"]
        assert r["d_untouched"]
        # WGAN-GP (double backward inside the DDP forward) averages correctly too.
        assert r["d_scale"] > 0 and r["d_err"] <= 1e-5 * r["d_scale"]


def test_ddp_blind_cyclegan_trains_with_identical_ranks(
    blind_ddp: tuple[Path, list[dict]],
) -> None:
    run, _ = blind_ddp
    for key in ("loss_g", "cycle"):
        losses = _train_losses(run, key)
        assert len(losses) == BLIND_STEPS
        assert sum(losses[-3:]) < sum(losses[:3]), (key, losses)
    ranks = [torch.load(run.parent / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert set(ranks[0]) == {"G", "D"}
    for group in ranks[0]:
        for name, tensor in ranks[0][group].items():
            assert torch.equal(tensor, ranks[1][group][name]), (group, name)
    final = load_checkpoint(run)
    assert final["step"] == BLIND_STEPS
    for name, tensor in final["deblur"].items():
        assert torch.equal(tensor, ranks[0]["G"][f"deblur.{name}"])


def test_two_ranks_take_the_single_process_step_of_the_global_batch(
    tiny_dataset: Path, tmp_path: Path, launch_env: dict[str, str]
) -> None:
    steps = ["method.name=supervised", "train.steps=4", "optim.lr=1e-3"]
    steps += ["train.ckpt_every=1", "train.keep_checkpoints=4"]
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    two = _overrides(tiny_dataset, ddp, *steps, "strategy.name=ddp", "data.batch_size=1")
    out = _run([TORCHRUN, "2", "--", *HPCDECONV, "train", *_cli_args(two)], launch_env)
    assert out.count("trained supervised for 4 steps") == 1  # rank 0 reports, alone
    # The reference asks for ddp too: in a world of one it warns and trains single-process.
    one = _overrides(tiny_dataset, single, *steps, "strategy.name=ddp", "data.batch_size=2")
    out = _run([*HPCDECONV, "train", *_cli_args(one)], launch_env)
    assert "strategy ddp in a world of one process: training single-process" in out
    assert "joined the gloo process group" not in out

    mse_ddp, mse_single = _train_losses(ddp, "mse"), _train_losses(single, "mse")
    assert mse_ddp == pytest.approx(mse_single, rel=1e-6)
    flat = [_flat_deblur(run) for run in (ddp, single)]
    early = _flat_deblur(single / "checkpoints" / "step_00000001.pt")
    # Adam divides by sqrt(v) + 1e-8, so the few weights whose gradient is ~0 in exact
    # arithmetic take rounding-sized gradients of either sign (the batch is summed in
    # another order): a handful of weights differ by ~1e-5. All others agree to 1e-6, and
    # the difference is tiny next to how far three steps moved the weights.
    differ = flat[0] - flat[1]
    assert float((differ.abs() <= 1e-6).float().mean()) > 0.999
    assert float(differ.norm()) < 1e-3 * float((flat[1] - early).norm())


def _flat_deblur(path: Path) -> torch.Tensor:
    return torch.cat([v.flatten() for v in load_checkpoint(path)["deblur"].values()])


def _config(tmp_path: Path, *extra: str) -> ExperimentConfig:
    return load_config(ExperimentConfig, None, [f"output={tmp_path}", "train.device=cpu", *extra])


# MASTER_PORT=1 cannot be joined: reaching the rendezvous would be a RendezvousError.
_TWO_RANKS = {
    "RANK": "0",
    "WORLD_SIZE": "2",
    "LOCAL_RANK": "0",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "1",
}


def test_a_group_without_trainable_parameters_is_frozen_not_optimised() -> None:
    from hpcdeconv.config import OptimConfig
    from hpcdeconv.models.psf_layer import PSFLayer

    layer = PSFLayer((3, 3, 3), init="gaussian", sigma=1.0, learnable=False)
    before = layer.weight.detach().clone()
    group = SingleStrategy(torch.device("cpu"), "fp32").wrap(layer, OptimConfig(), 10, name="h")
    assert type(group).__name__ == "FrozenTrainable"
    x = torch.rand(1, 1, 4, 4, 4, requires_grad=True)
    group.backward(group(x).sum())
    group.step()
    assert x.grad is not None and torch.equal(layer.weight, before)
    group.load_state_dict({"module": {"weight": torch.ones(3, 3, 3)}})
    assert torch.equal(group.state_dict()["module"]["weight"], torch.ones(3, 3, 3))


def test_ddp_in_a_world_of_one_is_single(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="hpcdeconv.training.launch"):
        strategy = build_strategy(_config(tmp_path, "strategy.name=ddp"), env={})
    assert type(strategy) is SingleStrategy
    assert (strategy.rank, strategy.world_size) == (0, 1)
    assert "world of one process" in caplog.text
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["strategy.name=single"], "2 processes were launched"),
        (["strategy.name=ddp", "strategy.backend=nccl"], "nccl needs train.device cuda"),
        (
            ["strategy.name=deepspeed", "strategy.deepspeed.extra={optimizer: {type: SGD}}"],
            "extra.optimizer.type contradicts",
        ),
    ],
)
def test_bad_launch_settings_fail_before_the_rendezvous(
    tmp_path: Path, extra: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        build_strategy(_config(tmp_path, *extra), env=_TWO_RANKS)
    assert not torch.distributed.is_initialized()
