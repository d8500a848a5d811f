"""What the per-class searches (:mod:`nft_core.invert`, :mod:`nft_core.perturb`, :mod:`nft_core.maxmargin`) check
and share before they start."""

from __future__ import annotations

import torch
from torch import nn

from nft_core.modes import eval_mode


def class_chunks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int | None,
                 classes_per_chunk: int) -> tuple[torch.device, torch.Tensor, int, list[list[int]]]:
    """The model's device, ``y`` as CPU labels, the number of classes to search (default: the model's output
    width) and those classes in chunks of ``classes_per_chunk``, each optimised in one batched forward pass.

    One forward pass in eval mode reads the output width (the model's mode is restored).

    Raises:
        ValueError: empty input, mismatched lengths, fewer than two classes, more classes than outputs, or labels
            outside the classes.
    """
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"need as many labels as images and at least one image, got {len(x)} images and {len(y)} labels")
    device = next(model.parameters()).device
    y = torch.as_tensor(y).long().cpu()
    with eval_mode(model), torch.no_grad():
        width = model(x[:1].to(device)).shape[-1]
    num_classes = width if num_classes is None else num_classes
    if num_classes < 2 or num_classes > width or y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels span [{y.min()}, {y.max()}] and num_classes={num_classes}; the model has {width} outputs")
    return device, y, num_classes, chunked(num_classes, classes_per_chunk)


def chunked(num_classes: int, classes_per_chunk: int) -> list[list[int]]:
    """Classes ``0 .. num_classes - 1`` in consecutive chunks of at most ``classes_per_chunk``."""
    return [list(range(i, min(i + classes_per_chunk, num_classes))) for i in range(0, num_classes, classes_per_chunk)]
