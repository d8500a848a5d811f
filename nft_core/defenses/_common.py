"""Shared pieces of the weight fine-tuning purifiers: config base and validation, data loading, one small
epoch loop, evaluation. Every baseline (FT, FP, FT-SAM, PBE, FIP) trains through :func:`run_epochs`; they
differ only in the step function and what they do before/after.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from nft_core.batches import CROP_PADDING, DeviceBatches
from nft_core.config import TrainSettings
from nft_core.purify import dataset_labels, resolve_device, set_norm_mode

#: one optimisation step on a batch (model, images, labels) -> scalar logs, as 0-d tensors left on the device
#: (:func:`run_epochs` reads them once per epoch, so the step loop never waits for the device)
StepFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], Mapping[str, torch.Tensor]]


@dataclass
class Prepared:
    """A purifier's working copy of the candidate and facts about the clean set."""

    model: nn.Module
    device: torch.device
    example: torch.Tensor
    num_classes: int
    labels: torch.Tensor


def prepare(model: nn.Module, data: Dataset, device: str, seed: int) -> Prepared:
    """Deep-copy ``model`` to the device, seed torch, read num_classes from the model's output and check labels.

    Raises:
        ValueError: empty data or labels outside the model's classes.
    """
    if len(data) == 0:  # type: ignore[arg-type]
        raise ValueError("clean_data is empty: a purifier needs at least one clean sample per class")
    dev = resolve_device(device)
    torch.manual_seed(seed)
    work = copy.deepcopy(model).to(dev)
    example = data[0][0].unsqueeze(0).to(dev)
    with torch.no_grad():
        work.eval()
        num_classes = work(example).shape[-1]
    labels = dataset_labels(data)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"clean labels span [{labels.min().item()}, {labels.max().item()}] "
                         f"but the model has {num_classes} classes")
    return Prepared(work, dev, example, num_classes, labels)


def make_loader(data: Dataset, batch_size: int, seed: int, augment: bool, device: torch.device) -> DeviceBatches:
    """Batches of ``data`` on ``device``, reshuffled every epoch (seeded), with per-sample random crop (padding 4)
    and horizontal flip when ``augment``."""
    return DeviceBatches(data, batch_size, device=device, seed=seed, padding=CROP_PADDING if augment else 0,
                         flip=augment)


def make_sgd(params: Iterable[nn.Parameter], lr: float, momentum: float, weight_decay: float,
             schedule: str, total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD over ``params`` and a per-step cosine (to 0) or constant schedule."""
    opt = torch.optim.SGD(list(params), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
             if schedule == "cosine" else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    return opt, sched


def sgd_step(optimizer: torch.optim.Optimizer, loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
             after_step: Callable[[], None] | None = None) -> StepFn:
    """A step function: ``loss_fn(model, x, y)``, backward, optimiser step, then ``after_step()``."""

    def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        loss = loss_fn(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        return {"loss": loss.detach()}

    return step


def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).float(), y)


def run_epochs(model: nn.Module, loader: DeviceBatches, step: StepFn, epochs: int, *, bn_mode: str = "train",
               scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
               desc: str = "train", progress: bool = True,
               batch_hook: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
               ) -> list[dict[str, float]]:
    """The one training loop: ``epochs`` passes of ``step`` over ``loader``; returns per-epoch mean logs.

    Args:
        batch_hook: optional ``(x, y) -> (x, y)`` applied to each batch on the device (e.g. PGD examples).

    Raises:
        FloatingPointError: a non-finite loss.
    """
    history: list[dict[str, float]] = []
    for epoch in tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress):
        set_norm_mode(model, bn_mode)
        sums: dict[str, torch.Tensor] = {}
        for x, y in loader:
            if batch_hook is not None:
                x, y = batch_hook(x, y)
                set_norm_mode(model, bn_mode)
            for k, v in step(model, x, y).items():
                sums[k] = sums[k] + v if k in sums else v.detach().float().clone()
            if scheduler is not None:
                scheduler.step()
        means = (torch.stack(list(sums.values())) / len(loader)).tolist() if sums else []
        row = {"epoch": float(epoch + 1), **dict(zip(sums, means, strict=True))}
        if scheduler is not None:
            row["lr"] = scheduler.get_last_lr()[0]
        if not all(math.isfinite(v) for v in row.values()):
            raise FloatingPointError(f"{desc}: non-finite loss at epoch {epoch + 1} ({row}); lower the learning rate")
        history.append(row)
    model.eval()
    return history


def fine_tune(model: nn.Module, data: Dataset, cfg: TrainSettings, device: torch.device, *,
              loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy_loss,
              after_step: Callable[[], None] | None = None, desc: str = "FT",
              batch_hook: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
              epochs: int | None = None) -> list[dict[str, float]]:
    """Plain SGD fine-tuning of all trainable parameters of ``model`` in place with ``cfg``'s settings."""
    epochs = cfg.epochs if epochs is None else epochs
    loader = make_loader(data, cfg.batch_size, cfg.seed, cfg.crop_flip, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = make_sgd(params, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.lr_schedule, epochs * len(loader))
    return run_epochs(model, loader, sgd_step(opt, loss_fn, after_step), epochs, bn_mode=cfg.bn_mode,
                      scheduler=sched, desc=desc, progress=cfg.progress, batch_hook=batch_hook)


@torch.no_grad()
def clean_accuracy(model: nn.Module, data: Dataset, device: torch.device, batch_size: int = 256) -> float:
    """Accuracy of ``model`` (eval mode) on a ``(image, label)`` dataset."""
    model.eval()
    loader = DataLoader(data, batch_size=batch_size)
    correct = total = 0
    for x, y in loader:
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
        total += len(y)
    return correct / max(total, 1)


@dataclass
class DefenseResult:
    """What every purifier returns.

    Attributes:
        model: a plain module of the candidate's architecture with its exact state-dict keys and shapes (masks
            or parametrizations folded), on the CPU, eval mode.
        wall_time_s: seconds the purification took (setup to folded model, evaluation excluded).
        history: per-epoch (or per-iteration) logs.
        extra: method-specific facts (pruned neurons, selected samples, ...).
    """

    model: nn.Module
    wall_time_s: float
    history: list[dict[str, float]]
    extra: dict[str, Any]
