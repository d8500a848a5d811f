"""The common shape of a backdoor attack: a trigger function plus a label mapping and data poisoning.

A triggered input is ``x' = T(x)`` (supplementary of Karim et al., ECCV 2024, Sec. 2.1), with target label
``t`` (all2one) or ``(y + 1) mod K`` (all2all). Poisoned-label attacks stamp the trigger on a share of the
training set and relabel those samples; clean-label attacks stamp only target-class samples and keep labels.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from nft_core.data import ImageData

MODES: tuple[str, ...] = ("all2one", "all2all")


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] to uint8 (rounded), as a stored poisoned image would be."""
    return x.mul(255).round_().clamp_(0, 255).to(torch.uint8)


@dataclass(frozen=True)
class Attack:
    """Base class; subclasses set :attr:`name` and implement :meth:`trigger`.

    Attributes:
        target: the attacker's target class (all2one) — also the class a clean-label attack poisons.
        mode: ``"all2one"`` (every triggered input goes to ``target``) or ``"all2all"`` (``y -> (y + 1) % K``).
        num_classes: K, the number of classes.
        image_shape: (C, H, W) of the images the trigger is made for.
        seed: seed of every random part of the trigger (patterns, warping fields).
    """

    name: ClassVar[str] = ""
    clean_label: ClassVar[bool] = False

    target: int = 0
    mode: str = "all2one"
    num_classes: int = 10
    image_shape: tuple[int, int, int] = (3, 32, 32)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"{self.name}: mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.num_classes < 2:
            raise ValueError(f"{self.name}: num_classes must be >= 2, got {self.num_classes}")
        if not 0 <= self.target < self.num_classes:
            raise ValueError(f"{self.name}: target {self.target} is outside [0, {self.num_classes})")
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"{self.name}: image_shape must be (C, H, W), got {self.image_shape}")
        if self.clean_label and self.mode != "all2one":
            raise ValueError(f"{self.name} is a clean-label attack: only mode 'all2one' is possible")

    @classmethod
    def option_names(cls) -> list[str]:
        """Names of the constructor arguments."""
        return [f.name for f in fields(cls)]

    def _generator(self, salt: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1000 + salt)

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        """The raw trigger function on float images in [0, 1] (may leave the range; :meth:`apply` clamps)."""
        raise NotImplementedError

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Triggered copies of float images ``x`` in [0, 1], N x C x H x W, clamped to [0, 1].

        Raises:
            TypeError: ``x`` is not floating point.
            ValueError: ``x`` is not N x C x H x W with the attack's ``image_shape``.
        """
        if not x.is_floating_point():
            raise TypeError(f"{self.name}: images must be float in [0, 1], got {x.dtype}")
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.image_shape):
            raise ValueError(f"{self.name}: images must be N x {' x '.join(map(str, self.image_shape))}, "
                             f"got {tuple(x.shape)}")
        return self.trigger(x).clamp(0, 1)

    def target_labels(self, y: torch.Tensor) -> torch.Tensor:
        """The attacker's label for each true label ``y``."""
        if self.mode == "all2one":
            return torch.full_like(y, self.target)
        return (y + 1) % self.num_classes

    def candidates(self, data: ImageData) -> torch.Tensor:
        """Indices of the samples that may be poisoned: target-class samples for clean-label attacks,
        non-target samples for all2one, every sample for all2all."""
        if self.clean_label:
            return (data.y == self.target).nonzero().flatten()
        if self.mode == "all2one":
            return (data.y != self.target).nonzero().flatten()
        return torch.arange(len(data))

    def poison(self, data: ImageData, rate: float, seed: int = 0) -> tuple[ImageData, torch.Tensor]:
        """A poisoned copy of a training set.

        Args:
            data: the clean training set.
            rate: share of the whole training set to poison, ``round(rate * len(data))`` samples, drawn from
                :meth:`candidates` (for a clean-label attack, from the target class only: 0.08 on a balanced
                10-class set poisons 80 % of the target class, as in the NFT supplementary).
            seed: seed of the choice of samples.

        Returns:
            The poisoned dataset (same order and size) and the sorted poisoned indices.

        Raises:
            ValueError: ``rate`` outside [0, 1] or more than the candidate samples can give.
        """
        if not 0 <= rate <= 1:
            raise ValueError(f"{self.name}: poison rate must be in [0, 1], got {rate}")
        pool = self.candidates(data)
        k = round(rate * len(data))
        if k > len(pool):
            raise ValueError(f"{self.name}: poison rate {rate} needs {k} samples but only {len(pool)} "
                             f"can be poisoned ({'target-class' if self.clean_label else 'eligible'} samples)")
        g = torch.Generator().manual_seed(seed)
        index = pool[torch.randperm(len(pool), generator=g)[:k]].sort().values
        return self._stamp(data, index), index

    def _stamp(self, data: ImageData, index: torch.Tensor) -> ImageData:
        x, y = data.x.clone(), data.y.clone()
        if len(index):
            x[index] = to_uint8(self.apply(data.x[index].float() / 255))
            if not self.clean_label:
                y[index] = self.target_labels(y[index])
        return ImageData(x, y, data.num_classes, data.class_names)

    def probe(self, data: ImageData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The whole test set triggered: ``(x_triggered, y_true, y_target)``.

        ``x_triggered`` is float in [0, 1] on the 8-bit grid (like stored triggered images). Target-class
        samples are kept; :func:`nft_core.metrics.attack_success_rate` leaves them out.
        """
        x = to_uint8(self.apply(data.images())).float().div_(255)
        return x, data.y.clone(), self.target_labels(data.y)
