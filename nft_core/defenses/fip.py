"""Fisher Information guided Purification (FIP): Karim, Al Arafat, Rakin, Guo, Rahnavard, "Fisher Information
guided Purification against Backdoor Attacks", ACM CCS 2024.

What the abstract states: a backdoored model sits in a sharper minimum than a benign one; FIP re-optimises it
towards a smoother minimum with two regularisers built on the Fisher Information Matrix (FIM): one suppresses
the backdoor (smoothness), one retains the clean-data knowledge; Fast FIP tunes far fewer parameters (~5x
faster). The exact equations are not in the text we have, so this module implements the most direct reading,
with standard estimators, and names every choice:

1. Fisher of the candidate (retention weights): the diagonal empirical FIM F0_i = E_x[(d/d theta_i
   CE(f(x), y))^2] at the candidate's parameters theta0, from ``fisher_samples`` clean samples, one at a time
   (per-sample gradients, model in eval mode), normalised to mean 1 so ``eta_r`` is scale-free.
2. Smoothness regulariser: the trace of the FIM at the current parameters, estimated per batch by the squared
   norm of the batch loss gradient ||grad CE||^2 (the trace of the empirical FIM is the expected squared
   gradient norm; a flat minimum has a small one). It is differentiated by double back-propagation.
3. Objective per clean batch (crop/flip):
   CE(f_theta(x), y) + eta_f * ||grad_theta CE||^2 + eta_r * sum_i F0_i (theta_i - theta0_i)^2,
   minimised with SGD (the FT recipe: lr 0.01, momentum 0.9, cosine schedule). The retention term is an
   EWC-style quadratic (Kirkpatrick et al., 2017): parameters important for the clean task move least.
   Its weights are capped (:func:`stable_retention`) at 1 / (2 lr eta_r): the quadratic's curvature along
   theta_i is 2 eta_r F0_i, and SGD with momentum m diverges on a quadratic once lr x curvature exceeds
   2 (1 + m). The empirical Fisher of a real network is far from flat: on a GTSRB ResNet-18 its largest entry
   was 2e4 times its mean (43 images), so lr x curvature reached 40, and uncapped FIP diverged within 2 to 23
   epochs on both GTSRB ResNet-18 candidates, from 43 and from 1,176 images. The cap keeps lr x curvature at 1
   or below, 3.8x inside the bound.
4. Fast FIP (``variant="fast"``): every Conv/Linear weight after the stem is reparametrised with
   ``torch.nn.utils.parametrize`` (:class:`~nft_core.reparam.SpectralDelta`, through :mod:`nft_core.reparam`) as
   W = W0 + U diag(s - s0) V^T (SVD of W0 reshaped to out x in*k*k) and only the singular values s are trained
   (with the same objective, restricted to s); the parametrizations are folded at the end (W <- U diag(s) V^T),
   so the candidate's architecture and keys come back. Trainable parameters drop from all weights to
   sum_l min(out_l, in_l k_l^2).

Defaults (epochs 100, like NFT; eta_f 0.01, eta_r 0.1; fast_lr) are this implementation's, not the paper's.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from nft_core.config import FIPConfig
from nft_core.defenses._common import DefenseResult, LossFn, fine_tune, phase_checkpoint, prepare
from nft_core.loop import Checkpoint
from nft_core.masks import forward_order
from nft_core.reparam import SpectralDelta, attach, fold


def attach_spectral(model: nn.Module, example: torch.Tensor) -> list[nn.Parameter]:
    """Reparametrise every Conv/Linear weight after the first with a :class:`~nft_core.reparam.SpectralDelta`
    (all or none); freeze everything but the singular values, which it returns."""
    names = forward_order(model, "weight", example)[1:]
    if not names:
        raise ValueError("Fast FIP needs Conv/Linear layers after the stem")
    attach(model, "spectral_delta", "weight", names)
    trainable = [m.s for m in model.modules() if isinstance(m, SpectralDelta)]
    ids = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    return trainable


def fold_spectral(model: nn.Module) -> nn.Module:
    """Fold every :class:`~nft_core.reparam.SpectralDelta` into its weight and remove it (in place); all params
    trainable again.

    Raises:
        ValueError: a reparametrized weight also carries another parametrization.
    """
    return fold(model, kinds=("spectral_delta",))


def diagonal_fisher(model: nn.Module, params: list[nn.Parameter], data: Dataset[Any], samples: int,
                    device: torch.device, seed: int) -> list[torch.Tensor]:
    """Diagonal empirical Fisher E[(dCE/dtheta)^2] over ``samples`` random clean samples (eval mode), mean 1."""
    model.eval()
    n = len(data)  # type: ignore[arg-type]
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(samples, n)]
    fisher = [torch.zeros_like(p) for p in params]
    for i in idx.tolist():
        x, y = data[i]
        loss = F.cross_entropy(model(x.unsqueeze(0).to(device)).float(), torch.as_tensor([int(y)], device=device))
        for f, g in zip(fisher, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                f.add_(g.detach() ** 2)
    mean = torch.cat([f.flatten() for f in fisher]).mean().clamp_min(1e-20)
    return [f / mean for f in fisher]


def stable_retention(fisher: list[torch.Tensor], lr: float, eta_r: float) -> list[torch.Tensor]:
    """``fisher`` capped so that SGD at step size ``lr`` stays stable on the retention term
    ``eta_r * sum F (theta - theta0)^2``: each weight at most ``1 / (2 lr eta_r)`` (module docstring, step 3)."""
    if eta_r <= 0:
        return fisher
    cap = 1.0 / (2.0 * lr * eta_r)
    return [f.clamp(max=cap) for f in fisher]


def fip_loss(params: list[nn.Parameter], anchors: list[torch.Tensor], fisher: list[torch.Tensor],
             eta_f: float, eta_r: float) -> LossFn:
    """The FIP objective of step 3 as a ``loss_fn(model, x, y)``."""

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(model(x).float(), y)
        loss = ce
        if eta_f > 0:
            grads = torch.autograd.grad(ce, params, create_graph=True, allow_unused=True)
            loss = loss + eta_f * sum((g ** 2).sum() for g in grads if g is not None)
        if eta_r > 0:
            loss = loss + eta_r * sum((f * (p - a) ** 2).sum() for p, a, f in zip(params, anchors, fisher))
        return loss

    return loss_fn


def run(model: nn.Module, clean_data: Dataset[Any], config: FIPConfig,
        checkpoint: Checkpoint | None = None) -> DefenseResult:
    """FIP / Fast FIP on a copy of ``model`` (see module docstring). The fine-tuning is checkpointed after every
    epoch as phase ``"train"``; the candidate's Fisher (step 1) is recomputed on a rerun."""
    t0 = time.perf_counter()
    prep = prepare(model, clean_data, config.device, config.seed)
    if config.variant == "fast":
        params = attach_spectral(prep.model, prep.example)
        train_cfg = config.replace(lr=config.fast_lr, weight_decay=0.0)
    else:
        params = list(prep.model.parameters())
        for p in params:
            p.requires_grad_(True)
        train_cfg = config
    anchors = [p.detach().clone() for p in params]
    fisher = stable_retention(diagonal_fisher(prep.model, params, clean_data, config.fisher_samples, prep.device,
                                              config.seed), train_cfg.lr, config.eta_r)
    history = fine_tune(prep.model, clean_data, train_cfg, prep.device,
                        loss_fn=fip_loss(params, anchors, fisher, config.eta_f, config.eta_r),
                        desc=f"FIP-{config.variant}",
                        checkpoint=phase_checkpoint(checkpoint, "train", prep.model, clean_data))
    trainable = sum(p.numel() for p in params)
    if config.variant == "fast":
        fold_spectral(prep.model)
    extra = {"variant": config.variant, "trainable_params": trainable,
             "total_params": sum(p.numel() for p in prep.model.parameters())}
    return DefenseResult(prep.model.cpu().eval(), time.perf_counter() - t0, history, extra)
