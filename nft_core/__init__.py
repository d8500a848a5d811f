"""Neural mask Fine-Tuning (NFT) and the baseline backdoor defenses, as a library.

    from nft_core import NFTConfig, purify, fold_masks
    result = purify(model, clean_dataset, NFTConfig())   # masks learned on the clean set
    hardened = fold_masks(result.model)                  # a plain model of the candidate's architecture

The defense registry (:func:`run_defense`, :data:`DEFENSES`) runs NFT or any baseline (FT, FP, ANP, FT-SAM, PBE,
FIP) by name with its own config; every one of them trains through one loop (:mod:`nft_core.loop`) and resumes
from a checkpoint. Names are imported on first use (PEP 562), so ``import nft_core.config`` stays
free of torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "NFTConfig": "nft_core.config", "purify": "nft_core.purify", "PurifyResult": "nft_core.purify",
    "StaleCheckpoint": "nft_core.loop", "remove_checkpoint": "nft_core.loop", "fold_masks": "nft_core.fold", "attach_masks": "nft_core.masks",
    "mask_state": "nft_core.masks", "load_mask_state": "nft_core.masks", "DEFENSES": "nft_core.defenses",
    "DefenseResult": "nft_core.defenses", "default_config": "nft_core.defenses", "run_defense": "nft_core.defenses",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nft_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
