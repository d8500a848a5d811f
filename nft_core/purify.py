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

With ``checkpoint=path`` the full training state (model incl. masks and BN statistics, optimiser, scheduler,
RNG states, history) is written atomically after every epoch, and a rerun with the same path resumes from
it and ends with the same masks as an uninterrupted run. The checkpoint is bound to what it was made from by a
fingerprint (sha256 of the candidate's weights, the clean images and labels, and the config): a checkpoint of
another candidate, clean set or config is never resumed (:class:`StaleCheckpoint`, or a fresh start with
``stale_checkpoint="restart"``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from nft_core.adversarial import pgd_untargeted
from nft_core.augment import make_mixer, soft_cross_entropy
from nft_core.batches import CROP_PADDING, DeviceBatches, conv_layout
from nft_core.config import NFTConfig
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


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """All labels of a ``(image, label)`` dataset (read directly from a TensorDataset)."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None:
        return torch.as_tensor(tensors[1]).long()
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)  # type: ignore[arg-type]


def set_norm_mode(model: nn.Module, bn_mode: str) -> None:
    """Model in eval mode, then BatchNorm layers in train mode when ``bn_mode == "train"``."""
    model.eval()
    if bn_mode == "train":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()


def _mask_stats(model: nn.Module, lower_bounds: list[float]) -> dict[str, float]:
    masks = mask_modules(model)
    values = torch.cat([m.mask.detach().float().cpu() for _, m in masks])
    at_lb = torch.cat([(m.mask.detach().cpu() <= lower_bounds[m.layer_index - 1] + 1e-6) for _, m in masks])
    return {"mask_min": values.min().item(), "mask_mean": values.mean().item(),
            "frac_at_lower_bound": at_lb.float().mean().item()}


#: the layout of a checkpoint's training state; part of the fingerprint, so a checkpoint written by a version
#: that saved another state (2: the batch stream of :class:`~nft_core.batches.DeviceBatches`) is never resumed
CHECKPOINT_FORMAT = 2


class StaleCheckpoint(ValueError):
    """A checkpoint written for another candidate, clean set or config."""


def fingerprint(model: nn.Module, clean_data: Dataset, config: NFTConfig) -> str:
    """sha256 binding a checkpoint to its inputs: the model's state (weights and buffers, by name), every clean
    image and label in order, the config (without ``progress``, which changes nothing) and
    :data:`CHECKPOINT_FORMAT`."""
    settings = {k: v for k, v in config.to_dict().items() if k != "progress"}
    digest = hashlib.sha256(json.dumps({**settings, "checkpoint_format": CHECKPOINT_FORMAT},
                                       sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    tensors = getattr(clean_data, "tensors", None)
    samples = [tensors] if tensors is not None else (clean_data[i] for i in range(len(clean_data)))  # type: ignore[arg-type]
    for sample in samples:
        for part in sample:
            t = torch.as_tensor(part).detach().cpu().contiguous()
            digest.update(str(t.dtype).encode())
            digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def purify(model: nn.Module, clean_data: Dataset, config: NFTConfig = NFTConfig(), *,
           num_classes: int | None = None, checkpoint: str | Path | None = None,
           stale_checkpoint: Literal["error", "restart"] = "error") -> PurifyResult:
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
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    key = fingerprint(model, clean_data, config) if ckpt_path is not None else None
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

    history: list[dict[str, float]] = []
    start_epoch, previous_time = 0, 0.0
    state = None
    if ckpt_path is not None and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        if state.get("fingerprint") != key:
            message = (f"checkpoint {ckpt_path} was written for another candidate, clean set or config "
                       f"(fingerprint {str(state.get('fingerprint'))[:12]}, this run {str(key)[:12]})")
            if stale_checkpoint == "error":
                raise StaleCheckpoint(f"{message}; delete it to start over")
            log.warning("NFT: %s; not resuming it, starting over", message)
            state = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        loader.load_state_dict(state["batches"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        history, start_epoch, previous_time = state["history"], state["epoch"], state["wall_time_s"]
        log.info("NFT: resumed from %s at epoch %d/%d", ckpt_path, start_epoch, config.epochs)

    t0 = time.perf_counter()
    bar = tqdm(range(start_epoch, config.epochs), desc="NFT", unit="epoch", disable=not config.progress,
               initial=start_epoch, total=config.epochs)
    for epoch in bar:
        set_norm_mode(model, config.bn_mode)
        sums = torch.zeros(3, device=device)  # loss, ce, reg: summed on the device, read once per epoch
        for x, y in loader:
            n_adv = round(config.adv_share * len(x))
            if n_adv:
                x = torch.cat([pgd_untargeted(model, x[:n_adv], y[:n_adv], config.adv_eps, config.adv_steps), x[n_adv:]])
                set_norm_mode(model, config.bn_mode)
            x, y_soft = mixer(x, y)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x.contiguous(memory_format=memory_format))
            ce = soft_cross_entropy(logits, y_soft)
            reg = mask_l1_distance(model)
            loss = ce + eta * reg
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            clamp_masks(model, bounds)
            sums += torch.stack([loss, ce, reg]).detach()
        means = (sums / len(loader)).tolist()
        row = {"epoch": epoch + 1, "loss": means[0], "ce": means[1], "reg": means[2],
               "lr": optimizer.param_groups[0]["lr"], **_mask_stats(model, bounds)}
        if not math.isfinite(row["loss"]):
            raise FloatingPointError(f"NFT loss became {row['loss']} at epoch {epoch + 1}; lower the learning rate")
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", mask_mean=f"{row['mask_mean']:.3f}")
        if ckpt_path is not None:
            _atomic_save({"epoch": epoch + 1, "fingerprint": key, "config": config.to_dict(), "n_clean": len(labels),
                          "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), "rng_cpu": torch.get_rng_state(),
                          "batches": loader.state_dict(),
                          "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                          "history": history, "wall_time_s": previous_time + time.perf_counter() - t0}, ckpt_path)
    wall = previous_time + time.perf_counter() - t0

    model.eval()
    model.to(memory_format=torch.contiguous_format)
    return PurifyResult(model=model.cpu(), history=history, layers=layers, lower_bounds=bounds, eta=eta,
                        samples_per_class=samples_per_class, trainable_params=trainable, total_params=total,
                        wall_time_s=wall, device=str(device))
