"""Mask lower bound mu(l) per masked layer (NFT, Sec. 4.2 and ablation Sec. 5.3).

After every optimiser step the masks of layer l (counted from 1 in forward order) are clipped to
[mu(l), 1]. mu decreases with depth, so early layers (generic features) barely change and deep layers
(where backdoors live) may be suppressed. The paper's choice is exponential, ``alpha * exp(-beta * l)``;
the other shapes reproduce its ablation. The paper does not print their formulas, so they are defined here
on the relative depth t = (l - 1) / (L - 1) in [0, 1], each falling from alpha at the first masked layer:

- linear:       alpha * (1 - t)
- cosine:       alpha * cos(pi * t / 2)
- cubic:        alpha * (1 - t) ** 3
- logarithmic:  alpha * (1 - ln(1 + (e - 1) * t))
- none:         0 (masks are only kept in [0, 1])
"""

from __future__ import annotations

import math


def mask_lower_bound(layer: int, num_layers: int, kind: str = "exponential", alpha: float = 0.8,
                     beta: float = 0.5) -> float:
    """mu(l) for masked layer ``layer`` (1-based) out of ``num_layers``."""
    if not 1 <= layer <= num_layers:
        raise ValueError(f"layer={layer} must be in [1, num_layers={num_layers}]")
    t = (layer - 1) / (num_layers - 1) if num_layers > 1 else 0.0
    if kind == "exponential":
        return alpha * math.exp(-beta * layer)
    if kind == "linear":
        return alpha * (1.0 - t)
    if kind == "cosine":
        return alpha * math.cos(math.pi * t / 2)
    if kind == "cubic":
        return alpha * (1.0 - t) ** 3
    if kind == "logarithmic":
        return alpha * (1.0 - math.log1p((math.e - 1.0) * t))
    if kind == "none":
        return 0.0
    raise ValueError(f"unknown schedule kind {kind!r}")


def mask_lower_bounds(num_layers: int, kind: str = "exponential", alpha: float = 0.8, beta: float = 0.5) -> list[float]:
    """[mu(1), ..., mu(L)]."""
    return [mask_lower_bound(l, num_layers, kind, alpha, beta) for l in range(1, num_layers + 1)]
