"""ResNet20 for CIFAR-10 (He et al., 2016, section 4.2), the network of the paper's CIFAR-10 table.

Three stages of three basic blocks with 16, 32 and 64 channels, a 3x3 stem and a linear
classifier: 19 convolutions and one linear layer, 20 weight layers, 0.27 M parameters (269,722).

Shortcut choice (ours, as the paper does not restate it): He et al.'s option A, a
parameter-free shortcut that subsamples by 2 and zero-pads the new channels when a
stage changes width. It keeps the published 0.27 M parameter count and means every
weight of the network sits in one of the 20 layers that HAWQ assigns bits to.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "ResNetCifar", "resnet20"]


class PadShortcut(nn.Module):
    """Option-A shortcut: spatial subsampling by ``stride`` and zero channels appended."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.extra, self.stride = out_channels - in_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection: relu(bn2(conv2(relu(bn1(conv1 x)))) + x)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut = (PadShortcut(in_channels, out_channels, stride)
                         if stride != 1 or in_channels != out_channels else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR ResNet with ``depth = 6n + 2`` layers (n basic blocks per stage)."""

    def __init__(self, depth: int = 20, num_classes: int = 10, widths=(16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 44, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out" if isinstance(m, nn.Conv2d) else "fan_in")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet20(num_classes: int = 10) -> ResNetCifar:
    """ResNet20 for 32x32 inputs: 20 weight layers, 269,722 parameters for 10 classes."""
    return ResNetCifar(20, num_classes)
