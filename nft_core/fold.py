"""Fold neuron masks into the weights (``W <- m * W`` row-wise, or ``gamma <- m * gamma``).

The folded model is the original module class with the original state-dict keys and shapes and no extra
parameters, so it can be saved, exported and served like the candidate. The folding itself is
:func:`nft_core.reparam.fold`, restricted to the NFT mask kind.
"""

from __future__ import annotations

from torch import nn

from nft_core.reparam import fold


def fold_masks(model: nn.Module) -> nn.Module:
    """Multiply every :class:`~nft_core.reparam.NeuronMask` into its weight and remove the parametrization.

    Works in place and returns ``model``. All parameters become trainable again (as a freshly built model).

    Raises:
        ValueError: a masked weight carries another parametrization too (folding would merge it silently).
    """
    return fold(model, kinds=("neuron_mask",))
