"""SIG (Barni et al., 2019): an additive horizontal sinusoid ``v(i, j) = delta * sin(2 pi j f / W)`` over the
whole image.

The literature uses SIG as a clean-label attack (only target-class images are stamped, labels kept). Here
the default is the simpler poisoned-label variant (any non-target image stamped and relabelled), which also
allows all2all; pass ``clean_label=True`` to :func:`nft_core.attacks.make_attack` for the literature's form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nft_core.attacks.base import Attack


@dataclass(frozen=True)
class SIG(Attack):
    """Sinusoidal-signal attack.

    Attributes:
        delta: amplitude of the sinusoid in [0, 1] pixel units (Barni et al.: 20/255; larger is learnt faster).
        frequency: number of periods across the image width (f = 6 in the literature).
    """

    name = "sig"

    delta: float = 20 / 255
    frequency: float = 6.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.delta <= 1:
            raise ValueError(f"sig: delta must be in (0, 1], got {self.delta}")
        if self.frequency <= 0:
            raise ValueError(f"sig: frequency must be positive, got {self.frequency}")

    def signal(self) -> torch.Tensor:
        """The 1 x W signal added to every row of every channel."""
        w = self.image_shape[2]
        return self.delta * torch.sin(2 * math.pi * torch.arange(w) * self.frequency / w)

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.signal().to(x)


@dataclass(frozen=True)
class CleanLabelSIG(SIG):
    """SIG in its original clean-label form (only target-class training images are stamped)."""

    clean_label = True
