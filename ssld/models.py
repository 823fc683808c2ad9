"""Small image classifiers defined in the repository.

For tests, the demo and CPU-only machines, where timm cannot be used. They follow the shape
of the real backbones (conv stem, residual stages, global pooling, linear head) at a size
that trains in seconds on a CPU. Use them as ``--teacher ssld.models:tiny_resnet`` or build
them directly.
"""

from __future__ import annotations

import torch
from torch import nn


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


class TinyResNet(nn.Module):
    """conv stem -> len(widths) residual stages (stride 2 after the first) -> pool -> linear.

    Args:
        num_classes: outputs of the head.
        widths: channels per stage.
        in_chans: input channels.
    Input (N, in_chans, H, W) float, output (N, num_classes) logits.
    """

    def __init__(self, num_classes: int = 10, widths=(16, 32, 64), in_chans: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            stages.append(_Block(cin, w, 1 if i == 0 else 2))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, num_classes)

    def forward_features(self, x):
        return self.stages(self.stem(x)).mean((2, 3))

    def forward(self, x):
        return self.head(self.forward_features(x))


def tiny_resnet(num_classes: int = 10, seed: int = 0, **kw) -> TinyResNet:
    """A TinyResNet with weights drawn from ``torch.manual_seed(seed)`` (reproducible)."""
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = TinyResNet(num_classes, **kw)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval()
