"""map2style (pSp): the blocks that turn a pyramid level into one style vector, and the 'CNN' of the paper's
Eq. 5 that turns T3 into the 16x16 feature f."""

from __future__ import annotations

import math

import torch
from torch import nn

from clcae.models.stylegan2 import FEATURE_RES, EqualLinear


def _n_halvings(h: int, w: int, target: int = 1) -> int:
    """Stride-2 convs (k3, p1) needed to bring an h x w map down to target x target (ceil division)."""
    n = 0
    while max(h, w) > target:
        h, w = (h + 1) // 2, (w + 1) // 2
        n += 1
    if (h, w) != (target, target):
        raise ValueError(f"cannot reduce a feature map to {target}x{target} by halving")
    return n


class GradualStyleBlock(nn.Module):
    """map2style: stride-2 convs down to 1x1, then an equalised linear layer -> one style vector."""

    def __init__(self, in_c: int, out_c: int, spatial: tuple[int, int]):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(_n_halvings(*spatial)):
            layers += [nn.Conv2d(in_c if i == 0 else out_c, out_c, 3, stride=2, padding=1), nn.LeakyReLU()]
        self.out_c = out_c
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(out_c, out_c, lr_mul=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.convs(x).view(-1, self.out_c))


class GradualFeatureBlock(nn.Module):
    """The 'CNN' of Eq. 5: stride-2 convs from T3's size down to G5's 16x16 (one stride-1 conv if equal)."""

    def __init__(self, in_c: int, out_c: int, in_size: int, out_size: int = FEATURE_RES):
        super().__init__()
        n = int(math.log2(in_size // out_size))
        layers: list[nn.Module] = []
        for i in range(max(n, 1)):
            stride = 2 if n > 0 else 1
            layers += [nn.Conv2d(in_c if i == 0 else out_c, out_c, 3, stride=stride, padding=1), nn.LeakyReLU()]
        self.convs = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)
