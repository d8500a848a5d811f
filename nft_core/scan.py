"""Trigger-free backdoor scan: where do untargeted adversarial examples land?

Mu et al., "Progressive Backdoor Erasing via connecting Backdoor and Adversarial Attacks" (CVPR 2023),
Sec. 3.4: the untargeted adversarial examples of a backdoored model are mostly classified as the backdoor's
target label, while a clean model's spread over the other classes. The scan needs no trigger and no
knowledge of the attack, only clean labelled images:

1. Run untargeted L-inf PGD (:func:`nft_core.adversarial.pgd_untargeted`) on clean images.
2. Keep the examples whose prediction left the true label (successful flips).
3. Count their predicted labels; the share of the most frequent one is the concentration score. A clean
   model with C classes scores near 1 / (C - 1); a backdoored one scores near 1 with the target as top label.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nft_core.adversarial import pgd_untargeted
from nft_core.metrics import predict, predict_logits
from nft_core.modes import eval_mode
from nft_core.progress import bar as progress_bar


@dataclass(frozen=True)
class ScanResult:
    """Outcome of :func:`adversarial_label_concentration`.

    Attributes:
        top_label: the most frequent label among successful flips (None when nothing flipped).
        top_share: its share among successful flips, in [0, 1] (0.0 when nothing flipped).
        label_histogram: flips per predicted label, one entry per class.
        n: images attacked.
        n_flipped: adversarial examples whose prediction differs from the true label.
    """

    top_label: int | None
    top_share: float
    label_histogram: list[int]
    n: int
    n_flipped: int

    @property
    def flip_rate(self) -> float:
        """Share of attacked images whose prediction left the true label."""
        return self.n_flipped / self.n


def adversarial_label_concentration(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 8 / 255,
                                    steps: int = 10, batch_size: int = 256, seed: int = 0,
                                    num_classes: int | None = None, progress: bool = False) -> ScanResult:
    """Concentration of the labels of untargeted PGD examples (PBE observation, Sec. 3.4).

    Args:
        model: classifier taking images in [0, 1]; its train/eval mode is restored afterwards.
        x: clean images, NCHW float in [0, 1].
        y: their true labels.
        eps: L-inf radius of the attack in [0, 1] pixel units.
        steps: PGD steps (step size ``2.5 * eps / steps``).
        batch_size: images attacked at once.
        seed: seeds the PGD random starts; the global RNG state is left as it was.
        num_classes: length of the histogram; default: the model's output width.
        progress: show a progress bar over the attacked images.

    Returns:
        The top label, its share among successful flips and the full histogram.

    Raises:
        ValueError: empty input, mismatched lengths, or a non-positive ``eps``/``steps``/``batch_size``.
    """
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"need as many labels as images and at least one image, got {len(x)} images and {len(y)} labels")
    if eps <= 0 or steps < 1 or batch_size < 1:
        raise ValueError(f"eps={eps}, steps={steps}, batch_size={batch_size} are invalid: need eps > 0, steps >= 1, batch_size >= 1")
    device = next(model.parameters()).device
    y = torch.as_tensor(y).long()
    adv_pred = []
    with eval_mode(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with progress_bar(total=len(x), desc="scan", unit="img", disable=not progress) as bar:
            for i in range(0, len(x), batch_size):
                xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
                x_adv = pgd_untargeted(model, xb, yb, eps, steps)
                adv_pred.append(predict(model, x_adv, batch_size, device))
                bar.update(len(xb))
        width = num_classes if num_classes is not None else predict_logits(model, x[:1], 1, device).shape[-1]
    pred = torch.cat(adv_pred)
    flipped = pred[pred != y]
    histogram = torch.bincount(flipped, minlength=width).tolist()
    if not len(flipped):
        return ScanResult(None, 0.0, histogram, len(y), 0)
    top = max(range(len(histogram)), key=histogram.__getitem__)
    return ScanResult(top, histogram[top] / len(flipped), histogram, len(y), len(flipped))
