"""Trojan-style static watermark (Liu et al., NDSS 2018; the NFT supplementary's Troj-one/Troj-all use one
fixed watermark for every triggered sample).

Liu et al. reverse-engineer the watermark from the model's neurons; here the watermark is a fixed random
binary glyph (from the seed) in a square region of the bottom-left corner, blended in at opacity ``alpha``
(1 = stamped).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from nft_core.attacks.base import Attack


@dataclass(frozen=True)
class Trojan(Attack):
    """Static watermark attack.

    Attributes:
        size: side of the watermark region in pixels.
        margin: distance of the region from the bottom and left edges.
        alpha: opacity of the watermark, in (0, 1].
    """

    name = "trojan"

    size: int = 8
    margin: int = 2
    alpha: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _, h, w = self.image_shape
        if self.size < 2 or self.margin < 0 or self.size + self.margin > min(h, w):
            raise ValueError(f"trojan: watermark size {self.size} with margin {self.margin} does not fit {h} x {w}")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"trojan: alpha must be in (0, 1], got {self.alpha}")

    @cached_property
    def watermark(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask, colour)``: H x W opacity (glyph strokes at ``alpha``) and C x H x W colour in [0, 1]."""
        c, h, w = self.image_shape
        g = self._generator()
        glyph = (torch.rand(self.size, self.size, generator=g) < 0.5).float()
        colour = (torch.rand(c, 1, 1, generator=g) > 0.5).float().expand(c, self.size, self.size)
        mask, full = torch.zeros(h, w), torch.zeros(c, h, w)
        top, left = h - self.margin - self.size, self.margin
        mask[top:top + self.size, left:left + self.size] = self.alpha * glyph
        full[:, top:top + self.size, left:left + self.size] = colour
        return mask, full

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        mask, colour = (t.to(x) for t in self.watermark)
        return (1 - mask) * x + mask * colour
