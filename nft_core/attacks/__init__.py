"""Backdoor attacks by name, for probes (ASR measurement) and for building backdoored candidates.

Each attack is a frozen dataclass, deterministic from its seed, working on float images in [0, 1]
(N x C x H x W) and returning triggered images clamped to [0, 1]. Settings follow the NFT supplementary
(Karim et al., ECCV 2024, Sec. 2.1) where it gives them.
"""

from __future__ import annotations

from typing import Any

from nft_core.attacks.badnets import BadNets
from nft_core.attacks.base import MODES, Attack
from nft_core.attacks.blend import Blend
from nft_core.attacks.clean_label import CleanLabel
from nft_core.attacks.sig import SIG, CleanLabelSIG
from nft_core.attacks.trojan import Trojan
from nft_core.attacks.wanet import WaNet

_REGISTRY: dict[str, type[Attack]] = {cls.name: cls for cls in (BadNets, Blend, SIG, Trojan, WaNet, CleanLabel)}

#: Names accepted by :func:`make_attack`.
ATTACKS: tuple[str, ...] = tuple(_REGISTRY)


def make_attack(name: str, *, target: int = 0, mode: str = "all2one", num_classes: int = 10,
                image_shape: tuple[int, int, int] = (3, 32, 32), seed: int = 0, **kwargs: Any) -> Attack:
    """Build the attack called ``name``.

    Args:
        name: one of :data:`ATTACKS`.
        target: target class (all2one), also the poisoned class of clean-label attacks.
        mode: ``"all2one"`` or ``"all2all"``.
        num_classes: number of classes.
        image_shape: (C, H, W) of the images.
        seed: seed of the trigger's random parts.
        **kwargs: attack-specific options (e.g. ``alpha`` for blend, ``s`` for wanet, ``clean_label=True`` for
            sig); see each attack class.

    Raises:
        ValueError: unknown name (the message lists :data:`ATTACKS`), or a bad target, mode or option value.
        TypeError: an option the attack does not have.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown attack {name!r}; use one of {list(ATTACKS)}")
    cls = _REGISTRY[name]
    if name == "sig" and kwargs.pop("clean_label", False):
        cls = CleanLabelSIG
    unknown = sorted(set(kwargs) - set(cls.option_names()))
    if unknown:
        raise TypeError(f"attack {name!r} has no option(s) {unknown}; it takes {cls.option_names()}")
    channels, height, width = image_shape  # a list from a config file becomes the tuple attacks take
    return cls(target=target, mode=mode, num_classes=num_classes, image_shape=(channels, height, width), seed=seed,
               **kwargs)


__all__ = ["ATTACKS", "MODES", "SIG", "Attack", "BadNets", "Blend", "CleanLabel", "CleanLabelSIG", "Trojan",
           "WaNet", "make_attack"]
