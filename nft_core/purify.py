"""Neural mask Fine-Tuning (NFT): Karim, Al Arafat, Khalid, Guo, Rahnavard, "Augmented Neural Fine-Tuning for
Efficient Backdoor Purification", ECCV 2024 (supplementary Sec. 2.2 for the implementation details).

Algorithm (one call of :func:`purify`):

1. Copy the candidate and attach a scalar mask m = 1 to every neuron (:mod:`nft_core.masks`); freeze all
   weights, so only masks train. Layers l = 1..L are counted in forward order; the first is left unmasked.
2. Each step, take a clean batch (per-sample crop/flip; one pass over the clean set per epoch, or a fixed number
   of batches drawn with replacement, as the authors' code does), optionally replace a share by untargeted PGD
   examples with their true labels (NFT-Adv), and mix it (MixUp: lambda ~ Beta(a, a), soft labels).
3. Minimise  CE(f_m(x_mix), y_mix) + eta * sum |m - 1|,  eta = eta_c / N_s  (N_s: clean samples per class),
   with SGD (lr 0.05, momentum 0.95, optional per-step cosine decay).
4. After every step clip the masks of layer l to [mu(l), 1], mu(l) = alpha * exp(-beta * l) by default
   (:mod:`nft_core.schedule`).
5. Return the masked model; :func:`nft_core.fold.fold_masks` folds the masks into the weights.

Training runs through :func:`nft_core.loop.train_epochs`, as every baseline's. With ``checkpoint=path`` the full
training state (model incl. masks and BN statistics, optimiser, scheduler, RNG states, batch stream, history) is
written atomically to ``path`` after every epoch, and a rerun with the same path resumes from it and ends with
the same masks as an uninterrupted run. The checkpoint is bound to what it was made from by
:func:`~nft_core.loop.fingerprint` (sha256 of the candidate's weights, the clean images and labels, and the
config): a checkpoint of another candidate, clean set or config is never resumed (:class:`StaleCheckpoint`, or a
fresh start with ``stale_checkpoint="restart"``).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from nft_core.adversarial import pgd_untargeted
from nft_core.augment import make_mixer, soft_cross_entropy
from nft_core.batches import CROP_PADDING, DeviceBatches, conv_layout
from nft_core.config import NFTConfig
from nft_core.loop import (CHECKPOINT_FORMAT, Checkpoint, StaleCheckpoint, StalePolicy, fingerprint, set_norm_mode,
                           train_epochs)
from nft_core.masks import MaskedLayer, attach_masks, clamp_masks, mask_l1_distance, mask_modules, mask_parameters
from nft_core.schedule import mask_lower_bounds

log = logging.getLogger(__name__)


@dataclass
class PurifyResult:
    """What :func:`purify` returns.

    Attributes:
        model: the candidate copy with masks attached (on the CPU, eval mode). Fold it before saving.
        history: one dict per epoch: epoch, loss, ce, reg, lr, mask_min, mask_mean, frac_at_lower_bound.
        layers: the masked layers, in forward order.
        lower_bounds: mu(l) for each masked layer.
        eta: the regulariser weight used (eta_c / N_s).
        samples_per_class: N_s.
        trainable_params / total_params: masks vs. all parameters of the model.
        wall_time_s: seconds spent training (all runs of a resumed purification added up).
        device: the device it ran on.
    """

    model: nn.Module
    history: list[dict[str, float]]
    layers: list[MaskedLayer]
    lower_bounds: list[float]
    eta: float
    samples_per_class: float
    trainable_params: int
    total_params: int
    wall_time_s: float
    device: str
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def dataset_labels(dataset: Dataset[Any]) -> torch.Tensor:
    """All labels of a ``(image, label)`` dataset (read directly from a TensorDataset)."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None:
        return torch.as_tensor(tensors[1]).long()
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)  # type: ignore[arg-type]


def _mask_stats(model: nn.Module, lower_bounds: list[float]) -> dict[str, float]:
    masks = mask_modules(model)
    values = torch.cat([m.mask.detach().float().cpu() for _, m in masks])
    at_lb = torch.cat([(m.mask.detach().cpu() <= lower_bounds[m.layer_index - 1] + 1e-6) for _, m in masks])
    return {"mask_min": values.min().item(), "mask_mean": values.mean().item(),
            "frac_at_lower_bound": at_lb.float().mean().item()}


def purify(model: nn.Module, clean_data: Dataset[Any], config: NFTConfig = NFTConfig(), *,
           num_classes: int | None = None, checkpoint: str | Path | None = None,
           stale_checkpoint: StalePolicy = "error") -> PurifyResult:
    """Purify ``model`` with NFT on ``clean_data``; ``model`` itself is not modified.

    Args:
        model: classifier taking images in [0, 1] (wrap with :class:`nft_core.models.Normalized` if needed).
        clean_data: dataset of ``(image CHW float in [0, 1], int label)``; one sample per class suffices.
        config: hyper-parameters (defaults are the paper's).
        num_classes: number of classes; default: the model's output width.
        checkpoint: file to write the training state to after every epoch and to resume from if present.
        stale_checkpoint: what to do with a checkpoint made from another model, clean set or config: raise
            :class:`StaleCheckpoint` (``"error"``) or discard it and start over (``"restart"``, logged).

    Raises:
        ValueError: empty clean set, labels outside [0, num_classes).
        StaleCheckpoint: a checkpoint from another setup, with ``stale_checkpoint="error"``.
    """
    if len(clean_data) == 0:  # type: ignore[arg-type]
        raise ValueError("clean_data is empty: NFT needs at least one clean sample per class")
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    phase = (Checkpoint(Path(checkpoint), config, stale_checkpoint).phase("train", model, clean_data)
             if checkpoint is not None else None)
    model = copy.deepcopy(model).to(device)
    example = clean_data[0][0].unsqueeze(0).to(device)
    with torch.no_grad():
        model.eval()
        out_classes = model(example).shape[-1]
    num_classes = num_classes or out_classes
    labels = dataset_labels(clean_data)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"clean labels span [{labels.min().item()}, {labels.max().item()}] "
                         f"but the model has {num_classes} classes")
    samples_per_class = len(labels) / num_classes
    eta = config.eta_c / samples_per_class

    layers = attach_masks(model, config.placement, example, skip_first=config.skip_first)
    bounds = mask_lower_bounds(len(layers), config.schedule, config.schedule_alpha, config.schedule_beta)
    params = mask_parameters(model)
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in model.parameters())
    log.info("NFT: %d masks in %d layers (%.2f%% of %d parameters), eta=%.3g, N_s=%.1f, device=%s",
             trainable, len(layers), 100 * trainable / total, total, eta, samples_per_class, device)

    optimizer = torch.optim.SGD([{"params": params, "weight_decay": 0.0}], lr=config.lr, momentum=config.momentum)
    loader = DeviceBatches(clean_data, config.batch_size, device=device, seed=config.seed,
                           padding=CROP_PADDING if config.crop_flip else 0, flip=config.crop_flip and config.flip,
                           steps_per_epoch=config.steps_per_epoch)
    total_steps = config.epochs * len(loader)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=config.lr_min)
                 if config.lr_schedule == "cosine" else torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0))
    mixer = make_mixer(config.mix, config.mix_alpha, num_classes)
    amp = config.amp and device.type == "cuda"
    memory_format = conv_layout(device)  # the model goes back to the standard layout at the end
    model.to(memory_format=memory_format)

    def adversarial(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_adv = round(config.adv_share * len(x))
        if n_adv:
            x = torch.cat([pgd_untargeted(model, x[:n_adv], y[:n_adv], config.adv_eps, config.adv_steps), x[n_adv:]])
        return x, y

    def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        x, y_soft = mixer(x, y)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x.contiguous(memory_format=memory_format))
        ce = soft_cross_entropy(logits, y_soft)
        reg = mask_l1_distance(model)
        loss = ce + eta * reg
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        clamp_masks(model, bounds)
        return {"loss": loss.detach(), "ce": ce.detach(), "reg": reg.detach()}

    trained = train_epochs(model, loader, step, config.epochs, optimizers=[optimizer], schedulers=[scheduler],
                           bn_mode=config.bn_mode, desc="NFT", progress=config.progress,
                           batch_hook=adversarial if config.adv_share > 0 else None,
                           epoch_hook=lambda m: _mask_stats(m, bounds), checkpoint=phase)
    model.to(memory_format=torch.contiguous_format)
    return PurifyResult(model=model.cpu(), history=trained.history, layers=layers, lower_bounds=bounds, eta=eta,
                        samples_per_class=samples_per_class, trainable_params=trainable, total_params=total,
                        wall_time_s=trained.wall_time_s, device=str(device))


__all__ = ["CHECKPOINT_FORMAT", "PurifyResult", "StaleCheckpoint", "dataset_labels", "fingerprint", "purify",
           "resolve_device", "set_norm_mode"]
