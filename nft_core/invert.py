"""Trigger reconstruction (Neural Cleanse): the smallest stamp that sends clean images to each class.

Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks" (IEEE S&P 2019),
Sec. IV. For every class k, optimise a mask m_k (one value per pixel, in [0, 1]) and a pattern p_k (an image in
[0, 1]) so that the stamped images ``(1 - m_k) * x + m_k * p_k`` are classified as k, while the L1 norm of m_k
is pushed down:

    min  CE(f((1 - m_k) * x + m_k * p_k), k) + lambda_k * ||m_k||_1

``lambda_k`` adapts as in the authors' procedure: it starts at ``init_cost``, grows by 1.5x after ``patience``
windows in which the stamp reaches ``success_threshold`` of the images, and shrinks by 1.5**1.5 after as many
windows in which it does not; the smallest mask that reached the threshold is kept. A backdoor is a shortcut:
its target needs a far smaller mask than the other classes. The anomaly index of a class is how far its mask
norm lies *below* the median, in units of the median absolute deviation (scaled by 1.4826, the consistency
constant of a normal distribution); the paper flags an index above 2. With few classes the MAD is unstable
(masks all within a few percent of each other give large indices), so :attr:`Inversion.norm_ratio`, the
suspect's norm over the median, is reported beside it.

All classes of a chunk are optimised together, one batched forward per step; only the masks and patterns
receive gradients, the model's parameters and its train/eval mode are left as they were, and the global RNG
is not touched (batches and initial masks come from a generator seeded with ``seed``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from nft_core.classes import class_chunks
from nft_core.modes import eval_mode
from nft_core.progress import bar as progress_bar

#: Scale of the median absolute deviation that makes it estimate a normal distribution's standard deviation.
MAD_CONSISTENCY = 1.4826

#: Anomaly index above which Neural Cleanse flags a class as a backdoor target.
ANOMALY_THRESHOLD = 2.0


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """``(1 - mask) * x + mask * pattern``: images ``x`` (NCHW) with a trigger (mask 1HW, pattern CHW) applied."""
    mask, pattern = mask.to(x.device, x.dtype), pattern.to(x.device, x.dtype)
    return (1 - mask) * x + mask * pattern


@dataclass(frozen=True)
class Inversion:
    """Outcome of :func:`reconstruct_triggers`, one entry per class (index = label).

    Attributes:
        masks: (K, 1, H, W) reconstructed masks in [0, 1].
        patterns: (K, C, H, W) reconstructed patterns in [0, 1].
        norms: L1 norm of each mask (pixels covered; at most H * W).
        success: share of the images of other classes that each class's stamp sends to it.
        reached: whether each class's stamp reached the success threshold during optimisation (when not, its
            norm is that of the last mask, an upper estimate of what the class needs).
        anomaly: anomaly index of each class: (median norm - norm) / MAD; positive below the median.
    """

    masks: torch.Tensor
    patterns: torch.Tensor
    norms: list[float]
    success: list[float]
    reached: list[bool]
    anomaly: list[float]

    @property
    def suspect(self) -> int:
        """The class with the highest anomaly index (the smallest mask relative to the others)."""
        return max(range(len(self.anomaly)), key=self.anomaly.__getitem__)

    @property
    def anomaly_index(self) -> float:
        """The suspect's anomaly index: Neural Cleanse flags a model above :data:`ANOMALY_THRESHOLD`."""
        return self.anomaly[self.suspect]

    @property
    def norm_ratio(self) -> float:
        """The suspect's mask norm over the median class's: a backdoor target's is far below 1."""
        median = float(torch.tensor(self.norms).median())
        return self.norms[self.suspect] / median if median > 0 else 1.0

    def trigger(self, label: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask 1HW, pattern CHW)`` reconstructed for ``label`` (default: the suspect)."""
        label = self.suspect if label is None else label
        return self.masks[label], self.patterns[label]


def anomaly_indices(norms: list[float]) -> list[float]:
    """Neural Cleanse's anomaly index of each norm: ``(median - norm) / (1.4826 * MAD)``.

    Positive for norms below the median (candidates for a backdoor target). With a zero MAD (half the norms
    equal) a norm below the median gets ``inf`` and any other 0.
    """
    n = torch.tensor(norms, dtype=torch.float64)
    median = n.median()  # lower median for even counts, as in the authors' code (numpy's would average)
    mad = MAD_CONSISTENCY * (n - median).abs().median()
    if mad == 0:
        return [float("inf") if v < median else 0.0 for v in n.tolist()]
    return ((median - n) / mad).tolist()


def reconstruct_triggers(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, num_classes: int | None = None,
                         steps: int = 100, batch_size: int = 16, lr: float = 0.2, init_cost: float = 1e-2,
                         success_threshold: float = 0.95, window: int = 5, patience: int = 3,
                         classes_per_chunk: int = 16, seed: int = 0, progress: bool = False) -> Inversion:
    """Reconstruct a trigger for every class of ``model`` from clean images (Neural Cleanse, Sec. IV).

    The defaults (100 steps of 16 images, lr 0.2, initial cost 1e-2) are a CPU-sized budget: the authors use
    lr 0.1 and 1e-3 over thousands of steps per class. On the synthetic demo data they find the same suspects
    as 300 steps of 32 images at lr 0.1 and 1e-3 in a seventh of the time (BENCHMARKS.md, *Backdoor detection
    without the trigger*).

    Args:
        model: classifier taking images in [0, 1] (put in eval mode; its mode is restored afterwards).
        x: clean images, NCHW float in [0, 1]; a few hundred are enough.
        y: their labels (a class's own images are left out of its loss and success rate).
        num_classes: classes to invert; default: the model's output width.
        steps: optimisation steps per class.
        batch_size: images per step (each is stamped once per class of the chunk).
        lr: Adam's learning rate on the masks' and patterns' logits.
        init_cost: initial weight of the mask's L1 norm.
        success_threshold: share of stamped images that must reach the class for a mask to count.
        window: steps over which the success rate is averaged before the cost is adapted.
        patience: windows above (below) the threshold before the cost grows (shrinks).
        classes_per_chunk: classes optimised together in one batched forward pass (memory: chunk x batch images).
        seed: seeds the initial masks and the batches.
        progress: show a tqdm bar over steps.

    Raises:
        ValueError: empty input, mismatched lengths, labels outside the classes, or invalid settings.
    """
    if steps < 1 or batch_size < 1 or window < 1 or patience < 1 or classes_per_chunk < 1 or lr <= 0 or init_cost <= 0:
        raise ValueError(f"invalid settings: steps={steps}, batch_size={batch_size}, window={window}, patience={patience}, "
                         f"classes_per_chunk={classes_per_chunk}, lr={lr}, init_cost={init_cost} (all must be positive)")
    if not 0 < success_threshold <= 1:
        raise ValueError(f"success_threshold={success_threshold} must lie in (0, 1]")
    device, y, num_classes, chunks = class_chunks(model, x, y, num_classes, classes_per_chunk)
    generator = torch.Generator().manual_seed(seed)
    parts = []
    with eval_mode(model), progress_bar(total=steps * len(chunks), desc="invert", unit="step", disable=not progress) as bar:
        for chunk in chunks:
            parts.append(_invert_chunk(model, x, y, chunk, device, generator, steps=steps, batch_size=batch_size, lr=lr,
                                       init_cost=init_cost, threshold=success_threshold, window=window,
                                       patience=patience, bar=bar))
        masks, patterns = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        success = [_success(model, x, y, k, masks[k], patterns[k], device, batch_size * 8) for k in range(num_classes)]
    reached = [r for p in parts for r in p[2]]
    norms = masks.flatten(1).sum(1).tolist()
    return Inversion(masks, patterns, norms, success, reached, anomaly_indices(norms))


def _invert_chunk(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: list[int], device: torch.device,
                  generator: torch.Generator, *, steps: int, batch_size: int, lr: float, init_cost: float,
                  threshold: float, window: int, patience: int, bar: tqdm) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    k, (c, h, w) = len(chunk), x.shape[1:]
    mask_logit = torch.logit(torch.rand(k, 1, h, w, generator=generator).clamp(0.05, 0.95)).to(device).requires_grad_()
    pattern_logit = torch.logit(torch.rand(k, c, h, w, generator=generator).clamp(0.05, 0.95)).to(device).requires_grad_()
    optimizer = torch.optim.Adam([mask_logit, pattern_logit], lr=lr, betas=(0.5, 0.9))  # the authors' betas
    targets = torch.tensor(chunk, device=device)
    cost = torch.full((k,), init_cost, device=device)
    best_mask = torch.sigmoid(mask_logit.detach()).clone()
    best_pattern = torch.sigmoid(pattern_logit.detach()).clone()
    best_norm = torch.full((k,), float("inf"), device=device)
    up = torch.zeros(k, dtype=torch.long, device=device)
    down = torch.zeros(k, dtype=torch.long, device=device)
    hits = torch.zeros(k, device=device)
    counts = torch.zeros(k, device=device)
    for step in range(steps):
        idx = torch.randint(len(x), (batch_size,), generator=generator)
        xb, yb = x[idx].to(device), y[idx].to(device)
        mask, pattern = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)
        stamped = (1 - mask[:, None]) * xb[None] + (mask * pattern)[:, None]  # (k, B, C, H, W)
        logits = model(stamped.flatten(0, 1)).float().view(k, batch_size, -1)
        other = (yb[None] != targets[:, None]).float()  # a class's own images say nothing about its trigger
        ce = F.cross_entropy(logits.flatten(0, 1), targets.repeat_interleave(batch_size), reduction="none").view(k, -1)
        ce = (ce * other).sum(1) / other.sum(1).clamp(min=1)
        norm = mask.flatten(1).sum(1)
        optimizer.zero_grad(set_to_none=True)
        (ce + cost * norm).sum().backward(inputs=[mask_logit, pattern_logit])
        optimizer.step()
        with torch.no_grad():
            hits += ((logits.argmax(-1) == targets[:, None]).float() * other).sum(1)
            counts += other.sum(1)
            if (step + 1) % window == 0:
                rate = hits / counts.clamp(min=1)
                ok = rate >= threshold
                better = ok & (norm < best_norm)
                best_norm = torch.where(better, norm, best_norm)
                best_mask[better], best_pattern[better] = mask[better], pattern[better]
                up, down = torch.where(ok, up + 1, 0), torch.where(ok, 0, down + 1)
                cost = torch.where(up >= patience, cost * 1.5, torch.where(down >= patience, cost / 1.5 ** 1.5, cost))
                up, down = torch.where(up >= patience, 0, up), torch.where(down >= patience, 0, down)
                hits.zero_()
                counts.zero_()
        bar.update()
    reached = torch.isfinite(best_norm)
    with torch.no_grad():  # a class that never reached the threshold keeps its last mask (an upper estimate)
        mask, pattern = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)
        best_mask[~reached], best_pattern[~reached] = mask[~reached], pattern[~reached]
    return best_mask.cpu(), best_pattern.cpu(), reached.cpu().tolist()


@torch.no_grad()
def _success(model: nn.Module, x: torch.Tensor, y: torch.Tensor, label: int, mask: torch.Tensor,
             pattern: torch.Tensor, device: torch.device, batch_size: int) -> float:
    others = x[y != label]
    if not len(others):
        return 0.0
    hits = sum(int((model(stamp(others[i:i + batch_size].to(device), mask, pattern)).argmax(1) == label).sum())
               for i in range(0, len(others), batch_size))
    return hits / len(others)
