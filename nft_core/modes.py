"""A model in eval mode for the length of a block, and in its own modes again afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; afterwards, even when the block raises, every submodule is back in
    the mode it had before.

    Restoring module by module keeps a mixed mode whole: NFT trains with the model in eval mode and its BatchNorm
    layers in train mode (:func:`nft_core.loop.set_norm_mode`), which ``model.train(model.training)`` would flatten.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
