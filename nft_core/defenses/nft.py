"""NFT as a registered purifier: :func:`nft_core.purify.purify` followed by :func:`nft_core.fold.fold_masks`
(Karim et al., ECCV 2024; the algorithm is described in :mod:`nft_core.purify`)."""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from nft_core.config import NFTConfig
from nft_core.defenses._common import DefenseResult
from nft_core.fold import fold_masks
from nft_core.loop import Checkpoint
from nft_core.purify import purify
from nft_core.reparam import describe, reattach


def run(model: nn.Module, clean_data: Dataset[Any], config: NFTConfig,
        checkpoint: Checkpoint | None = None) -> DefenseResult:
    """Purify a copy of ``model`` with NFT; ``unfolded`` is a fresh copy of ``model`` with the masks re-attached
    (:func:`nft_core.reparam.reattach`) and the trained state loaded, ``model`` the masked model folded.

    The training is one phase, ``"train"``, checkpointed after every epoch. ``extra`` holds what :class:`~nft_core.purify.PurifyResult` reports besides model and history: ``layers``
    (:class:`~nft_core.masks.MaskedLayer` fields as dicts), ``lower_bounds``, ``eta``, ``samples_per_class``,
    ``trainable_params``, ``total_params``, ``train_time_s`` (all runs of a resumed training) and ``device``.
    """
    t0 = time.perf_counter()
    result = purify(model, clean_data, config, checkpoint=checkpoint.path if checkpoint is not None else None,
                    stale_checkpoint=checkpoint.stale if checkpoint is not None else "error")
    # not a deepcopy of the masked model: it would share torch's injected parametrized class, from which folding
    # one of the two deletes the tensor's property
    unfolded = copy.deepcopy(model).cpu()
    reattach(unfolded, describe(result.model))
    unfolded.load_state_dict(result.model.state_dict(), strict=True)
    folded = fold_masks(result.model)
    extra = {"layers": [dataclasses.asdict(layer) for layer in result.layers], "lower_bounds": result.lower_bounds,
             "eta": result.eta, "samples_per_class": result.samples_per_class,
             "trainable_params": result.trainable_params, "total_params": result.total_params,
             "train_time_s": result.wall_time_s, "device": result.device}
    return DefenseResult(folded, time.perf_counter() - t0, result.history, extra, unfolded=unfolded.eval())
