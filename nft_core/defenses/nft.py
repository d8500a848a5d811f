"""NFT as a registered purifier: :func:`nft_core.purify.purify` followed by :func:`nft_core.fold.fold_masks`
(Karim et al., ECCV 2024; the algorithm is described in :mod:`nft_core.purify`)."""

from __future__ import annotations

import time

from torch import nn
from torch.utils.data import Dataset

from nft_core.config import NFTConfig
from nft_core.defenses._common import DefenseResult
from nft_core.fold import fold_masks
from nft_core.purify import purify


def run(model: nn.Module, clean_data: Dataset, config: NFTConfig) -> DefenseResult:
    """Purify a copy of ``model`` with NFT and fold the masks into the weights."""
    t0 = time.perf_counter()
    result = purify(model, clean_data, config)
    folded = fold_masks(result.model).eval()
    extra = {"trainable_params": result.trainable_params, "total_params": result.total_params, "eta": result.eta,
             "layers": len(result.layers), "train_time_s": result.wall_time_s, "device": result.device}
    return DefenseResult(folded, time.perf_counter() - t0, result.history, extra)
