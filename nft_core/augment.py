"""Augmentations of the clean set used by the purifiers.

Per-sample crop/flip comes from ``torchvision.transforms.v2`` (applied in the dataset, before batching);
batch mixing uses torchvision's v2 ``MixUp``/``CutMix`` (lambda ~ Beta(alpha, alpha), pairs made by rolling
the batch), which return soft labels. The NFT loss is cross-entropy against those soft labels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.transforms import v2

Mixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def crop_flip(size: tuple[int, int], padding: int = 4, flip: bool = True) -> v2.Transform:
    """RandomCrop(size, padding) + RandomHorizontalFlip, the CIFAR recipe the authors use before MixUp.

    ``flip=False`` leaves the flip out, for classes that are not mirror-symmetric (GTSRB's turn-left and
    turn-right signs are different classes)."""
    if not flip:
        return v2.RandomCrop(size, padding=padding)
    return v2.Compose([v2.RandomCrop(size, padding=padding), v2.RandomHorizontalFlip()])


class TransformedDataset(Dataset):
    """Applies ``transform`` to the image of each ``(image, label)`` item of ``base``."""

    def __init__(self, base: Dataset, transform: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return (self.transform(x) if self.transform is not None else x), y


def make_mixer(kind: str, alpha: float, num_classes: int) -> Mixer:
    """A function ``(images, labels) -> (images, soft labels)`` for ``kind`` in mixup | cutmix | none."""
    if kind == "mixup":
        return v2.MixUp(alpha=alpha, num_classes=num_classes)
    if kind == "cutmix":
        return v2.CutMix(alpha=alpha, num_classes=num_classes)
    if kind == "none":
        return lambda x, y: (x, F.one_hot(y, num_classes).to(x.dtype))
    raise ValueError(f"unknown mix kind {kind!r}: must be 'mixup', 'cutmix' or 'none'")


def soft_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against probability targets (MixUp/CutMix labels)."""
    return F.cross_entropy(logits.float(), soft_targets.float())
