"""Evaluation metrics as plain functions of predictions, plus batched prediction for torch models.

Predictions can come from PyTorch (:func:`predict`) or from ONNX Runtime; the metrics do not care.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

ArrayLike = torch.Tensor | np.ndarray


def _t(a: ArrayLike) -> torch.Tensor:
    return torch.as_tensor(a).long().cpu()


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512, device: str | torch.device | None = None) -> torch.Tensor:
    """Logits of ``model`` (put in eval mode) for images ``x``, computed in batches, returned on the CPU."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    out = [model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0)


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512, device: str | torch.device | None = None) -> torch.Tensor:
    """Predicted labels (argmax of :func:`predict_logits`)."""
    return predict_logits(model, x, batch_size, device).argmax(1)


def accuracy(pred: ArrayLike, y: ArrayLike) -> float:
    """Share of predictions equal to the labels."""
    pred, y = _t(pred), _t(y)
    if len(y) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return (pred == y).float().mean().item()


def per_class_accuracy(pred: ArrayLike, y: ArrayLike, num_classes: int) -> list[float | None]:
    """Accuracy for each class (None for a class with no samples)."""
    pred, y = _t(pred), _t(y)
    return [((pred[y == c] == c).float().mean().item() if (y == c).any() else None) for c in range(num_classes)]


def _attacked(y_true: torch.Tensor, y_target: torch.Tensor) -> torch.Tensor:
    keep = y_true != y_target
    if not keep.any():
        raise ValueError("no triggered sample has a true label different from its target: ASR is undefined")
    return keep


def attack_success_rate(pred: ArrayLike, y_true: ArrayLike, y_target: ArrayLike) -> float:
    """Share of triggered samples classified as the attacker's target, over samples whose true label differs
    from the target (a target-class image classified as the target is no success)."""
    pred, y_true, y_target = _t(pred), _t(y_true), _t(y_target)
    keep = _attacked(y_true, y_target)
    return (pred[keep] == y_target[keep]).float().mean().item()


def clean_target_rate(clean_pred: ArrayLike, clean_y: ArrayLike, y_true: ArrayLike, y_target: ArrayLike,
                      num_classes: int) -> float | None:
    """How often the model sends *unstamped* images to the targets of a probe: its ASR if the trigger did nothing.

    For every attacked probe sample (true label different from the target), the share of clean images of its
    true class that the model predicts as its target, averaged over the samples: the expected value of
    :func:`attack_success_rate` for a trigger with no effect beyond the model's ordinary confusion. It needs
    no pairing of triggered and clean images, so user-supplied probe files get it too. Samples whose true
    class has no clean image are left out; ``None`` when that leaves none.
    """
    clean_pred, clean_y, y_true, y_target = _t(clean_pred), _t(clean_y), _t(y_true), _t(y_target)
    keep = _attacked(y_true, y_target)
    confusion = torch.zeros(num_classes, num_classes).index_put_((clean_y, clean_pred), torch.ones(len(clean_y)),
                                                                 accumulate=True)
    per_class = confusion.sum(1)
    y_true, y_target = y_true[keep], y_target[keep]
    known = per_class[y_true] > 0
    if not known.any():
        return None
    rates = confusion[y_true, y_target] / per_class[y_true].clamp(min=1)
    return rates[known].mean().item()


def robust_accuracy(pred: ArrayLike, y_true: ArrayLike, y_target: ArrayLike) -> float:
    """Share of triggered samples classified as their true label (label-correction rate), over the same
    samples as :func:`attack_success_rate`."""
    pred, y_true, y_target = _t(pred), _t(y_true), _t(y_target)
    keep = _attacked(y_true, y_target)
    return (pred[keep] == y_true[keep]).float().mean().item()
