"""Small image classifiers used by the self-test zoo and the benchmarks.

- `nc_mnist`: the Neural Cleanse paper's MNIST network, 2 conv + 2 dense layers.
- `gtsrb_cnn`: a GTSRB-style network, 6 conv layers in 3 blocks + 2 dense layers; channel widths
  16-32-64 (the Neural Cleanse paper uses 32-64-128) so that training fits 2 CPU cores.
- `resnet_small`: a small ResNet (3 stages of one basic block, 16-32-64 channels).

All take float inputs (N, C, H, W) in [0, 1] and return logits; none normalises internally.
"""

from __future__ import annotations

import torch
from torch import nn


class NCMnistNet(nn.Module):
    """conv5x5(16) - pool - conv5x5(32) - pool - dense(512) - dense(classes)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = ((image_size - 4) // 2 - 4) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * side * side, 512), nn.ReLU(), nn.Linear(512, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class GtsrbCNN(nn.Module):
    """Three blocks of two 3x3 convs and a 2x2 max-pool, then dense(256) - dense(classes)."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 43,
        image_size: int = 32,
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            layers += [
                nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
                nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        side = image_size // 8
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * side * side, 256), nn.ReLU(), nn.Linear(256, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem conv(16) then stages of one basic block each at 16, 32, 64 channels; global pool."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.stages = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


ARCHITECTURES: dict[str, type[nn.Module]] = {
    "nc_mnist": NCMnistNet,
    "gtsrb_cnn": GtsrbCNN,
    "resnet_small": SmallResNet,
}


def build_model(arch: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """Instantiate an architecture by name (see ARCHITECTURES)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](in_channels=in_channels, num_classes=num_classes, image_size=image_size)
