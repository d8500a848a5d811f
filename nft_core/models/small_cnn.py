"""A small, fast CNN for tests, demos and CPU benchmarks (about 0.3 M parameters at width 32)."""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Three conv stages (two conv-BN-ReLU each, then max-pool) and a linear head.

    Args:
        num_classes: number of output logits.
        in_channels: image channels.
        width: channels of the first stage; stages use width, 2*width, 4*width.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        w1, w2, w3 = width, 2 * width, 4 * width
        self.features = nn.Sequential(
            *_conv_bn(in_channels, w1), *_conv_bn(w1, w1), nn.MaxPool2d(2),
            *_conv_bn(w1, w2), *_conv_bn(w2, w2), nn.MaxPool2d(2),
            *_conv_bn(w2, w3), *_conv_bn(w3, w3), nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(w3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))
