"""Mini-batches of a small training set held on the device: the loop every trainer here uses.

Clean sets for purification are small (500 to a few thousand images), so instead of a ``DataLoader`` that
collates and transforms per sample on the host, the whole set is moved to the device once, as one tensor, and
each batch is gathered, cropped and flipped there (:func:`nft_core.augment.random_crop_flip`). Every random
number of an epoch (the order, the crop offsets, the flips) is drawn at the epoch's start from one seeded CPU
generator and moved to the device in one copy, so

- there is no host round trip per step (the step loop never waits on the device),
- the same seed gives the same batches on the CPU and on a GPU, and
- a resumed run continues the same stream (:meth:`DeviceBatches.state_dict`).

A set larger than ``resident_bytes`` stays in host memory and each batch is copied over as it is needed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset

from nft_core.augment import random_crop_flip

#: zero padding of the random crop (the CIFAR recipe every trainer here uses)
CROP_PADDING = 4
#: Largest set (float32 bytes) kept resident on the device: 2 GiB, about 170,000 images of 3 x 32 x 32 or
#: 3,400 of 3 x 224 x 224.
RESIDENT_BYTES = 2 << 30


def conv_layout(device: torch.device) -> torch.memory_format:
    """Channels-last on CUDA (what its convolution kernels and tensor cores prefer), the standard layout elsewhere.

    Not channels-last on the CPU: besides being no faster there, oneDNN's AVX-512 1x1 strided convolution
    backward-weights kernel (torch 2.15, oneDNN 3.13) writes out of bounds on a channels-last input with fewer
    input channels than its 16-wide block and an odd batch (e.g. 43 x 8 x 32 x 32, stride 2), killing the process
    with a segmentation fault or a heap-corruption abort (oneDNN issue #6035)."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def dataset_tensors(data: Dataset[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of a ``(image, label)`` dataset as two tensors (a TensorDataset's own, else stacked)."""
    tensors = getattr(data, "tensors", None)
    if tensors is not None and len(tensors) == 2:
        return torch.as_tensor(tensors[0]).float(), torch.as_tensor(tensors[1]).long()
    items = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
    return (torch.stack([torch.as_tensor(x).float() for x, _ in items]),
            torch.tensor([int(y) for _, y in items], dtype=torch.long))


class DeviceBatches:
    """An iterable of ``(images, labels)`` batches on ``device``, reshuffled every epoch.

    Args:
        data: ``(image CHW float, int label)`` dataset.
        batch_size: samples per batch; the last batch of an epoch may be smaller.
        device: where batches are produced, in that device's :func:`conv_layout` (the crop's output is a
            channels-last view, copied to the standard layout on the CPU).
        seed: seeds the order and the augmentation.
        padding: random crop of the image's own size after zero-padding each side by this much (0: no crop).
        flip: random horizontal flip (off for classes that are not mirror-symmetric, e.g. road signs).
        steps_per_epoch: ``None``: an epoch is one pass over the set in a random order; ``N``: ``N`` batches
            drawn with replacement (the NFT authors' code).
        resident_bytes: sets larger than this stay in host memory (batches are copied over one by one).
    """

    def __init__(self, data: Dataset[Any], batch_size: int, *, device: torch.device | str = "cpu", seed: int = 0,
                 padding: int = 0, flip: bool = False, steps_per_epoch: int | None = None,
                 resident_bytes: int = RESIDENT_BYTES) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        x, y = dataset_tensors(data)
        if len(x) == 0:
            raise ValueError("cannot draw batches from an empty dataset")
        self.device = torch.device(device)
        self.resident = x.numel() * 4 <= resident_bytes
        where = self.device if self.resident else torch.device("cpu")
        self.x, self.y = x.to(where), y.to(where)
        if not self.resident and self.device.type == "cuda":
            self.x, self.y = self.x.pin_memory(), self.y.pin_memory()
        self.batch_size, self.padding, self.flip = batch_size, padding, flip
        self.steps_per_epoch = steps_per_epoch
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch
        return math.ceil(len(self.x) / self.batch_size)

    def _epoch_plan(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        n, g = len(self.x), self.generator
        order = (torch.randperm(n, generator=g) if self.steps_per_epoch is None else
                 torch.randint(n, (self.steps_per_epoch * self.batch_size,), generator=g))
        offsets = torch.randint(0, 2 * self.padding + 1, (len(order), 2), generator=g) if self.padding else None
        flips = torch.rand(len(order), generator=g) < 0.5 if self.flip else None
        return order, offsets, flips

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, offsets, flips = self._epoch_plan()
        dev = self.device
        layout = conv_layout(dev)
        order_x = order.to(self.x.device, non_blocking=True)
        offsets = offsets.to(dev, non_blocking=True) if offsets is not None else None
        flips = flips.to(dev, non_blocking=True) if flips is not None else None
        for start in range(0, len(order), self.batch_size):
            index = order_x[start:start + self.batch_size]
            x = self.x[index].to(dev, non_blocking=True)
            y = self.y[index].to(dev, non_blocking=True)
            if offsets is not None or flips is not None:
                x = random_crop_flip(x, self.padding,
                                     offsets[start:start + self.batch_size] if offsets is not None else None,
                                     flips[start:start + self.batch_size] if flips is not None else None)
            yield x.contiguous(memory_format=layout), y

    def state_dict(self) -> dict[str, Any]:
        """The generator's state: restoring it continues the same stream of epochs."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
