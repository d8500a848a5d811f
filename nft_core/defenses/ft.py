"""Vanilla fine-tuning (FT) of all weights on the clean set: the baseline of Liu et al. (RAID 2018) and of the
NFT comparison (NFT supplementary Sec. 2.3: learning rate 0.01, 125 epochs, 1% clean data).

1. Copy the candidate; every parameter is trainable.
2. Minimise cross-entropy on crop/flipped clean batches with SGD (cosine schedule) for ``epochs`` passes.
3. Return the copy: the architecture is unchanged, nothing to fold.
"""

from __future__ import annotations

import time
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from nft_core.config import FTConfig
from nft_core.defenses._common import DefenseResult, fine_tune, phase_checkpoint, prepare
from nft_core.loop import Checkpoint


def run(model: nn.Module, clean_data: Dataset[Any], config: FTConfig,
        checkpoint: Checkpoint | None = None) -> DefenseResult:
    """Fine-tune a copy of ``model`` on ``clean_data`` (see module docstring), checkpointed after every epoch as
    phase ``"train"``."""
    t0 = time.perf_counter()
    prep = prepare(model, clean_data, config.device, config.seed)
    for p in prep.model.parameters():
        p.requires_grad_(True)
    history = fine_tune(prep.model, clean_data, config, prep.device, desc="FT",
                        checkpoint=phase_checkpoint(checkpoint, "train", prep.model, clean_data))
    return DefenseResult(prep.model.cpu().eval(), time.perf_counter() - t0, history, {})
