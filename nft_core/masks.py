"""Per-neuron scalar masks attached with ``torch.nn.utils.parametrize`` (no model code is copied or edited).

Two placements (NFT paper Eq. 8 vs. the authors' released code):

- ``"weight"``: one mask per output channel of every Conv1d/2d/3d and output unit of every Linear; the
  effective weight is ``m[:, None, ...] * W``. The bias is not masked.
- ``"norm"``: one mask per channel of the affine scale (gamma) of every BatchNorm/LayerNorm/GroupNorm; the
  effective scale is ``m * gamma``. The bias (beta) is not masked.

Layers are numbered l = 1..L in the order a forward pass reaches them; the first one is skipped by default
(the paper leaves the first layer alone). Masks start at 1, so attaching them does not change the output.
:func:`nft_core.fold.fold_masks` multiplies them into the weights and removes the parametrizations. Attaching and
folding go through :mod:`nft_core.reparam` (the :class:`~nft_core.reparam.NeuronMask` kind), like ANP's and FIP's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nft_core.modes import eval_mode
from nft_core.reparam import NeuronMask, attach

WEIGHT_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class MaskedLayer:
    """One masked layer: ``index`` (l, 1-based), module path ``name``, module ``kind`` and mask size."""

    index: int
    name: str
    kind: str
    size: int


def _maskable(module: nn.Module, placement: str) -> bool:
    if placement == "weight":
        return isinstance(module, WEIGHT_TYPES) and module.weight is not None
    if placement == "norm":
        return isinstance(module, NORM_TYPES) and getattr(module, "weight", None) is not None
    raise ValueError(f"placement={placement!r} is invalid: must be 'norm' or 'weight'")


@torch.no_grad()
def forward_order(model: nn.Module, placement: str, example_input: torch.Tensor) -> list[str]:
    """Names of maskable modules in the order one forward pass of ``example_input`` first reaches them."""
    candidates = {m: name for name, m in model.named_modules() if _maskable(m, placement)}
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, _inp: order.append(candidates[mod]) if candidates[mod] not in order else None)
             for m in candidates]
    try:
        with eval_mode(model):
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
    return order


def attach_masks(model: nn.Module, placement: str, example_input: torch.Tensor, skip_first: bool = True) -> list[MaskedLayer]:
    """Attach a :class:`NeuronMask` to every maskable layer of ``model`` in place and freeze everything else.

    Args:
        model: the model to mask; it must not carry masks already.
        placement: ``"weight"`` or ``"norm"`` (see module docstring).
        example_input: a batch the model accepts, used once to find the forward order of layers.
        skip_first: leave the first maskable layer unmasked.

    Returns:
        The masked layers, in forward order (``index`` 1..L).

    Raises:
        ValueError: unknown placement, the model already carries masks, or there is nothing to mask.
    """
    if mask_modules(model):
        raise ValueError("model already carries neuron masks; fold or remove them first")
    order = forward_order(model, placement, example_input)
    if skip_first:
        order = order[1:]
    if not order:
        raise ValueError(f"model has no layers to mask with placement={placement!r} "
                         f"({'norm layers with an affine scale' if placement == 'norm' else 'Conv/Linear layers'})")
    modules = dict(model.named_modules())
    attached = attach(model, "neuron_mask", "weight", order)
    layers = [MaskedLayer(r.layer_index, r.module, type(modules[r.module]).__name__, r.size) for r in attached]
    mask_ids = {id(p) for p in mask_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in mask_ids)
    return layers


def mask_modules(model: nn.Module) -> list[tuple[str, NeuronMask]]:
    """``(owner module path, NeuronMask)`` pairs (ANP's :class:`~nft_core.reparam.PerturbedMask` included),
    sorted by layer index."""
    found = [(name.removesuffix(".parametrizations.weight.0"), m) for name, m in model.named_modules()
             if isinstance(m, NeuronMask)]
    return sorted(found, key=lambda item: item[1].layer_index)


def mask_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The mask tensors, in layer order: the only parameters NFT trains."""
    return [m.mask for _, m in mask_modules(model)]


@torch.no_grad()
def clamp_masks(model: nn.Module, lower_bounds: list[float]) -> None:
    """Clip the masks of layer l to ``[lower_bounds[l - 1], 1]``."""
    for _, m in mask_modules(model):
        m.mask.clamp_(min=lower_bounds[m.layer_index - 1], max=1.0)


def mask_l1_distance(model: nn.Module) -> torch.Tensor:
    """sum over all masks of |m - 1| (the NFT regulariser before its weight eta)."""
    params = mask_parameters(model)
    return torch.stack([(p - 1).abs().sum() for p in params]).sum()


def mask_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Mask values keyed by the owning module's path (what the purify stage saves beside the weights)."""
    return {name: m.mask.detach().cpu().clone() for name, m in mask_modules(model)}


@torch.no_grad()
def load_mask_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved mask values into the masks attached to ``model``.

    Raises:
        ValueError: the saved masks belong to other layers or have other sizes.
    """
    masks = dict(mask_modules(model))
    if set(masks) != set(state):
        missing, unexpected = sorted(set(masks) - set(state)), sorted(set(state) - set(masks))
        raise ValueError(f"saved masks do not match the model's masked layers: missing {missing}, unexpected {unexpected}")
    for name, values in state.items():
        if values.shape != masks[name].mask.shape:
            raise ValueError(f"mask of {name!r} has shape {tuple(values.shape)}, the layer needs {tuple(masks[name].mask.shape)}")
        masks[name].mask.copy_(values)
