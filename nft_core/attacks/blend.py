"""Blended injection (Chen et al., 2017): ``x' = (1 - alpha) x + alpha P`` with a fixed pattern P. As in the
NFT supplementary (Sec. 2.1), P is uniform random noise (fixed by the seed) and alpha = 0.2."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from nft_core.attacks.base import Attack


@dataclass(frozen=True)
class Blend(Attack):
    """Blend attack.

    Attributes:
        alpha: blend weight of the pattern, in (0, 1].
    """

    name = "blend"

    alpha: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.alpha <= 1:
            raise ValueError(f"blend: alpha must be in (0, 1], got {self.alpha}")

    @cached_property
    def pattern(self) -> torch.Tensor:
        """The fixed C x H x W noise pattern in [0, 1]."""
        return torch.rand(self.image_shape, generator=self._generator())

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        return (1 - self.alpha) * x + self.alpha * self.pattern.to(x)
