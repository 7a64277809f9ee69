"""What runs on one block of ``hpcdeconv rl --psf-map``: spatially-variant TV-RL (eq. 13).

A block runs :func:`~hpcdeconv.classical.sv_rl.sv_richardson_lucy` on its read region with
the PSFs of the map nodes whose masks touch that region (and its mirrored extension),
masks evaluated in global image coordinates (``block.read`` offsets). Its edges inside the
image reflect like :class:`~hpcdeconv.inference.processors.RLProcessor`'s, so the
stitched output matches whole-image SV-RL within the halo tolerance of
:func:`~hpcdeconv.classical.rl.rl_halo` for the (cropped) PSF size.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hpcdeconv.inference.memory import rl_block_bytes
from hpcdeconv.inference.processors import worker_runtime
from hpcdeconv.inference.tiling import Block
from hpcdeconv.psfnet.psf_map import PSFMap

#: Bytes of a node's OTF per element of its FFT shape (complex64 of the real FFT).
NODE_OTF_BYTES = 4
#: Bytes per element of one batch of FFT buffers (patch, spectrum, blurred, masks).
BATCH_BYTES = 16


def map_sha256(psf_map: PSFMap) -> str:
    """Hex SHA-256 of what the deconvolution reads from a map: parameters, model, grid."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(psf_map.params, np.float32).tobytes())
    meta = {
        "psf_model": psf_map.model.record(),
        "window": psf_map.window,
        "stride": psf_map.stride,
        "image_shape": list(psf_map.image_shape),
    }
    digest.update(json.dumps(meta, sort_keys=True).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class SVRLProcessor:
    """Spatially-variant (TV-)RL of each block with the PSF map's nodes that it touches.

    Attributes
    ----------
    psf_map
        The map (parameters, model, node grid); PSFs are rendered on the worker.
    psf_size
        Side of the centred crop of every PSF (:func:`~hpcdeconv.classical.sv_rl.crop_size`),
        or the rendered size for exact PSFs.
    iterations
        RL updates.
    tv
        TV weight ``lambda`` (0 for plain RL).
    threads, client_pid
        As in :class:`~hpcdeconv.inference.processors.NetworkProcessor`.
    boundary
        Treatment of the image's own border, ``"reflect"`` or ``"truncated"``.
    sha256
        :func:`map_sha256` of the map (recorded and compared on resume).
    """

    psf_map: PSFMap = field(repr=False)
    psf_size: int
    iterations: int
    tv: float = 0.0
    threads: int = 1
    client_pid: int = field(default_factory=os.getpid)
    boundary: str = "reflect"
    sha256: str = ""

    @classmethod
    def from_map(
        cls,
        psf_map: PSFMap,
        iterations: int,
        tv: float,
        crop_loss: float,
        threads: int = 1,
        boundary: str = "reflect",
    ) -> SVRLProcessor:
        """Render the map once, a row of nodes at a time, to find the common PSF crop
        (:func:`~hpcdeconv.classical.sv_rl.crop_size`); ``crop_loss = 0`` keeps PSFs whole."""
        from hpcdeconv.classical.sv_rl import crop_size, node_psfs

        size = max(
            crop_size(node_psfs(psf_map, rows=slice(row, row + 1)), crop_loss)
            for row in range(psf_map.params.shape[1])
        )
        return cls(
            psf_map, size, iterations, tv, threads, boundary=boundary, sha256=map_sha256(psf_map)
        )

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What determines the output: the map, the PSF crop, iterations, TV, boundary."""
        return {
            "kind": "sv_richardson_lucy",
            "psf_map_sha256": self.sha256 or map_sha256(self.psf_map),
            "psf_model": self.psf_map.model.name,
            "window": self.psf_map.window,
            "stride": self.psf_map.stride,
            "psf_size": self.psf_size,
            "iterations": self.iterations,
            "tv": self.tv,
            "boundary": self.boundary,
        }

    def block_bytes(self, block: Block) -> int:
        """Estimated memory of one block: RL's arrays, every touched node's OTF and one
        batch of FFT buffers (:class:`~hpcdeconv.classical.sv_rl.OverlapAdd`)."""
        from hpcdeconv.classical.sv_rl import BATCH_ELEMENTS

        read = [s.stop - s.start for s in block.read]
        k, stride, window = self.psf_size, self.psf_map.stride, self.psf_map.window
        nodes = math.prod(n // stride + 3 for n in read)
        # A mask spans at most two node spacings, or a spacing and half a window at the ends.
        fft = (max(2 * stride, stride + window // 2) + k) ** 2
        batch = min(nodes * fft, BATCH_ELEMENTS)
        rl = rl_block_bytes(read, (k, k), tv=self.tv > 0)
        return rl + NODE_OTF_BYTES * nodes * fft + BATCH_BYTES * batch

    @property
    def nonfinite_advice(self) -> str:
        """What to try when a block of finite input gave NaN/Inf: RL runs in float32."""
        return "SV-RL computes in float32; scale the input's intensities down"

    def __call__(self, data: np.ndarray, block: Block) -> np.ndarray:
        """SV-RL on the read region; the part of the result that ``block`` writes.

        Sides on the image's border take ``boundary``, edges inside the image reflect
        (as :class:`~hpcdeconv.inference.processors.RLProcessor`).
        """
        from hpcdeconv.classical.sv_masks import touching_nodes
        from hpcdeconv.classical.sv_rl import node_psfs, sv_richardson_lucy

        device = worker_runtime(self.threads, self.client_pid)
        border = block.border or ((True, True),) * data.ndim
        sides = [
            (self.boundary if before else "reflect", self.boundary if after else "reflect")
            for before, after in border
        ]
        centres = self.psf_map.centres
        reach = self.psf_size // 2
        nodes = []
        for axis, (region, (before, after)) in enumerate(zip(block.read, sides, strict=True)):
            low = region.start - (reach if before == "reflect" else 0)
            high = region.stop + (reach if after == "reflect" else 0)
            nodes.append(touching_nodes(centres[axis], low, high))
        with torch.no_grad():
            psfs = node_psfs(self.psf_map, self.psf_size, nodes[0], nodes[1], device)
        result = sv_richardson_lucy(
            data,
            psfs,
            centres,
            self.iterations,
            tv=self.tv,
            device=device,
            boundary=sides,
            offset=[s.start for s in block.read],
            first_node=[n.start for n in nodes],
        )
        keep = tuple(
            slice(c.start - before, c.stop - before)
            for c, (before, _) in zip(block.crop, block.pad, strict=True)
        )
        return np.asarray(result[keep], dtype=np.float32)
