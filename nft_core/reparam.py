"""Attach, describe, re-attach and fold the ``torch.nn.utils.parametrize`` reparametrizations of this package.

Three purifiers change a model by reparametrizing some of its tensors instead of editing its code:

- NFT (Karim et al., "Augmented Neural Fine-Tuning for Efficient Backdoor Purification", ECCV 2024, Sec. 3):
  :class:`NeuronMask`, ``W -> m * W`` with one trainable scalar per neuron;
- ANP (Wu & Wang, "Adversarial Neuron Perturbations Remove Backdoors", NeurIPS 2021, Sec. 3):
  :class:`PerturbedMask`, ``gamma -> gamma * (m + delta)``, and :class:`ShiftNoise`, ``beta -> beta * (1 + xi)``;
- Fast FIP (Karim et al., "Fisher Information guided Purification against Backdoor Attacks", ACM CCS 2024):
  :class:`SpectralDelta`, ``W -> W + U diag(s - s0) V^T``.

They all go through this module: :func:`attach` puts one on a named tensor of several modules (all or none),
:func:`describe` lists what is attached as small serialisable :class:`Reparam` descriptors, :func:`reattach`
rebuilds those on a fresh copy of the architecture (so a state dict saved from a reparametrized model loads
strictly into it), and :func:`fold` bakes them into the plain tensors. The kind of a reparametrization is
always looked up in the allow-list :data:`KINDS`: a descriptor can only name one of these classes, never make
the loader construct anything else.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parametrize


class Reparametrization(nn.Module, ABC):
    """Base of the reparametrizations :data:`KINDS` allows.

    Attributes:
        layer_index: 1-based position of the reparametrized layer among the layers a method reparametrizes, in
            forward order (the index NFT's lower-bound schedule and ANP's pairing of scale and shift use).
    """

    layer_index: int

    @classmethod
    @abstractmethod
    def for_tensor(cls, tensor: torch.Tensor, layer_index: int) -> Reparametrization:
        """The identity reparametrization of ``tensor`` (the model's output does not change when attached)."""

    @property
    @abstractmethod
    def size(self) -> int:
        """Number of values it trains per layer (masks, noises or singular values)."""


class NeuronMask(Reparametrization):
    """Parametrization ``W -> m * W`` with one scalar per slice along dim 0 (NFT, ECCV 2024, Eq. 8).

    Attributes:
        mask: the trainable mask, shape ``(n,)``, initialised to 1.
        layer_index: 1-based position of the layer among masked layers, in forward order.
    """

    def __init__(self, n: int, ndim: int, layer_index: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.mask = nn.Parameter(torch.ones(n, device=device))
        self.layer_index = layer_index
        self._view = (n,) + (1,) * (ndim - 1)

    @classmethod
    def for_tensor(cls, tensor: torch.Tensor, layer_index: int) -> NeuronMask:
        return cls(tensor.shape[0], tensor.dim(), layer_index, tensor.device)

    @property
    def size(self) -> int:
        return self.mask.numel()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.view(self._view).to(weight.dtype)


class PerturbedMask(NeuronMask):
    """gamma -> gamma * (m + delta) when ``perturbed``, else gamma * m (ANP's NoisyBatchNorm scale, Sec. 3.2)."""

    def __init__(self, n: int, ndim: int, layer_index: int, device: torch.device | str | None = None) -> None:
        super().__init__(n, ndim, layer_index, device)
        self.noise = nn.Parameter(torch.zeros(n, device=device))
        self.perturbed = False

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale = self.mask + self.noise if self.perturbed else self.mask
        return weight * scale.view(self._view).to(weight.dtype)


class ShiftNoise(Reparametrization):
    """beta -> beta * (1 + xi) when ``perturbed``, else beta (ANP's perturbation of the shift, Sec. 3.2)."""

    def __init__(self, n: int, device: torch.device | str | None = None, layer_index: int = 0) -> None:
        super().__init__()
        self.noise = nn.Parameter(torch.zeros(n, device=device))
        self.perturbed = False
        self.layer_index = layer_index

    @classmethod
    def for_tensor(cls, tensor: torch.Tensor, layer_index: int) -> ShiftNoise:
        return cls(tensor.shape[0], tensor.device, layer_index)

    @property
    def size(self) -> int:
        return self.noise.numel()

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        return bias * (1 + self.noise.to(bias.dtype)) if self.perturbed else bias


class SpectralDelta(Reparametrization):
    """Parametrization W -> W + U diag(s - s0) V^T with U, s0, V^T from the SVD of the initial W (Fast FIP)."""

    u: torch.Tensor
    vh: torch.Tensor
    s0: torch.Tensor

    def __init__(self, weight: torch.Tensor, layer_index: int = 0) -> None:
        super().__init__()
        u, s, vh = torch.linalg.svd(weight.detach().flatten(1).float(), full_matrices=False)
        self.register_buffer("u", u)
        self.register_buffer("vh", vh)
        self.register_buffer("s0", s.clone())
        self.s = nn.Parameter(s.clone())
        self.layer_index = layer_index

    @classmethod
    def for_tensor(cls, tensor: torch.Tensor, layer_index: int) -> SpectralDelta:
        return cls(tensor, layer_index)

    @property
    def size(self) -> int:
        return self.s.numel()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = (self.u * (self.s - self.s0)) @ self.vh
        return weight + delta.view_as(weight).to(weight.dtype)


#: the allow-list: kind name -> class. Descriptors name a kind; nothing outside this dict is ever constructed.
KINDS: dict[str, type[Reparametrization]] = {
    "neuron_mask": NeuronMask, "perturbed_mask": PerturbedMask, "shift_noise": ShiftNoise,
    "spectral_delta": SpectralDelta,
}


def kind_of(parametrization: nn.Module) -> str | None:
    """The :data:`KINDS` name of ``parametrization``'s exact class, or None for any other class."""
    return next((name for name, cls in KINDS.items() if type(parametrization) is cls), None)


@dataclass(frozen=True)
class Reparam:
    """One reparametrized tensor: ``module`` path, ``tensor`` name (``"weight"``/``"bias"``), :data:`KINDS`
    name, ``size`` (values it trains) and ``layer_index``. Serialise with :meth:`to_dict` / :meth:`from_dict`."""

    module: str
    tensor: str
    kind: str
    size: int
    layer_index: int

    def to_dict(self) -> dict[str, str | int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Reparam:
        """Validate a saved descriptor.

        Raises:
            ValueError: an unknown kind or malformed fields.
        """
        fields = {"module": str, "tensor": str, "kind": str, "size": int, "layer_index": int}
        if set(data) != set(fields) or not all(type(data[k]) is t for k, t in fields.items()):
            raise ValueError(f"malformed reparametrization descriptor {dict(data)!r}: needs {fields}")
        if data["kind"] not in KINDS:
            raise ValueError(f"unknown reparametrization kind {data['kind']!r}: must be one of {sorted(KINDS)}")
        return cls(data["module"], data["tensor"], data["kind"], data["size"], data["layer_index"])


def attach(model: nn.Module, kind: str, tensor: str, modules: Sequence[str], *,
           layer_indices: Sequence[int] | None = None) -> list[Reparam]:
    """Attach an identity reparametrization of ``kind`` to ``tensor`` of each module path in ``modules``,
    in place; all or none (a failure removes what this call attached, then re-raises).

    Args:
        layer_indices: each module's ``layer_index``; default 1, 2, ... in the order given.

    Returns:
        The descriptors of what was attached, in the order given.

    Raises:
        ValueError: unknown kind, a module path the model lacks, or a module without that tensor.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown reparametrization kind {kind!r}: must be one of {sorted(KINDS)}")
    indices = list(range(1, len(modules) + 1)) if layer_indices is None else list(layer_indices)
    if len(indices) != len(modules):
        raise ValueError(f"{len(modules)} modules but {len(indices)} layer indices")
    named = dict(model.named_modules())
    done: list[Reparam] = []
    try:
        for name, index in zip(modules, indices, strict=True):
            if name not in named:
                raise ValueError(f"model has no module {name!r}")
            target = getattr(named[name], tensor, None)
            if not isinstance(target, torch.Tensor):
                raise ValueError(f"module {name!r} has no tensor {tensor!r}")
            reparam = KINDS[kind].for_tensor(target, index)
            parametrize.register_parametrization(named[name], tensor, reparam)
            done.append(Reparam(name, tensor, kind, reparam.size, index))
    except Exception:
        detach(model, done)
        raise
    return done


def detach(model: nn.Module, reparams: Iterable[Reparam]) -> None:
    """Remove the given reparametrizations and restore the original tensors (discarding what they learned)."""
    named = dict(model.named_modules())
    for r in reparams:
        parametrize.remove_parametrizations(named[r.module], r.tensor, leave_parametrized=False)


def _parametrized(model: nn.Module) -> list[tuple[str, str, nn.ModuleList]]:
    """``(module path, tensor name, chain)`` of every parametrized tensor, in registration order."""
    found = []
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for tensor, chain in module.parametrizations.items():
                found.append((name, tensor, chain))
    return found


def _single_known(name: str, tensor: str, chain: nn.ModuleList) -> tuple[str, Reparametrization]:
    kinds = [kind_of(p) for p in chain]
    if len(chain) != 1 or kinds[0] is None:
        raise ValueError(f"{name}.{tensor} carries parametrizations {[type(p).__name__ for p in chain]}; "
                         f"only a single one of {sorted(KINDS)} can be described or folded")
    return kinds[0], cast(Reparametrization, chain[0])  # kind_of found its exact class in KINDS


def describe(model: nn.Module) -> list[Reparam]:
    """Every reparametrization attached to ``model``, in module registration order.

    Raises:
        ValueError: a tensor carries an unknown or a stacked parametrization.
    """
    out = []
    for name, tensor, chain in _parametrized(model):
        kind, reparam = _single_known(name, tensor, chain)
        out.append(Reparam(name, tensor, kind, reparam.size, reparam.layer_index))
    return out


def reattach(model: nn.Module, reparams: Iterable[Reparam]) -> None:
    """Attach ``reparams`` (from :func:`describe`, possibly via :meth:`Reparam.from_dict`) to a fresh copy of
    the architecture, so the reparametrized model's state dict then loads into it strictly. All or none.

    Raises:
        ValueError: unknown kind, missing module or tensor, or a size the tensor does not give.
    """
    done: list[Reparam] = []
    try:
        for r in reparams:
            attached = attach(model, r.kind, r.tensor, [r.module], layer_indices=[r.layer_index])[0]
            done.append(attached)
            if attached.size != r.size:
                raise ValueError(f"{r.module}.{r.tensor}: a {r.kind} of size {attached.size}, the descriptor "
                                 f"says {r.size}")
    except Exception:
        detach(model, done)
        raise


def fold(model: nn.Module, kinds: Collection[str] | None = None) -> nn.Module:
    """Bake reparametrizations into their tensors and remove them (``leave_parametrized=True``), in place.

    Folds every parametrized tensor (``kinds=None``) or those whose chain holds one of ``kinds``. Every tensor
    to fold is checked before any is touched: one that carries an unknown or stacked parametrization is refused
    (folding would silently merge something this package does not know). All parameters of the model become
    trainable again, as in a freshly built one. Returns ``model``.

    Never fold a ``copy.deepcopy`` of a reparametrized model while the original is still used (or the reverse):
    the copy shares torch's injected ``Parametrized*`` class, and removing a parametrization deletes the tensor's
    property from that class, breaking the other model. Re-attach on a fresh copy instead (:func:`reattach`).

    Raises:
        ValueError: an unknown kind in ``kinds``, or an unknown or stacked parametrization on a tensor to fold.
    """
    if kinds is not None and not set(kinds) <= set(KINDS):
        raise ValueError(f"unknown reparametrization kinds {sorted(set(kinds) - set(KINDS))}")
    targets = [(name, tensor, chain) for name, tensor, chain in _parametrized(model)
               if kinds is None or any(kind_of(p) in kinds for p in chain)]
    for name, tensor, chain in targets:
        _single_known(name, tensor, chain)
    named = dict(model.named_modules())
    for name, tensor, _ in targets:
        parametrize.remove_parametrizations(named[name], tensor, leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
