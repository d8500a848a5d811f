"""Data-free backdoor detection by the maximum achievable margin of each class (MM-BD).

Wang, Xiang, Miller and Kesidis, "MM-BD: Post-Training Detection of Backdoor Attacks with Arbitrary Backdoor
Pattern Types Using a Maximum Margin Statistic" (IEEE S&P 2024), Sec. IV. A backdoor is a shortcut that
drives its target's logit far above the others whatever the rest of the image shows. So the largest margin
``logit_k(x) - max_{j != k} logit_j(x)`` any input ``x`` in the image domain can reach is abnormally large for
the target class, whether the trigger is a patch, a blended image, a sinusoid or anything else. The detector
needs no clean images and makes no assumption about the trigger's form (unlike :mod:`nft_core.invert`, which
looks for a small stamp):

1. For every class, start from random images and maximise the class's margin by gradient ascent, the images
   kept in [0, 1]; the class's statistic is the largest margin reached.
2. Fit a gamma distribution (shape, location and scale, maximum likelihood) to the statistics of every class
   but the largest, the null of classes without a backdoor.
3. The p-value of the largest statistic under the null, as the largest of ``K`` draws:
   ``1 - F(r_max) ** K``. The paper flags a model below 0.05.

The authors run 300 plain SGD steps (lr 0.01, momentum 0.2) from 30 random images per class. Adam (which does
not depend on the logits' scale) from 8 images per class for 200 steps reaches the same statistics on the
synthetic demo models (a three-times longer run from 16 images moves them by a few percent; BENCHMARKS.md,
*Backdoor detection without the trigger*). The model's parameters and train/eval mode are left as they were,
and the global RNG is not touched (the starting images come from a generator seeded with ``seed``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from nft_core.classes import chunked
from nft_core.modes import eval_mode
from nft_core.progress import bar as progress_bar

#: p-value below which the paper flags a model as backdoored.
PAPER_ALPHA = 0.05


@dataclass(frozen=True)
class MaxMargin:
    """Outcome of :func:`max_margin_statistics`.

    Attributes:
        margins: the largest margin reached for each class (index = label).
        pvalue: the largest margin's p-value under a gamma null fitted to the others (order statistic of
            ``K`` draws); small values mean one class stands out.
    """

    margins: list[float]
    pvalue: float

    @property
    def target(self) -> int:
        """The class with the largest margin: the suspected backdoor target."""
        return max(range(len(self.margins)), key=self.margins.__getitem__)

    @property
    def ratio(self) -> float | None:
        """The largest margin over the median class's (how far the suspect stands out, without a fit); None
        when the median margin is not positive (the ascent left half the classes unreached: no ratio means
        anything then, and an infinite one would not serialize)."""
        median = float(np.median(self.margins))
        return self.margins[self.target] / median if median > 0 else None


def margin_pvalue(margins: list[float] | np.ndarray, label: int | None = None) -> float:
    """p-value of one class's margin under a gamma distribution fitted to the other classes' (MM-BD, Sec. IV-B).

    For the largest margin (``label`` None), as the largest of ``K`` draws: ``1 - F(r_max) ** K``, with ``F``
    the fitted gamma CDF (shape, location and scale free, as in the authors' code) and ``K`` the number of
    classes. For a class chosen beforehand (``label``: another model's suspect, e.g. the candidate's on its
    hardened model) no maximum was taken: ``1 - F(r_label)``. When the other margins are all equal the fit is
    undefined: the class then stands out (p = 0) if its margin is larger, else p = 1.

    Raises:
        ValueError: fewer than three classes (the null needs two), a non-finite margin, or ``label`` outside them.
    """
    r = np.asarray(margins, dtype=np.float64)
    if r.ndim != 1 or len(r) < 3:
        raise ValueError(f"need the margins of at least 3 classes, got {r.shape}")
    if not np.isfinite(r).all():
        raise ValueError(f"margins must be finite, got {r.tolist()}")
    if label is not None and not 0 <= label < len(r):
        raise ValueError(f"label {label} is not one of the {len(r)} classes")
    k = int(r.argmax()) if label is None else label
    null = np.delete(r, k)
    if np.ptp(null) == 0:
        return 0.0 if r[k] > null[0] else 1.0
    from scipy import stats  # here, not at import: scipy.stats takes half a second, and every stage imports this

    with warnings.catch_warnings():  # the optimiser's own RuntimeWarnings on a poor start say nothing here
        warnings.simplefilter("ignore", RuntimeWarning)
        shape, loc, scale = stats.gamma.fit(null)
        cdf = float(stats.gamma.cdf(r[k], shape, loc=loc, scale=scale))
    return float(min(1.0, max(0.0, 1.0 - cdf ** (len(r) if label is None else 1))))


class NonFiniteMargins(ValueError):
    """A model whose outputs overflow on images in [0, 1]: its margins, and any statistic of them, are undefined."""


def max_margin_statistics(model: nn.Module, image_shape: tuple[int, int, int], num_classes: int, *, starts: int = 8,
                          steps: int = 200, lr: float = 0.05, classes_per_chunk: int = 16, seed: int = 0,
                          progress: bool = False) -> MaxMargin:
    """Every class's maximum achievable margin and the p-value of the largest (MM-BD).

    Args:
        model: classifier taking images in [0, 1] (put in eval mode; its mode is restored afterwards).
        image_shape: ``(C, H, W)`` of the model's input.
        num_classes: classes to examine (at most the model's output width; at least 3).
        starts: random starting images per class; a class's statistic is the best of them.
        steps: Adam steps of margin ascent.
        lr: Adam's learning rate, in [0, 1] pixel units.
        classes_per_chunk: classes optimised together in one batched forward (memory: chunk x starts images).
        seed: seeds the starting images.
        progress: show a progress bar over steps.

    Raises:
        ValueError: invalid settings or a model with fewer outputs than ``num_classes``.
        NonFiniteMargins: a margin is not finite (the model's outputs overflow).
    """
    if starts < 1 or steps < 1 or classes_per_chunk < 1 or lr <= 0:
        raise ValueError(f"invalid settings: starts={starts}, steps={steps}, classes_per_chunk={classes_per_chunk}, "
                         f"lr={lr} (all must be positive)")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    with eval_mode(model):
        with torch.no_grad():
            width = model(torch.rand(1, *image_shape, generator=generator).to(device)).shape[-1]
        if not 3 <= num_classes <= width:
            raise ValueError(f"num_classes={num_classes}: need at least 3 and at most the model's {width} outputs")
        chunks = chunked(num_classes, classes_per_chunk)
        margins: list[float] = []
        with progress_bar(total=steps * len(chunks), desc="margins", unit="step", disable=not progress) as bar:
            for chunk in chunks:
                margins += _ascend(model, image_shape, chunk, starts, steps, lr, device, generator, bar)
    if not all(math.isfinite(m) for m in margins):
        raise NonFiniteMargins(f"the model's margins are not finite ({margins}): its outputs overflow")
    return MaxMargin(margins, margin_pvalue(margins))


def _margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    own = logits.gather(1, labels[:, None])[:, 0]
    return own - logits.scatter(1, labels[:, None], float("-inf")).amax(1)


def _ascend(model: nn.Module, image_shape: tuple[int, int, int], chunk: list[int], starts: int, steps: int,
            lr: float, device: torch.device, generator: torch.Generator, bar: tqdm) -> list[float]:
    labels = torch.tensor(chunk, device=device).repeat_interleave(starts)
    images = torch.rand(len(labels), *image_shape, generator=generator).to(device).requires_grad_()
    optimizer = torch.optim.Adam([images], lr=lr)
    for _ in range(steps):
        loss = -_margin(model(images).float(), labels).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=[images])
        optimizer.step()
        with torch.no_grad():
            images.clamp_(0, 1)
        bar.update()
    with torch.no_grad():
        return _margin(model(images).float(), labels).view(len(chunk), starts).amax(1).tolist()
