"""Model builders, resolved by name from an allow-list (never from code shipped with a model).

``build_model("small_cnn", num_classes=10)`` builds a project model; ``build_model("torchvision.resnet18",
num_classes=10)`` resolves a torchvision classification model with random weights (weights are never
downloaded). :class:`Normalized` wraps any of them so that inputs are images in [0, 1] and the per-channel
normalisation travels with the model (and into the ONNX graph).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from nft_core.models.preact_resnet import PreActResNet18
from nft_core.models.small_cnn import SmallCNN
from nft_core.models.vit import SmallViT

#: Project architectures by builder name.
PROJECT_MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "preact_resnet18": PreActResNet18,
    "small_vit": SmallViT,
}

TORCHVISION_PREFIX = "torchvision."


def available_builders() -> list[str]:
    """All builder names accepted by :func:`build_model`."""
    from torchvision import models as tvm

    return sorted(PROJECT_MODELS) + [TORCHVISION_PREFIX + n for n in tvm.list_models(module=tvm)]


def build_model(builder: str, **kwargs: Any) -> nn.Module:
    """Build an architecture with random weights from the allow-list.

    Args:
        builder: a key of :data:`PROJECT_MODELS` or ``"torchvision.<name>"`` for a torchvision classification
            model (``torchvision.models.list_models(module=torchvision.models)``).
        **kwargs: constructor arguments (``num_classes`` and the like). ``weights`` is refused: pretrained
            weights would be a download, and candidate weights come from the model package instead.

    Raises:
        ValueError: the builder is not on the allow-list, or ``weights`` was passed.
    """
    if "weights" in kwargs or "weights_backbone" in kwargs:
        raise ValueError("builder kwargs may not request pretrained weights ('weights'/'weights_backbone')")
    if builder in PROJECT_MODELS:
        return PROJECT_MODELS[builder](**kwargs)
    if builder.startswith(TORCHVISION_PREFIX):
        from torchvision import models as tvm

        name = builder[len(TORCHVISION_PREFIX):]
        if name in tvm.list_models(module=tvm):
            model: nn.Module = tvm.get_model(name, weights=None, **kwargs)
            return model
    raise ValueError(
        f"builder {builder!r} is not on the allow-list; use one of {sorted(PROJECT_MODELS)} "
        f"or 'torchvision.<classification model>'"
    )


class Normalized(nn.Module):
    """``net((x - mean) / std)``: takes images in [0, 1], NCHW.

    ``mean``/``std`` are non-persistent buffers, so ``Normalized(net).net.state_dict()`` is exactly the
    wrapped model's state dict and the wrapper adds no keys.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean ({len(mean)} values) and std ({len(std)} values) differ in length")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


__all__ = ["PROJECT_MODELS", "Normalized", "PreActResNet18", "SmallCNN", "SmallViT", "available_builders", "build_model"]
