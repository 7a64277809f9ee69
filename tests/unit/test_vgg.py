"""VGG-19 features: torchvision's layout, named layers, loading weights from a file."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
import torch
from torch import nn

from hpcdeconv.config.perceptual import VGGLayer
from hpcdeconv.errors import InputError
from hpcdeconv.models.vgg import LAYER_NAMES, VGG19Features, load_vgg19

#: Indices of the convolutions in torchvision's ``vgg19().features``.
TORCHVISION_CONVS = [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]
#: Parameters of VGG-19's ``features`` (the published count, independent of our code).
VGG19_FEATURE_PARAMETERS = 20_024_384
#: Configuration "D" (VGG-16) of Simonyan & Zisserman, to build a wrong-layout file.
VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


@pytest.fixture(scope="module")
def net() -> VGG19Features:
    torch.manual_seed(0)
    return VGG19Features().eval().requires_grad_(False)


def _torchvision_file(net: VGG19Features, path: Path, prefix: bool = True) -> Path:
    """``net``'s weights saved as torchvision's full ``vgg19().state_dict()`` (with made-up
    classifier tensors) or, ``prefix=False``, as ``vgg19().features.state_dict()``."""
    if prefix:
        state = {f"features.{k}": v.clone() for k, v in net.features.state_dict().items()}
        state |= {"classifier.0.weight": torch.zeros(8, 4), "classifier.0.bias": torch.zeros(8)}
    else:
        state = {k: v.clone() for k, v in net.features.state_dict().items()}
    torch.save(state, path)
    return path


def test_layout_is_torchvisions(net: VGG19Features) -> None:
    convs = [i for i, m in enumerate(net.features) if isinstance(m, nn.Conv2d)]
    assert convs == TORCHVISION_CONVS
    assert len(net.features) == 37
    assert sum(p.numel() for p in net.parameters()) == VGG19_FEATURE_PARAMETERS
    expected_keys = [f"features.{i}.{p}" for i in TORCHVISION_CONVS for p in ("weight", "bias")]
    assert list(net.state_dict()) == expected_keys
    for i in TORCHVISION_CONVS:
        conv = net.features[i]
        assert (conv.kernel_size, conv.padding) == ((3, 3), (1, 1))
        assert isinstance(net.features[i + 1], nn.ReLU)
    pools = [i for i, m in enumerate(net.features) if isinstance(m, nn.MaxPool2d)]
    assert pools == [4, 9, 18, 27, 36]


def test_layer_names_follow_the_network_and_match_the_config() -> None:
    assert LAYER_NAMES[:5] == ("conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1")
    assert LAYER_NAMES[16:19] == ("conv3_4", "relu3_4", "pool3")
    assert LAYER_NAMES[-3:] == ("conv5_4", "relu5_4", "pool5")
    assert get_args(VGGLayer) == LAYER_NAMES


def test_feature_shapes_for_odd_sizes(net: VGG19Features) -> None:
    x = torch.randn(1, 3, 37, 45)
    out = net(x, ["relu1_1", "pool1", "conv2_2", "pool2", "relu3_3", "pool3", "relu4_4", "pool5"])
    shapes = {name: tuple(t.shape) for name, t in out.items()}
    assert shapes == {
        "relu1_1": (1, 64, 37, 45),
        "pool1": (1, 64, 18, 22),
        "conv2_2": (1, 128, 18, 22),
        "pool2": (1, 128, 9, 11),
        "relu3_3": (1, 256, 9, 11),
        "pool3": (1, 256, 4, 5),
        "relu4_4": (1, 512, 4, 5),
        "pool5": (1, 512, 1, 1),
    }
    # Pre-activation maps are not overwritten by an in-place ReLU.
    both = net(x, ["conv1_1", "relu1_1"])
    assert both["conv1_1"].min() < 0
    torch.testing.assert_close(both["relu1_1"], both["conv1_1"].clamp(min=0))


def test_forward_stops_after_the_deepest_requested_layer(net: VGG19Features) -> None:
    calls: list[int] = []
    hooks = [
        m.register_forward_hook(lambda *_, i=i: calls.append(i)) for i, m in enumerate(net.features)
    ]
    try:
        net(torch.randn(1, 3, 16, 16), ["relu2_1", "relu1_1"])
    finally:
        for h in hooks:
            h.remove()
    assert calls == list(range(LAYER_NAMES.index("relu2_1") + 1))


def test_forward_rejects_unknown_layers_and_grey_images(net: VGG19Features) -> None:
    with pytest.raises(ValueError, match="relu6_1"):
        net(torch.randn(1, 3, 8, 8), ["relu6_1"])
    with pytest.raises(ValueError, match="non-empty"):
        net(torch.randn(1, 3, 8, 8), [])
    with pytest.raises(ValueError, match=r"\(B, 3, Y, X\)"):
        net(torch.randn(1, 1, 8, 8), ["relu1_1"])


@pytest.mark.parametrize("prefix", [True, False], ids=["full-model", "features-only"])
def test_loads_a_torchvision_state_dict(net: VGG19Features, tmp_path: Path, prefix: bool) -> None:
    loaded = load_vgg19(_torchvision_file(net, tmp_path / "vgg19.pth", prefix))
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    x = torch.randn(1, 3, 32, 32)
    layers = ["relu1_2", "relu3_3", "pool5"]
    want, got = net(x, layers), loaded(x, layers)
    for name in layers:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


def _vgg16_state() -> dict[str, torch.Tensor]:
    state, index, channels = {}, 0, 3
    for item in VGG16_CONFIG:
        if item == "M":
            index += 1
            continue
        state[f"features.{index}.weight"] = torch.zeros(int(item), channels, 3, 3)
        state[f"features.{index}.bias"] = torch.zeros(int(item))
        channels, index = int(item), index + 2
    return state


def _one_line(exc: pytest.ExceptionInfo[InputError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_a_vgg16_file_names_the_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / "vgg16.pth"
    torch.save(_vgg16_state(), path)
    with pytest.raises(InputError) as exc:
        load_vgg19(path)
    message = _one_line(exc)
    # VGG-16 lacks conv3_4, conv4_4 and conv5_4 and shifts the later convolutions.
    assert "features.16.weight" in message
    assert "12 of its 32 feature tensors are missing" in message
    assert "(and 8 more)" in message


def test_a_resnet_file_names_the_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.bias": torch.zeros(10)}, path)
    with pytest.raises(InputError) as exc:
        load_vgg19(path)
    assert "32 of its 32 feature tensors are missing: features.0.weight" in _one_line(exc)


def test_a_wrong_shape_names_the_key_and_both_shapes(net: VGG19Features, tmp_path: Path) -> None:
    state = {f"features.{k}": v for k, v in net.features.state_dict().items()}
    state["features.2.weight"] = torch.zeros(64, 32, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(InputError) as exc:
        load_vgg19(path)
    message = _one_line(exc)
    assert "features.2.weight" in message
    assert "(64, 32, 3, 3)" in message and "(64, 64, 3, 3)" in message


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ([1, 2, 3], "not a state dict"),
        (torch.zeros(3), "not a state dict"),
        ({"features.0.weight": 1.0}, "not a state dict"),
        (b"not a torch file", "cannot read"),
        (None, "cannot read"),
    ],
    ids=["list", "tensor", "dict-of-floats", "garbage", "absent"],
)
def test_unreadable_or_non_dict_files_give_one_line(
    tmp_path: Path, content: object, match: str
) -> None:
    path = tmp_path / "weights.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(InputError, match=match) as exc:
        load_vgg19(path)
    assert str(path) in _one_line(exc)
