"""Untargeted L-inf PGD (Madry et al., 2018) on images in [0, 1].

Used by NFT-Adv (supplementary Sec. 3.4), the PBE purifier and the trigger-free scan. The model is put in
eval mode for the attack (so BatchNorm statistics are not touched) and restored afterwards; only the input
receives gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nft_core.modes import eval_mode


def pgd_untargeted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
                   step_size: float | None = None, random_start: bool = True) -> torch.Tensor:
    """Adversarial examples that raise the loss of the true labels ``y`` within ``||delta||_inf <= eps``.

    Args:
        model: classifier taking images in [0, 1].
        x: clean images, NCHW in [0, 1].
        y: true labels.
        eps: L-inf radius in pixel units of [0, 1].
        steps: number of signed-gradient steps.
        step_size: per-step size; default ``2.5 * eps / steps``.
        random_start: start from a uniform point in the eps-ball (uses torch's global RNG).

    Returns:
        Detached adversarial images, clamped to [0, 1].
    """
    step_size = 2.5 * eps / steps if step_size is None else step_size
    with eval_mode(model):
        delta = torch.empty_like(x).uniform_(-eps, eps) if random_start else torch.zeros_like(x)
        x_adv = (x + delta).clamp(0, 1).detach()
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(model(x_adv).float(), y)
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + step_size * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1).detach()
    return x_adv
