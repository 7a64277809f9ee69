"""One real optimisation step of each cycleGAN (and the supervised baseline).

The step runs on groups wrapped as the engine wraps them (``SingleStrategy.wrap``: real
``LocalTrainable`` with Adam). Hooks on the optimisers snapshot the other group at the
moment each one steps, so the tests see what the G step did to D and the D step to G.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from hpcdeconv.config import (
    BlindCycleGANConfig,
    CycleGANConfig,
    DiscriminatorConfig,
    NonBlindCycleGANConfig,
    OptimConfig,
    SupervisedConfig,
    UNetConfig,
)
from hpcdeconv.errors import ConfigError
from hpcdeconv.losses.adversarial import LSGAN, WGANGP
from hpcdeconv.losses.cycle import identity_loss
from hpcdeconv.methods import build_method
from hpcdeconv.methods.base import DataInfo, Method
from hpcdeconv.methods.cycle import CycleGANMethod
from hpcdeconv.models.factory import generator_record
from hpcdeconv.training.strategy import LocalTrainable, SingleStrategy

UNET = UNetConfig(channels=4, depth=2)
DISC = DiscriminatorConfig(channels=4, n_layers=2, n_scales=2)
KERNEL = 5
#: Patch per dimensionality: small, and divisible by the U-Net's 2 down-samplings.
PATCH = {2: (24, 24), 3: (12, 16, 16)}


def method_config(name: str, dims: int, **loss: Any) -> Any:
    kernel = {"size": (KERNEL,) * dims}
    if name == "blind":
        return BlindCycleGANConfig(
            generator=UNET, discriminator=DISC, kernel=kernel, loss=loss or {}
        )
    if name == "nonblind":
        return NonBlindCycleGANConfig(
            generator=UNET, discriminator=DISC, kernel=kernel, loss=loss or {}
        )
    return CycleGANConfig(generator=UNET, blur_generator=UNET, discriminator=DISC, loss=loss or {})


def data_info(dims: int, channels: int) -> DataInfo:
    psf = np.random.default_rng(3).random((KERNEL,) * dims).astype(np.float32)
    return DataInfo(
        spatial_dims=dims,
        channels=channels,
        voxel_size=(0.1,) * dims,
        psf=psf / psf.sum(),
        means={"x": 0.2, "y": 0.3},
    )


def bound(cfg: Any, data: DataInfo) -> Method:
    """The method built and bound as the engine does it (single process, fp32, CPU)."""
    torch.manual_seed(0)
    method = build_method(cfg, data, seed=11, checkpointing=False)
    strategy = SingleStrategy(torch.device("cpu"), "fp32")
    method.bind(
        {
            name: strategy.wrap(group, OptimConfig(), 10, name=name)
            for name, group in method.groups().items()
        }
    )
    return method


def batch(dims: int, channels: int, size: int = 2) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(5)
    shape = (size, channels, *PATCH[dims])
    return {k: torch.rand(shape, generator=gen) for k in ("x", "y")}


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def differs(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return any(not torch.equal(a[key], b[key]) for key in a)


def cases() -> list[Any]:
    out = []
    for name in ("blind", "nonblind", "cyclegan"):
        for dims in (2, 3):
            for channels in (1, 3):
                out.append(pytest.param(name, dims, channels))
    return out


@pytest.mark.parametrize(("name", "dims", "channels"), cases())
def test_each_step_moves_only_its_own_group(name: str, dims: int, channels: int) -> None:
    method = bound(method_config(name, dims), data_info(dims, channels))
    assert isinstance(method, CycleGANMethod)
    G, D = method.t["G"], method.t["D"]
    assert isinstance(G, LocalTrainable) and isinstance(D, LocalTrainable)
    seen: dict[str, Any] = {"G_start": snapshot(G.module), "D_start": snapshot(D.module)}

    def at_g_step(*_: Any) -> None:
        seen["D_at_G_step"] = snapshot(D.module)
        seen["D_grads_at_G_step"] = [p.grad for p in D.module.parameters()]

    def after_g_step(*_: Any) -> None:
        seen["G_after_G_step"] = snapshot(G.module)

    def at_d_step(*_: Any) -> None:
        seen["G_at_D_step"] = snapshot(G.module)
        seen["G_grads_at_D_step"] = [p.grad for p in G.module.parameters()]

    G.optimizer.register_step_pre_hook(at_g_step)
    G.optimizer.register_step_post_hook(after_g_step)
    D.optimizer.register_step_pre_hook(at_d_step)

    losses = method.step(batch(dims, channels))

    # The G step: D untouched and given no gradient; G moved.
    assert_same(seen["D_at_G_step"], seen["D_start"])
    assert all(g is None for g in seen["D_grads_at_G_step"])
    assert differs(seen["G_after_G_step"], seen["G_start"])
    # The D step: G untouched and given no gradient (fakes detached); D moved.
    assert_same(seen["G_at_D_step"], seen["G_after_G_step"])
    assert all(g is None for g in seen["G_grads_at_D_step"])
    assert_same(snapshot(G.module), seen["G_after_G_step"])
    assert differs(snapshot(D.module), seen["D_start"])
    assert list(losses) == ["loss_g", "adv_g", "cycle", "loss_d"]
    assert all(v.ndim == 0 and torch.isfinite(v) and not v.requires_grad for v in losses.values())
    images = method.images()
    assert all(images[k].shape == PATCH[dims] for k in ("input", "output", "sharp"))


@pytest.mark.parametrize(("name", "dims", "channels"), cases())
def test_pools_receive_the_generators_fakes_detached(name: str, dims: int, channels: int) -> None:
    method = bound(method_config(name, dims), data_info(dims, channels))
    assert isinstance(method, CycleGANMethod)
    data = batch(dims, channels)
    # What the generators output for this batch, before the step changes them.
    with torch.no_grad():
        expected = copy.deepcopy(method.generators)(data["x"], data["y"])
    fakes = {"x": expected.x_fake, "y": expected.y_fake}
    received: dict[str, Tensor] = {}
    for domain, pool in method.pools.items():
        query = pool.query

        def recording(images: Tensor, domain: str = domain, query: Any = query) -> Tensor:
            received[domain] = images
            return query(images)

        pool.query = recording  # type: ignore[method-assign]

    method.step(data)

    judged = {"x", "y"} if name != "nonblind" else {"x"}
    assert received.keys() == judged
    for domain, images in received.items():
        assert images.grad_fn is None and not images.requires_grad
        torch.testing.assert_close(images, fakes[domain], rtol=0, atol=1e-6)
        # Filling, the pool keeps (and returns) every incoming fake.
        stored = torch.stack(method.pools[domain].images)
        torch.testing.assert_close(stored, fakes[domain], rtol=0, atol=1e-6)
        assert stored.shape == (2, channels, *PATCH[dims])


@pytest.mark.parametrize("dims", [2, 3])
def test_nonblind_has_no_blurred_domain_discriminator(dims: int) -> None:
    method = bound(method_config("nonblind", dims), data_info(dims, 1))
    assert isinstance(method, CycleGANMethod)
    assert set(method.discriminators.discs) == {"x"}
    assert set(method.pools) == {"x"}
    blind = bound(method_config("blind", dims), data_info(dims, 1))
    assert set(blind.discriminators.discs) == {"x", "y"}  # type: ignore[attr-defined]
    # The fixed PSF is the dataset's and has no optimiser.
    kernel = method.generators.blur.kernel()  # type: ignore[operator]
    np.testing.assert_allclose(kernel.detach().numpy(), method.data.psf, rtol=1e-6)
    assert not any(p.requires_grad for p in method.generators.blur.parameters())


def test_generator_loss_is_the_weighted_sum_of_its_terms() -> None:
    """Identity (both ways for a deep F) and a kernel penalty enter with their weights."""
    data = batch(3, 1)
    cyclegan = bound(method_config("cyclegan", 3, identity_weight=0.5), data_info(3, 1))
    assert isinstance(cyclegan, CycleGANMethod)
    with torch.no_grad():
        gens = copy.deepcopy(cyclegan.generators)
        want = identity_loss(data["x"], gens.deblur(data["x"])) + identity_loss(
            data["y"], gens.blur(data["y"])
        )
    losses = cyclegan.step(data)
    assert list(losses) == ["loss_g", "adv_g", "cycle", "loss_d", "identity"]
    torch.testing.assert_close(losses["identity"], want, rtol=1e-5, atol=0)
    total = losses["adv_g"] + 10.0 * losses["cycle"] + 0.5 * losses["identity"]
    torch.testing.assert_close(losses["loss_g"], total, rtol=1e-6, atol=0)

    blind_cfg = BlindCycleGANConfig(
        generator=UNET,
        discriminator=DISC,
        kernel={"size": (KERNEL,) * 3, "penalty": "tv", "penalty_weight": 0.1},
        loss={"identity_weight": 2.0, "cycle_weight": 3.0},
    )
    blind = bound(blind_cfg, data_info(3, 1))
    with torch.no_grad():
        gens = copy.deepcopy(blind.generators)  # type: ignore[attr-defined]
        want_id = identity_loss(data["x"], gens.deblur(data["x"]))  # no h ∗ y ≈ y term
        want_q = gens.blur.penalty("tv")
    losses = blind.step(data)
    assert list(losses) == ["loss_g", "adv_g", "cycle", "loss_d", "identity", "kernel_penalty"]
    torch.testing.assert_close(losses["identity"], want_id, rtol=1e-5, atol=0)
    torch.testing.assert_close(losses["kernel_penalty"], want_q, rtol=1e-5, atol=0)
    total = (
        losses["adv_g"]
        + 3.0 * losses["cycle"]
        + 2.0 * losses["identity"]
        + 0.1 * losses["kernel_penalty"]
    )
    torch.testing.assert_close(losses["loss_g"], total, rtol=1e-6, atol=0)


def test_identity_is_not_computed_at_weight_zero() -> None:
    method = bound(method_config("cyclegan", 3), data_info(3, 1))
    assert isinstance(method, CycleGANMethod)
    out = method.generators(*batch(3, 1).values())
    assert out.x_idt is None and out.y_idt is None


@pytest.mark.parametrize(("dims", "channels"), [(2, 3), (3, 1)])
def test_supervised_adversarial_loss_comes_from_the_config(dims: int, channels: int) -> None:
    default = bound(SupervisedConfig(generator=UNET, discriminator=DISC), data_info(dims, 1))
    assert isinstance(default.adversarial, LSGAN)  # type: ignore[attr-defined]
    assert set(default.groups()) == {"G"}
    cfg = SupervisedConfig(
        generator=UNET,
        discriminator=DISC,
        adversarial_weight=0.5,
        adversarial="wgan-gp",
        gp_eta=4.0,
    )
    method = bound(cfg, data_info(dims, channels))
    assert isinstance(method.adversarial, WGANGP) and method.adversarial.eta == 4.0  # type: ignore[attr-defined]
    D = method.t["D"]
    start = snapshot(D.module)
    losses = method.step(batch(dims, channels))
    assert differs(snapshot(D.module), start)
    torch.testing.assert_close(
        losses["loss_g"], losses["mse"] + 0.5 * losses["adv_g"], rtol=1e-6, atol=0
    )


@pytest.mark.parametrize(
    ("name", "dims", "channels"),
    [("cyclegan", 2, 3), ("blind", 3, 1), ("supervised", 2, 1), ("cyclegan", 3, 3)],
)
def test_artefact_is_the_deblurring_generator_with_its_record(
    name: str, dims: int, channels: int
) -> None:
    cfg = SupervisedConfig(generator=UNET) if name == "supervised" else method_config(name, dims)
    method = bound(cfg, data_info(dims, channels))
    artefact = method.artefact()
    assert (artefact.kind, artefact.key) == ("image_to_image", "deblur")
    assert artefact.record == generator_record(
        UNET, spatial_dims=dims, in_channels=channels, out_channels=channels
    )
    assert artefact.network is method.groups()["G"].get_submodule(
        "deblur" if name != "supervised" else ""
    )
    images = batch(dims, channels)["y"]
    with torch.no_grad():
        assert artefact.network(images).shape == images.shape
    assert method.metrics == {"psnr": True, "ssim": True}
    assert method.data_kind == ("paired" if name == "supervised" else "domains")


@pytest.mark.parametrize("name", ["blind", "nonblind"])
def test_kernel_with_the_wrong_number_of_axes_is_refused(name: str) -> None:
    with pytest.raises(ConfigError, match=r"kernel.size \[5, 5\] has 2 axes .* 3D"):
        build_method(method_config(name, 2), data_info(3, 1), seed=0, checkpointing=False)
