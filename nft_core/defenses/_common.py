"""Shared pieces of the baseline purifiers: the working copy, data loading, SGD, plain fine-tuning, evaluation
and the result type. Every baseline trains through :func:`nft_core.loop.train_epochs` (FT, FP, PBE and FIP via
:func:`fine_tune`), as NFT does; they differ only in the step function and what they do before/after.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from nft_core.batches import CROP_PADDING, DeviceBatches, conv_layout
from nft_core.config import TrainSettings
from nft_core.loop import BatchHook, Checkpoint, PhaseCheckpoint, StepFn, train_epochs
from nft_core.purify import dataset_labels, resolve_device

#: a loss ``(model, images, labels) -> 0-d tensor``
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Prepared:
    """A purifier's working copy of the candidate and facts about the clean set."""

    model: nn.Module
    device: torch.device
    example: torch.Tensor
    num_classes: int
    labels: torch.Tensor


def prepare(model: nn.Module, data: Dataset[Any], device: str, seed: int) -> Prepared:
    """Deep-copy ``model`` to the device (in the standard memory layout where :func:`~nft_core.batches.conv_layout`
    asks for it: a channels-last candidate would make the CPU convolutions channels-last, which oneDNN can crash
    on), seed torch, read num_classes from the model's output and check labels.

    Raises:
        ValueError: empty data or labels outside the model's classes.
    """
    if len(data) == 0:  # type: ignore[arg-type]
        raise ValueError("clean_data is empty: a purifier needs at least one clean sample per class")
    dev = resolve_device(device)
    torch.manual_seed(seed)
    work = copy.deepcopy(model).to(dev)
    if conv_layout(dev) == torch.contiguous_format:
        work.to(memory_format=torch.contiguous_format)
    example = data[0][0].unsqueeze(0).to(dev)
    with torch.no_grad():
        work.eval()
        num_classes = work(example).shape[-1]
    labels = dataset_labels(data)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"clean labels span [{labels.min().item()}, {labels.max().item()}] "
                         f"but the model has {num_classes} classes")
    return Prepared(work, dev, example, num_classes, labels)


def phase_checkpoint(checkpoint: Checkpoint | None, phase: str, start: nn.Module, data: Dataset[Any], *,
                     own_file: bool = False) -> PhaseCheckpoint | None:
    """:meth:`Checkpoint.phase <nft_core.loop.Checkpoint.phase>`, or None without a checkpoint."""
    return checkpoint.phase(phase, start, data, own_file=own_file) if checkpoint is not None else None


def make_loader(data: Dataset[Any], batch_size: int, seed: int, augment: bool, device: torch.device, *,
                flip: bool = True) -> DeviceBatches:
    """Batches of ``data`` on ``device``, reshuffled every epoch (seeded), with per-sample random crop (padding 4)
    and, with ``flip``, horizontal flip when ``augment``."""
    return DeviceBatches(data, batch_size, device=device, seed=seed, padding=CROP_PADDING if augment else 0,
                         flip=augment and flip)


def make_sgd(params: Iterable[nn.Parameter], lr: float, momentum: float, weight_decay: float,
             schedule: str, total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD over ``params`` and a per-step cosine (to 0) or constant schedule."""
    opt = torch.optim.SGD(list(params), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
             if schedule == "cosine" else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    return opt, sched


def sgd_step(optimizer: torch.optim.Optimizer, loss_fn: LossFn, after_step: Callable[[], None] | None = None) -> StepFn:
    """A step function: ``loss_fn(model, x, y)``, backward, optimiser step, then ``after_step()``."""

    def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
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


def fine_tune(model: nn.Module, data: Dataset[Any], cfg: TrainSettings, device: torch.device, *,
              loss_fn: LossFn = cross_entropy_loss, after_step: Callable[[], None] | None = None, desc: str = "FT",
              batch_hook: BatchHook | None = None, epochs: int | None = None,
              checkpoint: PhaseCheckpoint | None = None) -> list[dict[str, float]]:
    """Plain SGD fine-tuning of all trainable parameters of ``model`` in place with ``cfg``'s settings, one
    phase of :func:`~nft_core.loop.train_epochs` (checkpointed after every epoch with ``checkpoint``)."""
    epochs = cfg.epochs if epochs is None else epochs
    loader = make_loader(data, cfg.batch_size, cfg.seed, cfg.crop_flip, device, flip=cfg.flip)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = make_sgd(params, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.lr_schedule, epochs * len(loader))
    return train_epochs(model, loader, sgd_step(opt, loss_fn, after_step), epochs, optimizers=[opt],
                        schedulers=[sched], bn_mode=cfg.bn_mode, desc=desc, progress=cfg.progress,
                        batch_hook=batch_hook, checkpoint=checkpoint).history


@torch.no_grad()
def clean_accuracy(model: nn.Module, data: Dataset[Any], device: torch.device, batch_size: int = 256) -> float:
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
        history: per-epoch logs.
        extra: method-specific facts (pruned neurons, selected samples, ...).
        unfolded: the model as trained, its reparametrizations still attached (NFT: the masked model, CPU, eval
            mode; :func:`nft_core.reparam.describe` lists them), or None for a method that ends folded.
    """

    model: nn.Module
    wall_time_s: float
    history: list[dict[str, float]]
    extra: dict[str, Any]
    unfolded: nn.Module | None = None
