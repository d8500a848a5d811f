"""Class-stratified selection of a clean subset (e.g. NFT's 1 % clean validation set or N samples per class)."""

from __future__ import annotations

import torch

from nft_core.data.image_data import ImageData


def stratified_split(data: ImageData, *, per_class: int | None = None, fraction: float | None = None,
                     seed: int = 0) -> tuple[ImageData, ImageData]:
    """Split ``data`` into ``(selected, rest)`` with a fixed share of every class in ``selected``.

    Args:
        data: the dataset to split.
        per_class: take this many samples of every class present (all of a smaller class).
        fraction: take ``round(fraction * class size)`` samples of every class, at least one.
        seed: seed of the random choice; the same seed selects the same samples.

    Returns:
        ``(selected, rest)``, each in the original sample order.

    Raises:
        ValueError: not exactly one of ``per_class``/``fraction`` given, or it is out of range.
    """
    if (per_class is None) == (fraction is None):
        raise ValueError("give exactly one of per_class and fraction")
    if per_class is not None and per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    g = torch.Generator().manual_seed(seed)
    chosen = torch.zeros(len(data), dtype=torch.bool)
    for c in data.y.unique().tolist():
        members = (data.y == c).nonzero().flatten()
        k = per_class if per_class is not None else max(1, round(fraction * len(members)))  # type: ignore[operator]  # fraction is set when per_class is not
        chosen[members[torch.randperm(len(members), generator=g)[:k]]] = True
    return data.subset(chosen.nonzero().flatten()), data.subset((~chosen).nonzero().flatten())
