"""A trained generator seen from raw intensities: map in, run, map back.

A network trained on a dataset whose images were mapped to its range
(:mod:`hpcdeconv.data.intensity`, e.g. ``(-1, 1)`` for a ``tanh`` head) must see new
images mapped the same way, and its output belongs in the raw units of its input.
Inference wraps such a generator in :class:`IntensityMapped`, so tiling, blending, the
dask driver and scoring against a raw truth all work on raw values and know nothing of
the mapping.
"""

from __future__ import annotations

from torch import Tensor, nn

from hpcdeconv.data.intensity import IntensityMap

__all__ = ["IntensityMapped"]


class IntensityMapped(nn.Module):
    """``inverse(net(forward(x)))`` for the fixed affine mapping ``intensity``.

    Parameters
    ----------
    net
        The generator, trained on mapped images; its weights are loaded already (this
        wrapper adds no parameters or buffers, so its state dict is ``net``'s).
    intensity
        Raw → network range mapping recorded with the training data.
    """

    def __init__(self, net: nn.Module, intensity: IntensityMap) -> None:
        super().__init__()
        self.net = net
        self.intensity = intensity
        #: Tile sides must be multiples of this, as for ``net``.
        self.size_multiple = int(getattr(net, "size_multiple", 1))

    def receptive_field(self) -> int:
        """Receptive field of ``net`` in voxels per axis (the mapping is pointwise)."""
        return int(self.net.receptive_field())

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, *S) raw values → (B, C, *S) raw values."""
        return self.intensity.to_raw(self.net(self.intensity.to_network(x)))
