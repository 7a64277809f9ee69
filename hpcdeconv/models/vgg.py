"""VGG-19 convolutional features, frozen, with weights read from a local file.

The network is written here (torchvision does not import next to this project's torch);
its module indices are torchvision's, so torchvision's VGG-19 state dict loads key for key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hpcdeconv.errors import InputError

__all__ = ["LAYER_NAMES", "VGG19Features", "load_vgg19"]

#: Configuration "E" of Simonyan & Zisserman (2015), Table 1: output channels of each 3×3
#: convolution, ``"M"`` a 2×2 max pooling.
_CONFIG_E: tuple[int | str, ...] = (
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, 256, "M",
    512, 512, 512, 512, "M",
    512, 512, 512, 512, "M",
)  # fmt: skip

#: How many names of a key list an error message shows before the count of the rest.
_SHOWN_KEYS = 4


def _layer_names(config: Sequence[int | str]) -> tuple[str, ...]:
    """Names of the modules of the ``features`` stack, one per module, in order."""
    names: list[str] = []
    block, conv = 1, 1
    for item in config:
        if item == "M":
            names.append(f"pool{block}")
            block, conv = block + 1, 1
        else:
            names += [f"conv{block}_{conv}", f"relu{block}_{conv}"]
            conv += 1
    return tuple(names)


#: ``conv1_1``, ``relu1_1``, …, ``relu5_4``, ``pool5``; the i-th name is module
#: ``features.i`` (the same list as :data:`hpcdeconv.config.perceptual.VGGLayer`).
LAYER_NAMES: tuple[str, ...] = _layer_names(_CONFIG_E)


class VGG19Features(nn.Module):
    """The 16 convolutional layers of VGG-19 (configuration "E" of Simonyan & Zisserman,
    "Very deep convolutional networks for large-scale image recognition", ICLR 2015).

    3×3 convolutions with padding 1, each followed by a ReLU; five 2×2 max poolings with
    stride 2 (odd sizes rounded down). ``self.features`` is an ``nn.Sequential`` with the
    indices of torchvision's ``vgg19().features`` (convolutions at 0, 2, 5, 7, 10, …, 34),
    so its state dict keys are ``features.0.weight`` … ``features.34.bias``. Parameters
    are randomly initialised; trained weights come from :func:`load_vgg19`.

    The inputs the published weights expect are RGB in [0, 1] normalised by the ImageNet
    mean and standard deviation; :class:`hpcdeconv.losses.perceptual.ContentLoss` does it.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in _CONFIG_E:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                width = int(item)
                # inplace=False: the pre-ReLU map ("convB_I") may itself be requested.
                layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU()]
                channels = width
        self.features = nn.Sequential(*layers)

    def forward(self, x: Tensor, layers: Iterable[str]) -> dict[str, Tensor]:
        """Feature maps of ``x`` at ``layers``, computing nothing past the deepest of them.

        Parameters
        ----------
        x
            (B, 3, Y, X), ImageNet-normalised RGB.
        layers
            Names from :data:`LAYER_NAMES`, e.g. ``("relu3_3",)``.

        Returns
        -------
        dict[str, Tensor]
            One map per requested name: (B, 64, Y, X) for block 1, (B, 128, Y//2, X//2)
            for block 2, (B, 256, Y//4, X//4) for block 3, (B, 512, Y//8, X//8) and
            (B, 512, Y//16, X//16) for blocks 4 and 5; ``poolB`` halves its block's size
            again (floor).

        Raises
        ------
        ValueError
            No layer, or a name that is not a VGG-19 layer.
        """
        wanted = set(layers)
        unknown = sorted(wanted - set(LAYER_NAMES))
        if unknown or not wanted:
            raise ValueError(
                f"VGG-19 layers must be a non-empty subset of {LAYER_NAMES}, got {unknown}"
            )
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"VGG-19 needs (B, 3, Y, X) images, got shape {tuple(x.shape)}")
        deepest = max(LAYER_NAMES.index(name) for name in wanted)
        out: dict[str, Tensor] = {}
        for name, module in zip(LAYER_NAMES[: deepest + 1], self.features, strict=False):
            x = module(x)
            if name in wanted:
                out[name] = x
        return out


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _listed(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    rest = len(keys) - _SHOWN_KEYS
    return f"{shown} (and {rest} more)" if rest > 0 else shown


def _features_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """The ``features`` entries of ``state`` with keys as in ``VGG19Features().features``.

    A dict with any ``features.`` key is a full model's (torchvision ``vgg19()``): its
    ``features.`` keys are taken, the rest (``classifier.*``) ignored. Otherwise it is
    the ``features`` stack's own (``vgg19().features.state_dict()``, keys ``0.weight``…).
    """
    prefix = "features."
    if any(key.startswith(prefix) for key in state):
        return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    return dict(state)


def load_vgg19(path: str | Path) -> VGG19Features:
    """VGG-19 features with torchvision's trained weights read from ``path``.

    Parameters
    ----------
    path
        A file written by ``torch.save`` of a torchvision VGG-19 state dict: the full
        model's (keys ``features.0.weight`` … ``features.34.bias``; ``classifier.*`` keys
        are ignored) or only the ``features`` stack's (keys ``0.weight`` … ``34.bias``).
        Read with ``weights_only=True`` onto the CPU.

    Returns
    -------
    VGG19Features
        In eval mode, every parameter with ``requires_grad=False``, on the CPU.

    Raises
    ------
    InputError
        One line: the file is unreadable or holds no state dict; keys are missing (the
        first few and their count; e.g. a VGG-16, VGG-19-BN or ResNet file); or a tensor
        has the wrong shape (its key and both shapes).
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to read is the user's file, reported in one line
        raise InputError(f"cannot read VGG-19 weights {path}: {_first_line(exc)}") from None
    if not isinstance(state, Mapping):
        raise InputError(
            f"VGG-19 weights {path} hold a {type(state).__name__}, not a state dict "
            "(names to tensors) of torchvision's VGG-19"
        )
    odd = next(
        (k for k, v in state.items() if not (isinstance(k, str) and isinstance(v, Tensor))), None
    )
    if odd is not None:
        # E.g. a training checkpoint wrapping the state dict with other entries.
        raise InputError(
            f"VGG-19 weights {path} are not a state dict (names to tensors) of torchvision's "
            f"VGG-19: entry {odd!r} holds a {type(state[odd]).__name__}"
        )
    state = _features_state(state)
    net = VGG19Features()
    expected = net.features.state_dict()
    missing = [f"features.{key}" for key in expected if key not in state]
    if missing:
        raise InputError(
            f"{path} is not a torchvision VGG-19 state dict: {len(missing)} of its "
            f"{len(expected)} feature tensors are missing: {_listed(missing)}"
        )
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise InputError(
                f"{path} is not a torchvision VGG-19 state dict: features.{key} has shape "
                f"{tuple(state[key].shape)}, VGG-19 needs {tuple(tensor.shape)}"
            )
    # Keys beyond VGG-19's (only possible in a features-only dict) are left unused.
    net.features.load_state_dict({key: state[key] for key in expected})
    return net.eval().requires_grad_(False)
