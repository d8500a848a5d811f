"""Augmentations of the clean set used by the purifiers.

Per-sample crop/flip runs on the whole batch on the device (:func:`random_crop_flip`, fed by
:class:`nft_core.batches.DeviceBatches`); batch mixing uses torchvision's v2 ``MixUp``/``CutMix`` (lambda ~ Beta(alpha, alpha), pairs made by rolling
the batch), which return soft labels. The NFT loss is cross-entropy against those soft labels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Mixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def random_crop_flip(x: torch.Tensor, padding: int, offsets: torch.Tensor | None = None,
                     flips: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample RandomCrop(size, padding) with zero fill, then horizontal flip, on a whole batch at once.

    The CIFAR recipe the NFT authors use before MixUp, as ``torchvision.transforms.v2.RandomCrop`` and
    ``RandomHorizontalFlip`` would apply it sample by sample, but on the device: torchvision's v2 transforms
    draw one set of parameters per call, so a batched call would crop every image alike.

    Args:
        x: images, N x C x H x W.
        padding: zero padding on each side before the crop (0: no crop).
        offsets: N x 2 (top, left) crop offsets in [0, 2 * padding]; ``None``: no crop.
        flips: N booleans, True where the image is mirrored; ``None``: no flip.

    Returns:
        The augmented batch, same shape (channels-last memory when cropped).
    """
    if offsets is not None and padding:
        n, _, h, w = x.shape
        padded = F.pad(x, (padding, padding, padding, padding))
        rows = offsets[:, :1] + torch.arange(h, device=x.device)  # N x H
        cols = offsets[:, 1:] + torch.arange(w, device=x.device)  # N x W
        batch = torch.arange(n, device=x.device)[:, None, None]
        x = padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # N x H x W x C -> NCHW view
    if flips is not None:
        x = torch.where(flips[:, None, None, None], x.flip(-1), x)
    return x


def make_mixer(kind: str, alpha: float, num_classes: int) -> Mixer:
    """A function ``(images, labels) -> (images, soft labels)`` for ``kind`` in mixup | cutmix | none."""
    if kind in ("mixup", "cutmix"):
        from torchvision.transforms import v2  # here: importing torchvision takes 1.7 s, and every stage imports this

        mixer: Mixer = (v2.MixUp if kind == "mixup" else v2.CutMix)(alpha=alpha, num_classes=num_classes)
        return mixer
    if kind == "none":
        return lambda x, y: (x, F.one_hot(y, num_classes).to(x.dtype))
    raise ValueError(f"unknown mix kind {kind!r}: must be 'mixup', 'cutmix' or 'none'")


def soft_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against probability targets (MixUp/CutMix labels)."""
    return F.cross_entropy(logits.float(), soft_targets.float())
