"""The smallest universal additive perturbation that sends clean images to each class.

Xiang, Miller and Kesidis, "Revealing Backdoors, Post-Training, in DNN Classifiers via Novel Inference on
Optimized Perturbations Inducing Group Misclassification" (ICASSP 2020): a backdoor whose trigger is *added* to
the whole image (a sinusoid, a blended pattern, a small warp) is a direction in input space along which one
perturbation, the same for every image, carries images of every class to the target. So the target needs a far
smaller universal perturbation than any other class. A mask-and-pattern reconstruction (:mod:`nft_core.invert`)
misses such a trigger: it covers every pixel, and its mask is no smaller than a benign class's.

For every class k this module searches the smallest L-inf budget ``eps_k`` at which one perturbation
``delta_k`` (``|delta_k| <= eps_k`` per pixel, the perturbed images clipped to [0, 1]) sends a share
``success_threshold`` of the clean images of the other classes to k. ``delta_k`` follows signed gradient
steps on the cross-entropy to k (PGD with a step of ``eps_k / 4``); the budget adapts as Neural Cleanse's cost
does: after each window of steps, it shrinks when the window's images reached k at the threshold and grows when
they did not, and the smallest budget that reached the threshold is kept. The factor starts at ``factor``, is
square-rooted each time the direction turns and squared (up to ``factor``) each time it holds, so the search
crosses a wide range fast and then settles between two budgets a few percent apart. The statistic
is :attr:`UniversalPerturbation.budget_ratio`, the suspect's budget over the median class's: a backdoor target's
is far below 1. (The paper optimises the L2 norm and tests the order statistic; the L-inf budget makes the
step size and the search range independent of the image size.)

All classes of a chunk are optimised together, one batched forward per step; only the perturbations receive
gradients, the model's parameters and train/eval mode are left as they were, and the global RNG is not touched
(batches come from a generator seeded with ``seed``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from nft_core.classes import class_chunks
from nft_core.modes import eval_mode
from nft_core.progress import bar as progress_bar


class NonFiniteOutputs(ValueError):
    """A model whose outputs are not finite on perturbed images in [0, 1]: no budget it seems to reach means anything."""


@dataclass(frozen=True)
class UniversalPerturbation:
    """Outcome of :func:`smallest_perturbations`, one entry per class (index = label).

    Attributes:
        perturbations: (K, C, H, W) each class's perturbation at its budget.
        budgets: the smallest L-inf budget at which each class's perturbation reached the threshold (when it
            never did: the last budget tried, a lower estimate of what the class needs).
        success: share of the images of other classes that each class's perturbation sends to it.
        reached: whether each class's perturbation reached the threshold.
    """

    perturbations: torch.Tensor
    budgets: list[float]
    success: list[float]
    reached: list[bool]

    @property
    def suspect(self) -> int:
        """The class with the smallest budget among those that reached the threshold (else the smallest)."""
        order = sorted(range(len(self.budgets)), key=lambda k: (not self.reached[k], self.budgets[k]))
        return order[0]

    @property
    def budget_ratio(self) -> float:
        """The suspect's budget over the median class's (lower median): a backdoor target's is far below 1."""
        median = float(torch.tensor(self.budgets).median())
        return self.budgets[self.suspect] / median if median > 0 else 1.0


def smallest_perturbations(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, num_classes: int | None = None,
                           steps: int = 100, batch_size: int = 16, init_budget: float = 8 / 255,
                           success_threshold: float = 0.8, window: int = 5, factor: float = 1.25,
                           classes_per_chunk: int = 16, seed: int = 0, progress: bool = False) -> UniversalPerturbation:
    """Every class's smallest universal L-inf perturbation (see the module's docstring).

    Args:
        model: classifier taking images in [0, 1] (put in eval mode; its mode is restored afterwards).
        x: clean images, NCHW float in [0, 1]; a few hundred are enough.
        y: their labels (a class's own images are left out of its loss and success rate).
        num_classes: classes to search; default: the model's output width.
        steps: signed-gradient steps per class.
        batch_size: images per step (each is perturbed once per class of the chunk).
        init_budget: every class's first L-inf budget, in [0, 1] pixel units.
        success_threshold: share of perturbed images that must reach the class for a budget to count.
        window: steps over which the success rate is counted before the budget adapts.
        factor: the largest factor by which the budget shrinks (grows) after a window that did (did not) reach
            the threshold.
        classes_per_chunk: classes optimised together in one batched forward pass (memory: chunk x batch images).
        seed: seeds the batches.
        progress: show a tqdm bar over steps.

    Raises:
        ValueError: empty input, mismatched lengths, labels outside the classes, or invalid settings.
        NonFiniteOutputs: the model's outputs overflow on the perturbed images.
    """
    if steps < 1 or batch_size < 1 or window < 1 or classes_per_chunk < 1 or not 0 < init_budget <= 1 or factor <= 1:
        raise ValueError(f"invalid settings: steps={steps}, batch_size={batch_size}, window={window}, "
                         f"classes_per_chunk={classes_per_chunk} (all must be positive), init_budget={init_budget} "
                         f"(in (0, 1]), factor={factor} (above 1)")
    if not 0 < success_threshold <= 1:
        raise ValueError(f"success_threshold={success_threshold} must lie in (0, 1]")
    device, y, num_classes, chunks = class_chunks(model, x, y, num_classes, classes_per_chunk)
    generator = torch.Generator().manual_seed(seed)
    parts = []
    with eval_mode(model), progress_bar(total=steps * len(chunks), desc="perturb", unit="step", disable=not progress) as bar:
        for chunk in chunks:
            parts.append(_search_chunk(model, x, y, chunk, device, generator, steps=steps, batch_size=batch_size,
                                       init_budget=init_budget, threshold=success_threshold, window=window,
                                       factor=factor, bar=bar))
        deltas = torch.cat([p[0] for p in parts])
        success = [_success(model, x, y, k, deltas[k], device, batch_size * 8) for k in range(num_classes)]
    budgets = [b for p in parts for b in p[1]]
    reached = [r for p in parts for r in p[2]]
    return UniversalPerturbation(deltas, budgets, success, reached)


def _search_chunk(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: list[int], device: torch.device,
                  generator: torch.Generator, *, steps: int, batch_size: int, init_budget: float, threshold: float,
                  window: int, factor: float, bar: tqdm) -> tuple[torch.Tensor, list[float], list[bool]]:
    k, shape = len(chunk), x.shape[1:]
    delta = torch.zeros(k, *shape, device=device, requires_grad=True)
    targets = torch.tensor(chunk, device=device)
    budget = torch.full((k,), init_budget, device=device)
    log_factor = torch.full((k,), math.log(factor), device=device)
    previous = torch.zeros(k, dtype=torch.bool, device=device)  # the last window's outcome (none before the first)
    best_delta = torch.zeros(k, *shape, device=device)
    best_budget = torch.full((k,), math.inf, device=device)
    hits = torch.zeros(k, device=device)
    counts = torch.zeros(k, device=device)
    for step in range(steps):
        idx = torch.randint(len(x), (batch_size,), generator=generator)
        xb, yb = x[idx].to(device), y[idx].to(device)
        perturbed = (xb[None] + delta[:, None]).clamp(0, 1)  # (k, B, C, H, W)
        logits = model(perturbed.flatten(0, 1)).float().view(k, batch_size, -1)
        if not torch.isfinite(logits).all():  # argmax would still pick a class, and the search report a budget
            raise NonFiniteOutputs("the model's outputs are not finite on perturbed images in [0, 1]: they overflow")
        other = (yb[None] != targets[:, None]).float()  # a class's own images say nothing about its direction
        ce = F.cross_entropy(logits.flatten(0, 1), targets.repeat_interleave(batch_size), reduction="none").view(k, -1)
        (grad,) = torch.autograd.grad(((ce * other).sum(1) / other.sum(1).clamp(min=1)).sum(), delta)
        with torch.no_grad():
            hits += ((logits.argmax(-1) == targets[:, None]).float() * other).sum(1)
            counts += other.sum(1)
            radius = budget.view(k, *[1] * len(shape))
            delta -= radius / 4 * grad.sign()
            delta.copy_(torch.maximum(torch.minimum(delta, radius), -radius))
            if (step + 1) % window == 0:
                ok = hits / counts.clamp(min=1) >= threshold
                better = ok & (budget < best_budget)
                best_budget = torch.where(better, budget, best_budget)
                best_delta[better] = delta[better]
                if step + 1 > window:  # the factor narrows where the direction turns, widens where it holds
                    log_factor = torch.where(ok == previous, (2 * log_factor).clamp(max=math.log(factor)),
                                             log_factor / 2)
                previous = ok
                budget = (budget * torch.exp(torch.where(ok, -log_factor, log_factor))).clamp(max=1.0)
                radius = budget.view(k, *[1] * len(shape))
                delta.copy_(torch.maximum(torch.minimum(delta, radius), -radius))
                hits.zero_()
                counts.zero_()
        bar.update()
    reached = torch.isfinite(best_budget)
    with torch.no_grad():  # a class that never reached the threshold keeps its last budget and perturbation
        best_budget = torch.where(reached, best_budget, budget)
        best_delta[~reached] = delta[~reached]
    return best_delta.cpu(), best_budget.cpu().tolist(), reached.cpu().tolist()


@torch.no_grad()
def _success(model: nn.Module, x: torch.Tensor, y: torch.Tensor, label: int, delta: torch.Tensor,
             device: torch.device, batch_size: int) -> float:
    others = x[y != label]
    if not len(others):
        return 0.0
    delta = delta.to(device)
    hits = sum(int((model((others[i:i + batch_size].to(device) + delta).clamp(0, 1)).argmax(1) == label).sum())
               for i in range(0, len(others), batch_size))
    return hits / len(others)
