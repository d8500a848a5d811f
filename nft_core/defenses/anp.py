"""Adversarial Neuron Pruning (ANP): Wu & Wang, "Adversarial Neuron Perturbations Remove Backdoors", NeurIPS 2021.

Backdoor neurons are the ones whose small multiplicative perturbation changes the output most. ANP learns a
mask m in [0, 1] per neuron (channel of every normalisation layer, as in the authors' code) under adversarial
neuron perturbations, and prunes the neurons whose mask ends low.

1. Copy the candidate and attach, with ``torch.nn.utils.parametrize`` through :mod:`nft_core.reparam` (no model
   code copied), to every norm layer's scale gamma the parametrization gamma * (m + delta)
   (:class:`~nft_core.reparam.PerturbedMask`) and to its shift beta the parametrization beta * (1 + xi)
   (:class:`~nft_core.reparam.ShiftNoise`); m starts at 1, delta and xi are the neuron perturbations, active
   only when switched on.
2. For each clean batch (``iterations`` rounded up to whole passes over the clean set, model in train mode as in
   the authors' code):
   a. perturbation: draw delta, xi ~ U(-eps, eps), then take ``pgd_steps`` SGD ascent steps of size
      eps / steps on CE(f_{m, delta, xi}(x), y), clipping delta, xi to [-eps, eps];
   b. mask: minimise alpha * CE(f_m(x), y) + (1 - alpha) * CE(f_{m, delta, xi}(x), y) w.r.t. m with SGD
      (lr 0.2, momentum 0.9), then clip m to [0, 1].
3. Prune on a fresh copy of the candidate: gamma_c <- 0 for every neuron with m_c < ``threshold`` (or the
   ``prune_count`` neurons with the smallest masks). The threshold is fixed in advance (authors' default 0.2)
   and never tuned on test ASR. The result has the candidate's architecture and keys.

Paper settings: eps 0.4, one perturbation step, alpha 0.2, mask lr 0.2, 2000 iterations of batch 128 (the NFT
supplement's "500 epochs" of a 500-sample clean set at batch 128 is the same 2000 iterations; it quotes
lr 0.02, the ANP code uses 0.2).

Checkpoints: the mask optimisation runs as epochs of one pass over the clean set (``ceil(iterations / batches
per pass)`` of them) through :func:`nft_core.loop.train_epochs`, so it is checkpointed, and resumed, at the end of
every pass, never inside one; the pruning of step 3 is recomputed from the restored masks.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from nft_core.config import ANPConfig
from nft_core.defenses._common import DefenseResult, make_loader, phase_checkpoint, prepare
from nft_core.loop import Checkpoint, StepFn, train_epochs
from nft_core.masks import clamp_masks, forward_order, mask_modules, mask_parameters
from nft_core.reparam import PerturbedMask, ShiftNoise, attach, detach


def attach_perturbations(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Attach :class:`~nft_core.reparam.PerturbedMask` / :class:`~nft_core.reparam.ShiftNoise` to every affine norm
    layer (all or none); freeze all else.

    Returns:
        The names of the perturbed layers, in forward order.

    Raises:
        ValueError: the model has no affine normalisation layer.
    """
    names = forward_order(model, "norm", example)
    if not names:
        raise ValueError("ANP needs normalisation layers with an affine scale (BatchNorm/LayerNorm/GroupNorm)")
    modules = dict(model.named_modules())
    scales = attach(model, "perturbed_mask", "weight", names)
    with_shift = [(r.module, r.layer_index) for r in scales if getattr(modules[r.module], "bias", None) is not None]
    try:
        attach(model, "shift_noise", "bias", [n for n, _ in with_shift], layer_indices=[i for _, i in with_shift])
    except Exception:
        detach(model, scales)
        raise
    trainable = {id(p) for m in model.modules() if isinstance(m, (PerturbedMask, ShiftNoise)) for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    return names


def _perturbations(model: nn.Module) -> list[PerturbedMask | ShiftNoise]:
    return [m for m in model.modules() if isinstance(m, (PerturbedMask, ShiftNoise))]


def anp_step(config: ANPConfig, mask_opt: torch.optim.Optimizer, noise_opt: torch.optim.Optimizer) -> StepFn:
    """A step function doing steps 2a-2b of the module docstring on one batch."""

    def set_perturbed(model: nn.Module, on: bool) -> None:
        for m in _perturbations(model):
            m.perturbed = on

    def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        rob = torch.zeros((), device=x.device)
        if config.eps > 0:
            with torch.no_grad():
                for m in _perturbations(model):
                    m.noise.uniform_(-config.eps, config.eps)
            set_perturbed(model, True)
            for _ in range(config.pgd_steps):
                noise_opt.zero_grad(set_to_none=True)
                (-F.cross_entropy(model(x).float(), y)).backward()
                noise_opt.step()
                with torch.no_grad():
                    for m in _perturbations(model):
                        m.noise.clamp_(-config.eps, config.eps)
            rob = F.cross_entropy(model(x).float(), y)
        set_perturbed(model, False)
        nat = F.cross_entropy(model(x).float(), y)
        loss = config.alpha * nat + (1 - config.alpha) * rob
        mask_opt.zero_grad(set_to_none=True)
        noise_opt.zero_grad(set_to_none=True)
        loss.backward()
        mask_opt.step()
        clamp_masks(model, [0.0] * len(mask_modules(model)))
        return {"loss": loss.detach(), "nat": nat.detach(), "rob": rob.detach()}

    return step


def run(model: nn.Module, clean_data: Dataset[Any], config: ANPConfig,
        checkpoint: Checkpoint | None = None) -> DefenseResult:
    """ANP on a copy of ``model`` (see module docstring); the mask optimisation is checkpointed as phase
    ``"masks"`` after every pass over the clean set."""
    t0 = time.perf_counter()
    prep = prepare(model, clean_data, config.device, config.seed)
    work = copy.deepcopy(prep.model)
    names = attach_perturbations(work, prep.example)
    masks = mask_parameters(work)
    noises = [m.noise for m in _perturbations(work)]
    mask_opt = torch.optim.SGD(masks, lr=config.mask_lr, momentum=config.mask_momentum)
    noise_opt = torch.optim.SGD(noises, lr=config.eps / config.pgd_steps if config.eps > 0 else 1.0)
    loader = make_loader(clean_data, config.batch_size, config.seed, config.crop_flip, prep.device,
                         flip=config.flip)
    epochs = math.ceil(config.iterations / len(loader))
    history = train_epochs(work, loader, anp_step(config, mask_opt, noise_opt), epochs,
                           optimizers=[mask_opt, noise_opt], bn_mode=config.bn_mode, desc="ANP",
                           progress=config.progress,
                           checkpoint=phase_checkpoint(checkpoint, "masks", work, clean_data)).history

    values = {name: m.mask.detach().cpu() for name, (_, m) in zip(names, mask_modules(work))}
    flat = torch.cat(list(values.values()))
    if config.prune_count is not None:
        cut = flat.sort().values[min(config.prune_count, len(flat)) - 1].item() if config.prune_count else -1.0
        prune = {n: v <= cut for n, v in values.items()}
    else:
        prune = {n: v < config.threshold for n, v in values.items()}
    modules = dict(prep.model.named_modules())
    with torch.no_grad():
        for name, drop in prune.items():
            modules[name].weight[drop.to(prep.device)] = 0
    per_layer = {n: int(d.sum()) for n, d in prune.items() if d.any()}
    extra = {"neurons": int(len(flat)), "pruned": int(sum(per_layer.values())), "pruned_per_layer": per_layer,
             "mask_min": flat.min().item(), "mask_mean": flat.mean().item(), "iterations": epochs * len(loader),
             "masks": {n: v.tolist() for n, v in values.items()}}
    return DefenseResult(prep.model.cpu().eval(), time.perf_counter() - t0, history, extra)
