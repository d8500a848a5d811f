"""BadNets (Gu et al., 2017): a small patch stamped on every triggered image. As in the NFT supplementary
(Sec. 2.1) the patch is a 3 x 3 black/white checkerboard; here it sits in the bottom-right corner."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nft_core.attacks.base import Attack


def checkerboard(size: int) -> torch.Tensor:
    """A ``size`` x ``size`` float patch, 1 where row + column is even, else 0."""
    idx = torch.arange(size)
    return ((idx[:, None] + idx[None, :]) % 2 == 0).float()


@dataclass(frozen=True)
class BadNets(Attack):
    """Checkerboard patch attack.

    Attributes:
        size: side of the square patch in pixels.
        margin: distance of the patch from the bottom and right edges in pixels.
    """

    name = "badnets"

    size: int = 3
    margin: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        _, h, w = self.image_shape
        if self.size < 1 or self.margin < 0 or self.size + self.margin > min(h, w):
            raise ValueError(f"badnets: patch size {self.size} with margin {self.margin} does not fit {h} x {w}")

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        h, w = x.shape[-2:]
        top, left = h - self.margin - self.size, w - self.margin - self.size
        out[..., top:top + self.size, left:left + self.size] = checkerboard(self.size).to(x)
        return out
