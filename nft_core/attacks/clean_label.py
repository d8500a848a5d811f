"""Clean-label backdoor (Turner, Tsipras & Madry, "Label-Consistent Backdoor Attacks", 2019), as set up in
the NFT supplementary (Sec. 2.1, CLB): a 3 x 3 checkerboard in each of the four corners, stamped only on
target-class training images whose labels stay correct.

Because the poisoned images still carry their natural class features, the model has little reason to use
the trigger. Turner et al. first make those features hard to use; with ``surrogate`` given to
:meth:`CleanLabel.poison` this is done as in the paper (untargeted L-inf PGD against a surrogate classifier,
radius ``eps``). Without a surrogate, the trigger is made stronger instead (a larger, full-contrast patch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nft_core.adversarial import pgd_untargeted
from nft_core.attacks.badnets import checkerboard
from nft_core.attacks.base import Attack
from nft_core.data import ImageData


@dataclass(frozen=True)
class CleanLabel(Attack):
    """Clean-label checkerboard attack.

    Attributes:
        size: side of each corner checkerboard in pixels.
        margin: distance of each patch from the image edges.
        eps: L-inf radius of the adversarial perturbation (used only with a surrogate model).
        pgd_steps: PGD steps (used only with a surrogate model).
    """

    name = "clean_label"
    clean_label = True

    size: int = 3
    margin: int = 1
    eps: float = 16 / 255
    pgd_steps: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        _, h, w = self.image_shape
        if self.size < 1 or self.margin < 0 or 2 * (self.size + self.margin) > min(h, w):
            raise ValueError(f"clean_label: four {self.size}-pixel patches with margin {self.margin} do not fit "
                             f"{h} x {w}")

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        h, w = x.shape[-2:]
        patch = checkerboard(self.size).to(x)
        for top in (self.margin, h - self.margin - self.size):
            for left in (self.margin, w - self.margin - self.size):
                out[..., top:top + self.size, left:left + self.size] = patch
        return out

    def poison(self, data: ImageData, rate: float, seed: int = 0,
               surrogate: nn.Module | None = None) -> tuple[ImageData, torch.Tensor]:
        """As :meth:`Attack.poison` (target-class samples only, labels kept); with ``surrogate``, the chosen
        images are first perturbed by PGD against it (Turner et al.), then stamped."""
        poisoned, index = super().poison(data, rate, seed)
        if surrogate is None or len(index) == 0:
            return poisoned, index
        torch.manual_seed(seed)
        device = next(surrogate.parameters()).device
        x = data.x[index].float().div(255).to(device)
        adv = pgd_untargeted(surrogate, x, data.y[index].to(device), self.eps, self.pgd_steps).cpu()
        return self._stamp(ImageData(data.x.clone().index_put_((index,), (adv * 255).round().byte()), data.y,
                                     data.num_classes, data.class_names), index), index
