"""WaNet (Nguyen & Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021).

1. Draw a k x k field of random 2-D offsets in [-1, 1], normalise it by its mean absolute value.
2. Upsample it (bicubic) to H x W, scale by ``s / H`` and add it to the identity sampling grid; clamp to [-1, 1].
3. Triggered image: ``F.grid_sample(x, grid)``. The same warp serves every triggered image.
4. Noise mode (optional): for ``cross_ratio`` times as many other training samples, the grid gets an extra
   per-sample random offset and the label is kept, so the model has to learn the exact warp.

The paper uses k = 4, s = 0.5 on CIFAR-10 with long training; the default s here is larger so a small CNN
trained for a few epochs learns it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from nft_core.attacks.base import Attack, to_uint8
from nft_core.data import ImageData


@dataclass(frozen=True)
class WaNet(Attack):
    """Warping attack.

    Attributes:
        k: side of the control grid.
        s: warping strength (paper: 0.5).
        noise: enable the paper's noise mode when poisoning.
        cross_ratio: noise-mode samples per poisoned sample.
    """

    name = "wanet"

    k: int = 4
    s: float = 1.0
    noise: bool = False
    cross_ratio: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 2:
            raise ValueError(f"wanet: k must be >= 2, got {self.k}")
        if self.s <= 0:
            raise ValueError(f"wanet: s must be positive, got {self.s}")
        if self.cross_ratio < 0:
            raise ValueError(f"wanet: cross_ratio must be >= 0, got {self.cross_ratio}")

    @cached_property
    def grid(self) -> torch.Tensor:
        """The 1 x H x W x 2 sampling grid of the trigger warp."""
        _, h, w = self.image_shape
        ins = torch.rand(1, 2, self.k, self.k, generator=self._generator()) * 2 - 1
        ins = ins / ins.abs().mean()
        offsets = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        identity = torch.stack((xs, ys), dim=-1).unsqueeze(0)
        return (identity + self.s * offsets / h).clamp(-1, 1)

    def _warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return F.grid_sample(x, grid.to(x).expand(len(x), -1, -1, -1), align_corners=True)

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        return self._warp(x, self.grid)

    def poison(self, data: ImageData, rate: float, seed: int = 0) -> tuple[ImageData, torch.Tensor]:
        """As :meth:`Attack.poison`; in noise mode, also warp ``cross_ratio`` times as many other samples with
        a randomly perturbed grid and keep their labels (they are not in the returned poisoned indices)."""
        poisoned, index = super().poison(data, rate, seed)
        if not self.noise or len(index) == 0:
            return poisoned, index
        g = torch.Generator().manual_seed(seed + 1)
        others = torch.ones(len(data), dtype=torch.bool)
        others[index] = False
        pool = others.nonzero().flatten()
        cross = pool[torch.randperm(len(pool), generator=g)[:round(self.cross_ratio * len(index))]]
        _, h, w = self.image_shape
        jitter = (torch.rand(len(cross), h, w, 2, generator=g) * 2 - 1) / h
        x = poisoned.x.clone()
        x[cross] = to_uint8(self._warp(data.x[cross].float() / 255, (self.grid + jitter).clamp(-1, 1)).clamp(0, 1))
        return ImageData(x, poisoned.y, data.num_classes, data.class_names), index
