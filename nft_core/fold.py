"""Fold neuron masks into the weights (``W <- m * W`` row-wise, or ``gamma <- m * gamma``).

The folded model is the original module class with the original state-dict keys and shapes and no extra
parameters, so it can be saved, exported and served like the candidate.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from nft_core.masks import NeuronMask, mask_modules


def fold_masks(model: nn.Module) -> nn.Module:
    """Multiply every :class:`~nft_core.masks.NeuronMask` into its weight and remove the parametrization.

    Works in place and returns ``model``. All parameters become trainable again (as a freshly built model).

    Raises:
        ValueError: a masked weight carries another parametrization too (folding would merge it silently).
    """
    modules = dict(model.named_modules())
    for name, _ in mask_modules(model):
        module = modules[name]
        chain = module.parametrizations["weight"]
        if len(chain) != 1 or not isinstance(chain[0], NeuronMask):
            raise ValueError(f"{name}.weight carries parametrizations {[type(p).__name__ for p in chain]}; "
                             "only a single NeuronMask can be folded")
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
