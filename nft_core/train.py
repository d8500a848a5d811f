"""A small supervised trainer, used to build backdoored candidate models offline for demos, tests and
benchmarks (the attacker's side: poison a share of the training set, train normally).

Recipe (the torchvision classification reference, shortened): per-sample RandomCrop(pad 4) + horizontal
flip, SGD with Nesterov momentum 0.9 and weight decay, a OneCycle learning-rate schedule per step, plain
cross-entropy.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from nft_core.progress import bar as progress_bar

from nft_core.attacks import Attack, CleanLabel
from nft_core.batches import CROP_PADDING, DeviceBatches, conv_layout
from nft_core.data import ImageData
from nft_core.models import Normalized, SmallCNN, build_model
from nft_core.purify import resolve_device


def train_one_epoch(model: nn.Module, batches: DeviceBatches, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, float]:
    """One pass over ``batches``; returns mean loss and training accuracy (read from the device once)."""
    model.train()
    device = batches.device
    amp = device.type == "cuda"  # bf16 autocast
    memory_format = conv_layout(device)
    sums = torch.zeros(2, device=device)  # summed loss, correct predictions
    seen = 0
    for x, y in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x.contiguous(memory_format=memory_format))
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        sums += torch.stack([loss.detach() * len(y), (logits.argmax(1) == y).sum()])
        seen += len(y)
    loss_sum, correct = sums.tolist()
    return {"loss": loss_sum / seen, "train_acc": correct / seen}


def train_classifier(model: nn.Module, data: ImageData, *, epochs: int, lr: float = 0.05, batch_size: int = 128,
                     weight_decay: float = 5e-4, seed: int = 0, device: str = "auto", augment: bool = True,
                     flip: bool = True, progress: bool = True) -> list[dict[str, float]]:
    """Train ``model`` (taking images in [0, 1]) on ``data`` in place; it ends in eval mode on the CPU.

    Args:
        model: the classifier, e.g. ``Normalized(SmallCNN())``.
        data: training images and labels.
        epochs: passes over the data (>= 1).
        lr: peak learning rate of the OneCycle schedule.
        batch_size: samples per step.
        weight_decay: L2 weight decay of SGD.
        seed: seeds weight-independent randomness (shuffling, augmentation).
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda:0"``, ...
        augment: per-sample random crop (padding 4) and, with ``flip``, horizontal flip.
        flip: include the horizontal flip (off for classes that are not mirror-symmetric, e.g. road signs).
        progress: show a tqdm bar over epochs.

    Returns:
        One dict per epoch: epoch, loss, train_acc, lr (at the epoch's end), time_s.

    Raises:
        ValueError: ``epochs`` below 1 or empty ``data``.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if len(data) == 0:
        raise ValueError("cannot train on an empty dataset")
    dev = resolve_device(device)
    torch.manual_seed(seed)
    batches = DeviceBatches(data.dataset(), batch_size, device=dev, seed=seed, padding=CROP_PADDING if augment else 0,
                            flip=augment and flip)
    # torch's Module.to overloads omit memory_format beside a device; at runtime _parse_to takes both together
    model.to(dev, memory_format=conv_layout(dev))  # type: ignore[call-overload]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * len(batches),
                                                    pct_start=0.25)
    history: list[dict[str, float]] = []
    bar = progress_bar(range(epochs), desc="train", disable=not progress)
    for epoch in bar:
        start = time.perf_counter()
        stats = train_one_epoch(model, batches, optimizer, scheduler)
        history.append({"epoch": epoch + 1, **stats, "lr": float(scheduler.get_last_lr()[0]),
                        "time_s": time.perf_counter() - start})
        bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['train_acc']:.3f}")
    model.to("cpu", memory_format=torch.contiguous_format).eval()  # type: ignore[call-overload]  # as above
    return history


def channel_stats(data: ImageData) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of ``data``'s images in [0, 1]."""
    x = data.images()
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()


def make_backdoored_candidate(data: ImageData, attack: Attack, *, builder: str = "small_cnn",
                              builder_kwargs: dict[str, Any] | None = None, poison_rate: float = 0.1,
                              epochs: int = 8, lr: float = 0.05, seed: int = 0,
                              mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                              surrogate_epochs: int = 2, device: str = "auto", flip: bool = True,
                              progress: bool = True) -> tuple[Normalized, dict[str, Any]]:
    """Poison ``data`` with ``attack`` and train a fresh model on it (BadNets-style data poisoning).

    Args:
        data: the clean training set.
        attack: the trigger, target and label mapping (:func:`nft_core.attacks.make_attack`).
        builder: architecture name for :func:`nft_core.models.build_model`.
        builder_kwargs: extra constructor arguments; ``num_classes`` defaults to ``data.num_classes``.
        poison_rate: share of the training set poisoned (see :meth:`Attack.poison`).
        epochs: training epochs.
        lr: peak learning rate.
        seed: seeds poisoning, weight initialisation and training.
        mean: per-channel input mean of the :class:`Normalized` wrapper; default: computed from ``data``.
        std: per-channel input standard deviation; default: computed from ``data``.
        surrogate_epochs: for :class:`~nft_core.attacks.CleanLabel`, epochs of a clean surrogate SmallCNN
            (width 16) whose PGD perturbations make the poisoned images' natural features hard to use
            (Turner et al., 2019); 0 poisons with the trigger alone.
        device: training device (``"auto"``: CUDA when present).
        flip: horizontal flips in the training augmentation (off for classes that are not mirror-symmetric).
        progress: show a progress bar.

    Returns:
        The trained ``Normalized`` model (CPU, eval mode) and an info dict: attack, target, mode,
        poison_rate, poisoned (count), history, wall_time_s, mean, std.
    """
    start = time.perf_counter()
    if mean is None or std is None:
        mean, std = channel_stats(data)
    if isinstance(attack, CleanLabel) and surrogate_epochs > 0:
        torch.manual_seed(seed)
        surrogate = Normalized(SmallCNN(num_classes=data.num_classes, width=16), mean, std)
        train_classifier(surrogate, data, epochs=surrogate_epochs, lr=lr, seed=seed, device=device,
                         flip=flip, progress=progress)
        poisoned, index = attack.poison(data, poison_rate, seed=seed, surrogate=surrogate)
    else:
        poisoned, index = attack.poison(data, poison_rate, seed=seed)
    torch.manual_seed(seed)
    kwargs = {"num_classes": data.num_classes, **(builder_kwargs or {})}
    model = Normalized(build_model(builder, **kwargs), mean, std)
    history = train_classifier(model, poisoned, epochs=epochs, lr=lr, seed=seed, device=device, flip=flip,
                               progress=progress)
    info = {"attack": attack.name, "target": attack.target, "mode": attack.mode, "poison_rate": poison_rate,
            "poisoned": len(index), "history": history, "wall_time_s": time.perf_counter() - start,
            "mean": list(mean), "std": list(std)}
    return model, info
