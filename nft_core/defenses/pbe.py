"""Progressive Backdoor Erasing (PBE): Mu, Wang, Niu, Zhang, Huang, "Progressive Backdoor Erasing via connecting
Backdoor and Adversarial Attacks", CVPR 2023.

Untargeted adversarial examples of a backdoored model behave like triggered inputs (they land on the target
label), so fine-tuning on them with their true labels breaks the trigger -> target association.

Mode ``"clean"`` (a clean extra set exists; Algorithm 1 with one iteration and no step 3):

1. Step 1: fine-tune a copy of the candidate on untargeted L-inf PGD examples of the clean batches, labelled
   with their true labels (Eq. 12, 14). The examples are generated on the fly against the current weights, so
   each epoch sees fresh ones (the paper generates the set once per iteration; on-the-fly generation is the
   usual adversarial fine-tuning practice and does not let the model overfit one fixed set).
2. Step 2: continue fine-tuning on the clean images to restore clean accuracy.

Mode ``"progressive"`` (no clean set: ``clean_data`` is the possibly poisoned training set):

1. D_ext^0 = a random ``first_fraction`` of the training data; theta^0 = the candidate.
2. For t = 0..T-1: steps 1 and 2 on D_ext^t starting from theta^t give theta^{t+1}; then score every training
   image by the cosine similarity of the logits of the original and the purified model (Eq. 15,
   :func:`rank_clean_samples`). Clean images keep similar logits (high score); poisoned images, whose
   prediction the purification changed, score low. D_ext^{t+1} = the top-ranked fraction, growing linearly
   from ``first_fraction`` (D_ext^0) to ``last_fraction`` (D_ext^{T-1}) (the paper: 10-20 % early, 70 % late).

The paper sets the PGD budget "adaptively per attack" and does not list fine-tuning epochs or learning rates;
the defaults here (Madry et al.'s CIFAR PGD: eps 8/255, 10 steps of 2/255; 10 + 10 epochs at lr 0.01, the FT
recipe of the NFT supplement) are this implementation's choice.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from nft_core.adversarial import pgd_untargeted
from nft_core.config import PBEConfig
from nft_core.defenses._common import DefenseResult, fine_tune, phase_checkpoint, prepare
from nft_core.loop import Checkpoint
from nft_core.metrics import predict_logits


@torch.no_grad()
def rank_clean_samples(original: nn.Module, purified: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """PBE Eq. 15: cosine similarity of the logits of ``original`` and ``purified`` for each image of ``x``.

    Higher scores mean the purification left the prediction alone: likely clean. Poisoned images (whose
    trigger the purification disarmed) get low scores, so sorting in descending order puts them at the bottom.

    Returns:
        Scores in [-1, 1], shape ``(len(x),)``, on the CPU.
    """
    a = predict_logits(original, x, batch_size, next(original.parameters()).device)
    b = predict_logits(purified, x, batch_size, next(purified.parameters()).device)
    return F.cosine_similarity(a, b, dim=1)


def _dataset_scores(original: nn.Module, purified: nn.Module, data: Dataset[Any],
                    batch_size: int = 512) -> torch.Tensor:
    return torch.cat([rank_clean_samples(original, purified, x, batch_size)
                      for x, _ in DataLoader(data, batch_size=batch_size)])


def _purify_once(model: nn.Module, data: Dataset[Any], config: PBEConfig, device: torch.device, tag: str,
                 checkpoint: Checkpoint | None, first: bool) -> list[dict[str, float]]:
    """Steps 1 and 2 on ``data``, in place; phases ``adv<tag>`` and ``clean<tag>`` (``first``: the adversarial
    phase is the method's first and writes the checkpoint path itself)."""

    def adversarial(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pgd_untargeted(model, x, y, config.adv_eps, config.adv_steps, config.adv_step_size), y

    hist = fine_tune(model, data, config, device, batch_hook=adversarial, epochs=config.adv_epochs,
                     desc=f"PBE adv{tag}",
                     checkpoint=phase_checkpoint(checkpoint, f"adv{tag}", model, data, own_file=not first))
    hist += fine_tune(model, data, config, device, desc=f"PBE clean{tag}",
                      checkpoint=phase_checkpoint(checkpoint, f"clean{tag}", model, data, own_file=True))
    return hist


def run(model: nn.Module, clean_data: Dataset[Any], config: PBEConfig,
        checkpoint: Checkpoint | None = None) -> DefenseResult:
    """PBE on a copy of ``model`` (see module docstring).

    Every fine-tuning is a checkpointed phase (after every epoch): ``"adv"`` and ``"clean"`` in clean mode,
    ``"adv-t"`` and ``"clean-t"`` for round t = 1..T in progressive mode. The first writes the checkpoint path,
    each later one ``<path>.<phase>`` (:func:`nft_core.loop.checkpoint_files`); the sample ranking between rounds
    is recomputed on a rerun from the restored weights.
    """
    t0 = time.perf_counter()
    prep = prepare(model, clean_data, config.device, config.seed)
    for p in prep.model.parameters():
        p.requires_grad_(True)
    if config.mode == "clean":
        history = _purify_once(prep.model, clean_data, config, prep.device, "", checkpoint, first=True)
        return DefenseResult(prep.model.cpu().eval(), time.perf_counter() - t0, history, {"mode": "clean"})

    original = prep.model
    current = copy.deepcopy(original)
    n = len(clean_data)  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(config.seed)
    selected = torch.randperm(n, generator=generator)[: max(1, round(config.first_fraction * n))]
    history = []
    rounds: list[dict[str, float]] = []
    for t in range(config.iterations):
        subset = Subset(clean_data, selected.tolist())
        for row in _purify_once(current, subset, config, prep.device, f"-{t + 1}", checkpoint, first=t == 0):
            history.append({**row, "iteration": float(t + 1)})
        scores = _dataset_scores(original, current, clean_data)
        progress = min(t + 1, config.iterations - 1) / max(config.iterations - 1, 1)
        share = config.first_fraction + (config.last_fraction - config.first_fraction) * progress
        selected = scores.argsort(descending=True)[: max(1, round(share * n))]
        rounds.append({"iteration": float(t + 1), "extra_size": float(len(subset)), "next_share": share})
    extra = {"mode": "progressive", "rounds": rounds, "selected": selected.tolist(), "scores": scores.tolist()}
    return DefenseResult(current.cpu().eval(), time.perf_counter() - t0, history, extra)
