"""IR-SE ResNets (ArcFace backbones) in the TreB1eN / pSp key layout.

The same body serves two purposes:
* the pyramid encoder of pSp/CLCAE (``input_layer`` + ``body``; loaded non-strictly from
  ``model_ir_se50.pth`` because the face-recognition head is not used there), and
* the frozen ArcFace identity network of the ID loss (``input_layer`` + ``body`` + ``output_layer``,
  loaded strictly).

Key layout (TreB1eN ``model_ir_se50.pth``)::

    input_layer.{0: Conv3x3(3->64), 1: BN, 2: PReLU}
    body.N.shortcut_layer.{0: Conv1x1, 1: BN}        (only when in_channels != depth)
    body.N.res_layer.{0: BN, 1: Conv3x3, 2: PReLU, 3: Conv3x3(stride), 4: BN, 5: SE(fc1, fc2)}
    output_layer.{0: BN2d, 1: Dropout, 2: Flatten, 3: Linear(512*7*7 -> 512), 4: BN1d}
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class BackboneSpec:
    """Units per stage and channel depth per stage; each stage halves the resolution."""

    units: tuple[int, int, int, int]
    depths: tuple[int, int, int, int] = (64, 128, 256, 512)
    se: bool = True


# Unit counts are those of insightface / TreB1eN ``get_blocks``.  "ir_se_tiny" is ours: one unit per stage
# and narrow channels, so a CPU test or demo runs the same code path in milliseconds.
BACKBONES: dict[str, BackboneSpec] = {
    "ir_se50": BackboneSpec((3, 4, 14, 3)),
    "ir_se100": BackboneSpec((3, 13, 30, 3)),
    "ir_se152": BackboneSpec((3, 8, 36, 3)),
    "ir50": BackboneSpec((3, 4, 14, 3), se=False),
    "ir_se_tiny": BackboneSpec((1, 1, 1, 1), (16, 32, 64, 64)),
}


def backbone_spec(name: str, width: int | None = None) -> BackboneSpec:
    """Look up a backbone by name; ``width`` overrides the last-stage depth (the pyramid width)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    spec = BACKBONES[name]
    if width is not None and width != spec.depths[-1]:
        d = spec.depths
        spec = BackboneSpec(spec.units, (d[0], d[1], d[2], width), spec.se)
    return spec


class SEModule(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s


class BottleneckIR(nn.Module):
    """Pre-activation IR unit; the stride sits on the second conv as in insightface."""

    def __init__(self, in_channels: int, depth: int, stride: int, se: bool = True):
        super().__init__()
        if in_channels == depth:
            # A 1x1 max-pool with stride is a parameter-free subsampling shortcut (no keys in the state_dict).
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, depth, 1, stride, bias=False), nn.BatchNorm2d(depth)
            )
        layers: list[nn.Module] = [
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
        ]
        if se:
            layers.append(SEModule(depth, 16))
        self.res_layer = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


def make_input_layer(out_channels: int = 64) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, out_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(out_channels),
                         nn.PReLU(out_channels))


def make_body(spec: BackboneSpec) -> tuple[nn.Sequential, list[int]]:
    """The flat ``body`` Sequential and the index of the last unit of each stage (the pyramid taps)."""
    units: list[nn.Module] = []
    stage_ends: list[int] = []
    in_channels = spec.depths[0]
    for n, depth in zip(spec.units, spec.depths):
        units.append(BottleneckIR(in_channels, depth, 2, spec.se))
        units.extend(BottleneckIR(depth, depth, 1, spec.se) for _ in range(n - 1))
        in_channels = depth
        stage_ends.append(len(units) - 1)
    return nn.Sequential(*units), stage_ends


class IRSEBackbone(nn.Module):
    """ArcFace recognition network: 112x112 RGB in [-1, 1] -> L2-normalised 512-d embedding.

    ``Backbone(112, 50, 'ir_se')`` of TreB1eN/pSp; loads ``model_ir_se50.pth`` with ``strict=True``.
    """

    def __init__(self, name: str = "ir_se50", input_size: int = 112, embedding_dim: int = 512,
                 drop_ratio: float = 0.6):
        super().__init__()
        if input_size not in (112, 224):
            raise ValueError(f"ArcFace input_size must be 112 or 224, got {input_size}")
        self.spec = backbone_spec(name)
        self.input_size = input_size
        last = self.spec.depths[-1]
        self.input_layer = make_input_layer(self.spec.depths[0])
        self.body, _ = make_body(self.spec)
        side = input_size // 16
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(last), nn.Dropout(drop_ratio), nn.Flatten(),
            nn.Linear(last * side * side, embedding_dim), nn.BatchNorm1d(embedding_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"ArcFace expects {self.input_size}x{self.input_size} input, got {tuple(x.shape[-2:])}")
        x = self.output_layer(self.body(self.input_layer(x)))
        return F.normalize(x, dim=1)
