"""The in-memory dataset every stage passes around: uint8 images, int64 labels, class count and names."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset


@dataclass(frozen=True)
class ImageData:
    """Images and labels held in memory.

    Attributes:
        x: uint8 images, N x C x H x W.
        y: int64 labels, N, each in [0, num_classes).
        num_classes: number of classes of the task (may exceed the labels present).
        class_names: optional name per class.

    Raises:
        TypeError: ``x`` is not uint8 or ``y`` not int64.
        ValueError: shapes disagree, or a label lies outside [0, num_classes).
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8:
            raise TypeError(f"ImageData.x must be uint8, got {self.x.dtype}")
        if self.y.dtype != torch.int64:
            raise TypeError(f"ImageData.y must be int64, got {self.y.dtype}")
        if self.x.ndim != 4 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise ValueError(f"ImageData needs x of shape N x C x H x W and y of shape N, "
                             f"got x {tuple(self.x.shape)} and y {tuple(self.y.shape)}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if len(self.y) and (self.y.min() < 0 or self.y.max() >= self.num_classes):
            raise ValueError(f"labels span [{self.y.min().item()}, {self.y.max().item()}], "
                             f"outside [0, {self.num_classes})")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")

    def __len__(self) -> int:
        return len(self.y)

    def images(self) -> torch.Tensor:
        """Images as float32 in [0, 1], N x C x H x W."""
        return self.x.float().div_(255)

    def dataset(self) -> TensorDataset:
        """A ``TensorDataset`` of ``(images(), y)``, the form :func:`nft_core.purify.purify` takes."""
        return TensorDataset(self.images(), self.y)

    def subset(self, index: torch.Tensor | Sequence[int]) -> ImageData:
        """The samples at ``index`` (order kept), with the same classes."""
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageData(self.x[index], self.y[index], self.num_classes, self.class_names)

    def save_npz(self, path: str | Path) -> None:
        """Write ``x`` (uint8 N x H x W x C) and ``y`` (int64) to ``path`` atomically (temp file + rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, x=self.x.permute(0, 2, 3, 1).numpy(), y=self.y.numpy())
        os.replace(tmp, path)
