"""The frozen, optimised trace of G_Θ gives the eager network's output, per input shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcdeconv.config import UNetConfig
from hpcdeconv.inference.frozen import FrozenNetwork, inference_network
from hpcdeconv.inference.predict import predict_volume
from hpcdeconv.models.factory import build_generator


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    torch.manual_seed(3)
    return build_generator(
        UNetConfig(channels=4, depth=2), spatial_dims=3, in_channels=1, out_channels=1
    ).eval()


def test_each_shape_gets_its_own_trace_with_the_eager_output(net: torch.nn.Module) -> None:
    frozen = FrozenNetwork(net)
    for shape in [(1, 1, 16, 24, 32), (2, 1, 16, 24, 32), (1, 1, 8, 8, 12), (1, 1, 16, 24, 32)]:
        x = torch.rand(shape)
        with torch.inference_mode():
            assert torch.allclose(frozen(x), net(x), rtol=0, atol=1e-5)
    assert len(frozen._traces) == 3


def test_tiled_prediction_through_the_trace_equals_eager(net: torch.nn.Module) -> None:
    volume = np.random.default_rng(0).random((20, 40, 36), dtype=np.float32)
    args = {"tile": (16, 16, 16), "overlap": 4, "blend": "linear", "size_multiple": 4}
    eager = predict_volume(net, volume, **args)
    frozen = predict_volume(inference_network(net, "cpu", None, freeze=True), volume, **args)
    assert np.abs(frozen - eager).max() <= 1e-5


def test_only_full_precision_cpu_inference_is_frozen(net: torch.nn.Module) -> None:
    assert isinstance(inference_network(net, "cpu", None, freeze=True), FrozenNetwork)
    assert inference_network(net, "cpu", None, freeze=False) is net
    assert inference_network(net, "cpu", torch.bfloat16, freeze=True) is net
    assert inference_network(net, "cuda", None, freeze=True) is net
