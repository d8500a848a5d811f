"""Offline synthetic image source: ten shape classes rendered with random geometry, colours and clutter.

Each image is one filled shape (disc, square, diamond, triangle, plus, cross, ring, hollow square, two
horizontal bars, two vertical bars) drawn at a random position, scale and small rotation, in a random
foreground colour over a random background colour, on top of a low-frequency colour field, with pixel noise.
Colours are drawn independently of the class, so neither the mean colour nor any single pixel reveals the
label; a classifier has to learn shape. Every class is symmetric under a horizontal flip and the rotation
range is symmetric, so the usual crop/flip augmentation keeps labels valid.

Generation is vectorised (a few torch operations over the whole batch) and deterministic from ``seed``; train and
test splits come from different random streams (seeded with ``2 * seed`` and ``2 * seed + 1``), so they are disjoint.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nft_core.data.image_data import ImageData

#: Shape families, in label order.
SHAPES: tuple[str, ...] = ("disc", "square", "diamond", "triangle", "plus", "cross", "ring", "hollow_square",
                           "hbars", "vbars")

_EDGE = 12.0  # edge sharpness of the soft shape masks (in units of the shape's radius)


def _shape_field(kind: int, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """A signed 'inside-ness' field (> 0 inside) for one shape family in shape-local coordinates."""
    ax, ay = torch.abs(px), torch.abs(py)
    if kind == 0:
        return 0.9 - torch.hypot(px, py)
    if kind == 1:
        return 0.75 - torch.maximum(ax, ay)
    if kind == 2:
        return 1.05 - (ax + ay)
    if kind == 3:
        return torch.minimum(py + 0.6, 0.9 - py - 1.6 * ax)
    if kind in (4, 5):
        if kind == 5:
            px, py = (px - py) / math.sqrt(2), (px + py) / math.sqrt(2)
            ax, ay = torch.abs(px), torch.abs(py)
        arm = torch.minimum(0.25 - torch.minimum(ax, ay), 0.95 - torch.maximum(ax, ay))
        return arm
    if kind == 6:
        r = torch.hypot(px, py)
        return torch.minimum(r - 0.5, 0.95 - r)
    if kind == 7:
        m = torch.maximum(ax, ay)
        return torch.minimum(m - 0.45, 0.85 - m)
    if kind == 8:
        return torch.minimum(0.2 - torch.abs(ay - 0.45), 0.9 - ax)
    return torch.minimum(0.2 - torch.abs(ax - 0.45), 0.9 - ay)


def _uniform(g: torch.Generator, lo: float, hi: float, *shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=g) * (hi - lo) + lo


def render_shapes(labels: torch.Tensor, generator: torch.Generator, image_size: int = 32) -> torch.Tensor:
    """Render one image per label.

    Args:
        labels: int64 tensor of shape (N,), values in [0, len(SHAPES)).
        generator: the random stream all per-image parameters are drawn from.
        image_size: height and width.

    Returns:
        uint8 tensor N x 3 x H x W.
    """
    g, n = generator, len(labels)
    coords = (torch.arange(image_size) + 0.5) / image_size * 2 - 1
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    cx, cy = _uniform(g, -0.3, 0.3, 2, n, 1, 1)
    scale = _uniform(g, 0.4, 0.65, n, 1, 1)
    angle = _uniform(g, -0.3, 0.3, n, 1, 1)
    dx, dy = (gx - cx) / scale, (gy - cy) / scale
    px = torch.cos(angle) * dx + torch.sin(angle) * dy
    py = -torch.sin(angle) * dx + torch.cos(angle) * dy
    field = torch.empty(n, image_size, image_size)
    for kind in labels.unique().tolist():
        sel = labels == kind
        field[sel] = _shape_field(kind, px[sel], py[sel])
    alpha = torch.sigmoid(_EDGE * field).unsqueeze(1)

    bg = _uniform(g, 0, 1, n, 3, 1, 1)
    fg = (bg + 0.5 + _uniform(g, -0.2, 0.2, n, 3, 1, 1)) % 1.0
    coarse = torch.randn(n, 3, 4, 4, generator=g) * 0.12
    clutter = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    noise = torch.randn(n, 3, image_size, image_size, generator=g) * 0.04
    img = alpha * fg + (1 - alpha) * (bg + clutter) + noise
    return (img * 255).round_().clamp_(0, 255).to(torch.uint8)


def make_synthetic(n: int, *, seed: int = 0, train: bool = True, num_classes: int = 10,
                   image_size: int = 32) -> ImageData:
    """``n`` synthetic shape images with balanced labels (see the module docstring).

    Args:
        n: number of images.
        seed: seed of the random stream; the same seed gives identical bytes.
        train: the training split (stream ``2 * seed``) or the test split (stream ``2 * seed + 1``).
        num_classes: number of shape families used, 2 to ``len(SHAPES)``.
        image_size: height and width (at least 8).

    Raises:
        ValueError: ``n`` below 1, ``num_classes`` or ``image_size`` out of range.
    """
    if n < 1:
        raise ValueError(f"synthetic dataset size n must be >= 1, got {n}")
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"synthetic num_classes must be in [2, {len(SHAPES)}], got {num_classes}")
    if image_size < 8:
        raise ValueError(f"synthetic image_size must be >= 8, got {image_size}")
    g = torch.Generator().manual_seed(2 * seed + (0 if train else 1))
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    return ImageData(render_shapes(labels, g, image_size), labels, num_classes, SHAPES[:num_classes])
