"""Fine-Pruning (FP): Liu, Dolan-Gavitt, Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep
Neural Networks", RAID 2018.

Backdoor neurons tend to be dormant on clean inputs; FP removes the least active channels of the last
convolutional layer, then fine-tunes.

1. Run the clean set through a copy of the candidate and record the mean activation of every channel of the
   last convolutional stage, taken where it enters the classifier head (the input of the last ``nn.Linear``:
   the pooled, post-activation feature map). For a CNN with a pool + linear head this is exactly the
   activation of the last conv layer's channels.
2. Prune channels in increasing order of mean activation. Pruning channel c is zeroing column c of the head's
   weight, which removes the channel's every effect on the output while keeping the architecture and the
   state-dict keys. Because the head is linear, the clean accuracy after each pruning is computed from the
   cached features, so the search is cheap.
3. Stop before the clean accuracy (on the clean set) falls more than ``max_acc_drop`` below the unpruned
   model's (Liu et al. stop at a 4 % drop of validation accuracy), or at ``max_prune_ratio`` of the channels;
   with ``prune_ratio`` set, prune exactly that share instead.
4. Fine-tune all weights on the clean set, re-zeroing the pruned columns after every step so they stay pruned.

The fine-tuning epochs and learning rate are not given by the papers (the NFT supplement follows the authors'
Keras implementation); defaults: 20 epochs at lr 0.01 with the FT recipe.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from nft_core.config import FPConfig
from nft_core.defenses._common import DefenseResult, fine_tune, phase_checkpoint, prepare
from nft_core.loop import Checkpoint


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last ``nn.Linear`` in registration order (the classifier head).

    Raises:
        ValueError: the model has no linear layer.
    """
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError("Fine-Pruning needs a model whose head is an nn.Linear on pooled conv features")
    return found[-1]


@torch.no_grad()
def head_features(model: nn.Module, head: nn.Linear, data: Dataset[Any], device: torch.device,
                  batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of ``head`` (N x channels) for every sample of ``data``, and the labels."""
    feats: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, inp, _out: feats.append(inp[0].detach().flatten(1).cpu()))
    labels = []
    try:
        model.eval()
        for x, y in DataLoader(data, batch_size=batch_size):
            model(x.to(device))
            labels.append(torch.as_tensor(y))
    finally:
        hook.remove()
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def prune_order_and_count(features: torch.Tensor, labels: torch.Tensor, head: nn.Linear,
                          config: FPConfig) -> tuple[torch.Tensor, int, list[float]]:
    """Channels sorted by increasing mean activation, how many to prune, and the accuracy curve."""
    order = features.mean(0).argsort()
    w, b = head.weight.detach().cpu().float(), (head.bias.detach().cpu().float() if head.bias is not None else 0.0)
    n = features.shape[1]

    def acc(k: int) -> float:
        keep = torch.ones(n)
        keep[order[:k]] = 0
        return ((features * keep) @ w.T + b).argmax(1).eq(labels).float().mean().item()

    if config.prune_ratio is not None:
        k = int(config.prune_ratio * n)
        return order, k, [acc(0), acc(k)]
    base, limit = acc(0), int(config.max_prune_ratio * n)
    curve, k = [base], 0
    while k < limit:
        a = acc(k + 1)
        if a < base - config.max_acc_drop:
            break
        curve.append(a)
        k += 1
    return order, k, curve


def run(model: nn.Module, clean_data: Dataset[Any], config: FPConfig,
        checkpoint: Checkpoint | None = None) -> DefenseResult:
    """Fine-Pruning on a copy of ``model`` (see module docstring). The fine-tuning of step 4 is checkpointed after
    every epoch as phase ``"train"``; the pruning (steps 1-3, deterministic) is recomputed on a rerun."""
    t0 = time.perf_counter()
    prep = prepare(model, clean_data, config.device, config.seed)
    name, head = last_linear(prep.model)
    features, labels = head_features(prep.model, head, clean_data, prep.device)
    order, k, curve = prune_order_and_count(features, labels, head, config)
    pruned = order[:k].to(prep.device)

    def zero_pruned() -> None:
        with torch.no_grad():
            head.weight[:, pruned] = 0

    zero_pruned()
    for p in prep.model.parameters():
        p.requires_grad_(True)
    history = fine_tune(prep.model, clean_data, config, prep.device, after_step=zero_pruned, desc="FP",
                        checkpoint=phase_checkpoint(checkpoint, "train", prep.model, clean_data))
    extra = {"head": name, "channels": int(features.shape[1]), "pruned": int(k),
             "pruned_channels": pruned.cpu().tolist(), "clean_acc_before_prune": curve[0],
             "clean_acc_after_prune": curve[-1]}
    return DefenseResult(prep.model.cpu().eval(), time.perf_counter() - t0, history, extra)
