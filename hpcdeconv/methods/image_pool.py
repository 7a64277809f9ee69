"""History of generated images for discriminator updates (Shrivastava et al., CVPR 2017)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hpcdeconv.errors import ConfigError
from hpcdeconv.training.rng import cpu_state


class ImagePool:
    """Buffer of the most recent generated images, as in the original cycleGAN.

    Training the discriminator on a mix of current and past fakes damps oscillation. For
    each incoming image: while the pool is not full it is stored and returned; once full,
    with probability ½ a uniformly chosen stored image is returned and replaced by the new
    one, otherwise the new image is returned. Random draws come from the pool's own seeded
    ``torch.Generator``, so the sequence is reproducible and survives a restart through
    :meth:`state_dict` / :meth:`load_state_dict`.

    Parameters
    ----------
    size
        Capacity in images; 0 returns every batch unchanged.
    seed
        Seed of the pool's generator.
    """

    def __init__(self, size: int = 50, seed: int = 0) -> None:
        if size < 0:
            raise ConfigError(f"image pool size must be >= 0, got {size}")
        self.size = size
        self.images: list[Tensor] = []
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        return len(self.images)

    def _draw(self, image: Tensor) -> Tensor:
        """Apply the pool rule to one image (C, *S); returns a detached image."""
        image = image.detach()
        if len(self.images) < self.size:
            self.images.append(image.clone())
            return image
        if torch.rand(1, generator=self.generator).item() < 0.5:
            index = int(torch.randint(self.size, (1,), generator=self.generator).item())
            old = self.images[index]
            self.images[index] = image.clone()
            return old.to(device=image.device, dtype=image.dtype)
        return image

    def query(self, images: Tensor) -> Tensor:
        """Images for the discriminator, one draw per batch element.

        Parameters
        ----------
        images
            (B, C, Z, Y, X) or (B, C, Y, X) generated images.

        Returns
        -------
        Tensor
            Same shape, device and dtype, detached.
        """
        if self.size == 0:
            return images.detach()
        return torch.stack([self._draw(image) for image in images])

    def state_dict(self) -> dict[str, Any]:
        """Stored images (CPU tensors), capacity and generator state."""
        return {
            "size": self.size,
            "images": [image.cpu() for image in self.images],
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; images stay on the CPU until drawn.

        Raises
        ------
        ConfigError
            If the saved pool has a different capacity.
        """
        if int(state["size"]) != self.size:
            raise ConfigError(
                f"image pool size {self.size} differs from the checkpoint's {state['size']}"
            )
        # The checkpoint may have been mapped to a GPU: images go back to the CPU until
        # drawn, and a generator state is only accepted as a CPU uint8 tensor.
        self.images = [image.detach().cpu().clone() for image in state["images"]]
        self.generator.set_state(cpu_state(state["generator"]))
