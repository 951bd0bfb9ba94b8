"""pSp-style pyramid encoders (IR-SE + FPN) with map2style heads (:mod:`clcae.models.map2style`): the CLCAE
inversion encoder and the pSp/e4e baselines.

Module names follow pSp and the authors' ``GradualStyleEncoder`` (``input_layer``, ``body``, ``styles``,
``styles_others``, ``latlayer1/2``, ``cross_attention``, ``feature_cross_attention``, ``content_layer``), so
their checkpoints load onto ours key for key.

Pyramid for a 256x256 input (IR-SE50): T1 = c3 16x16x512, T2 = p2 32x32x512, T3 = p1 64x64x512, where
``p2 = up(c3) + latlayer1(c2)`` and ``p1 = up(p2) + latlayer2(c1)`` (bilinear, align_corners=True).

The baselines of the fidelity study share this pyramid: :class:`PSPEncoder` (pSp's GradualStyleEncoder) and
e4e, which is :class:`CLCAEEncoder` without W+ attention and without the F branch (``feature=False``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from clcae.models.attention import CrossAttention
from clcae.models.irse import backbone_spec, make_body, make_input_layer
from clcae.models.map2style import GradualFeatureBlock, GradualStyleBlock
from clcae.models.stylegan2 import FEATURE_RES


@dataclass(frozen=True)
class PyramidShapes:
    t1: tuple[int, int]
    t2: tuple[int, int]
    t3: tuple[int, int]


class PyramidEncoder(nn.Module):
    """IR-SE body with an FPN: image (B, 3, H, W) -> (T1, T2, T3) at H/16, H/8, H/4, all ``width`` channels."""

    def __init__(self, backbone: str = "ir_se50", input_size: tuple[int, int] = (256, 256),
                 width: int | None = None):
        super().__init__()
        spec = backbone_spec(backbone, width)
        self.width = spec.depths[-1]
        self.input_size = tuple(input_size)
        h, w = self.input_size
        if h % 16 or w % 16:
            raise ValueError(f"encoder input size must be divisible by 16, got {self.input_size}")
        self.shapes = PyramidShapes((h // 16, w // 16), (h // 8, w // 8), (h // 4, w // 4))
        self.input_layer = make_input_layer(spec.depths[0])
        self.body, ends = make_body(spec)
        self.taps = (ends[1], ends[2], ends[3])  # c1 (H/4), c2 (H/8), c3 (H/16)
        self.latlayer1 = nn.Conv2d(spec.depths[2], self.width, 1)
        self.latlayer2 = nn.Conv2d(spec.depths[1], self.width, 1)

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(f"encoder expects images of shape (B, 3, {self.input_size[0]}, {self.input_size[1]}),"
                             f" got {tuple(x.shape)}")

    def backbone(self, x: torch.Tensor, stop_at_c3: bool = False) -> tuple[torch.Tensor, ...]:
        self.check_input(x)
        x = self.input_layer(x)
        c1 = c2 = None
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i == self.taps[0]:
                c1 = x
            elif i == self.taps[1]:
                c2 = x
        return (x,) if stop_at_c3 else (c1, c2, x)

    @staticmethod
    def _upsample_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y

    def pyramid(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c1, c2, c3 = self.backbone(x)
        p2 = self._upsample_add(c3, self.latlayer1(c2))
        p1 = self._upsample_add(p2, self.latlayer2(c1))
        return c3, p2, p1


class WEncoder(PyramidEncoder):
    """Pyramid encoder plus the map2style head on T1 that predicts w (an offset from latent_avg).

    Subclasses with per-layer heads read style block i from T1 for i < ``coarse_ind``, from T2 for
    i < ``middle_ind`` and from T3 after that."""

    coarse_ind, middle_ind = 2, 6

    def __init__(self, backbone: str = "ir_se50", input_size: tuple[int, int] = (256, 256), style_dim: int = 512):
        super().__init__(backbone, input_size, width=style_dim)
        self.style_dim = style_dim
        self.styles = nn.ModuleList([GradualStyleBlock(self.width, style_dim, self.shapes.t1)])

    def w_offset(self, x: torch.Tensor) -> torch.Tensor:
        (c3,) = self.backbone(x, stop_at_c3=True)
        return self.styles[0](c3)

    def source_of(self, i: int) -> str:
        return "t1" if i < self.coarse_ind else ("t2" if i < self.middle_ind else "t3")

    def read_styles(self, x: torch.Tensor, blocks: nn.ModuleList
                    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """(block i applied to its pyramid level for every i, T1, T3)."""
        t1, t2, t3 = self.pyramid(x)
        maps = {"t1": t1, "t2": t2, "t3": t3}
        return [block(maps[self.source_of(i)]) for i, block in enumerate(blocks)], t1, t3


@dataclass
class EncoderOutput:
    w_offset: torch.Tensor       # (B, D): w - latent_avg
    # (B, N, D): [w_offset, coarse residuals dw+_1..N-1] (the authors' `latents`); pSp: every layer's offset
    deltas: torch.Tensor
    t3: torch.Tensor             # (B, C, H/4, W/4)


class CLCAEEncoder(WEncoder):
    """Predicts w, the coarse W+ residuals and the F feature from an image (paper Sec. 3.2, Fig. 3).

    Residual i (1 <= i < N) comes from T1 for i <= 2, from T2 for i <= 6 and from T3 after that, as in the
    authors' code (the pSp coarse/medium/fine split with w in pSp's first slot).

    ``feature=False`` drops the F branch (f is None): with ``w_attention=False`` that is e4e's encoder,
    w + per-layer deltas read from the same pyramid with the same split.
    """

    def __init__(self, backbone: str = "ir_se50", input_size: tuple[int, int] = (256, 256), style_dim: int = 512,
                 n_latent: int = 18, feature_channels: int = 512, w_attention: bool = True,
                 f_attention: bool = True, heads: int = 4, ffn: int = 1024, dropout: float = 0.1, tokens: int = 1,
                 feature: bool = True):
        super().__init__(backbone, input_size, style_dim)
        self.n_latent = n_latent
        self.has_feature = feature
        self.w_attention, self.f_attention = w_attention, f_attention and feature
        sources = [self.source_of(i) for i in range(n_latent - 1)]
        self.styles_others = nn.ModuleList(
            GradualStyleBlock(self.width, style_dim, getattr(self.shapes, s)) for s in sources
        )
        if w_attention:
            self.cross_attention = nn.ModuleList(
                CrossAttention(style_dim, heads, ffn, dropout, tokens) for _ in range(n_latent)
            )
        if self.f_attention:
            self.feature_cross_attention = CrossAttention(style_dim, heads, ffn, dropout, tokens)
        if feature:
            t3_side = max(self.shapes.t3)
            if t3_side < FEATURE_RES:
                raise ValueError(f"T3 ({self.shapes.t3}) is smaller than the 16x16 feature f; use a larger input size")
            self.content_layer = GradualFeatureBlock(self.width, feature_channels, t3_side)

    def features(self, x: torch.Tensor) -> EncoderOutput:
        residuals, t1, t3 = self.read_styles(x, self.styles_others)
        w_off = self.styles[0](t1)
        return EncoderOutput(w_off, torch.stack([w_off, *residuals], dim=1), t3)

    def w_plus_offset(self, w_off: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """(B, N, D) offsets of w+ from latent_avg (Eq. 4): w + Attn(Q = w, K = V = dw+_i) per layer."""
        if not self.w_attention:
            # Ablation: the coarse residuals are used directly (layer 0 is w itself).
            res = deltas.clone()
            res[:, 0] = 0
            return w_off[:, None] + res
        q = w_off[:, None]
        # Block 0's key/value is w itself (the authors' latents[0]); taking it from ``w_off`` rather than
        # ``deltas[:, 0]`` makes an edited w reach block 0 too, as in the authors' edit path.
        memory = torch.cat([q, deltas[:, 1:]], dim=1)
        refined = [attn(q, memory[:, i:i + 1])[:, 0] for i, attn in enumerate(self.cross_attention)]
        return w_off[:, None] + torch.stack(refined, dim=1)

    def feature(self, t3: torch.Tensor, w_off: torch.Tensor) -> torch.Tensor | None:
        """f (B, C_G5, 16, 16) = CNN(Attn(Q = T3, K = V = w) + T3) (Eq. 5); None without the F branch."""
        if not self.has_feature:
            return None
        b, c, h, w = t3.shape
        if self.f_attention:
            tokens = t3.flatten(2).transpose(1, 2)                     # (B, HW, C)
            t3 = self.feature_cross_attention(tokens, w_off[:, None]).transpose(1, 2).reshape(b, c, h, w)
        if h != w:
            # Non-square inputs (cars, 192x256): zero-pad T3 to a square, centred, as the authors do.
            side = max(h, w)
            ph, pw = side - h, side - w
            t3 = F.pad(t3, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return self.content_layer(t3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, EncoderOutput]:
        feats = self.features(x)
        w_plus_off = self.w_plus_offset(feats.w_offset, feats.deltas)
        f = self.feature(feats.t3, feats.w_offset)
        return feats.w_offset, w_plus_off, f, feats


class PSPEncoder(WEncoder):
    """pSp's GradualStyleEncoder: one map2style block per w+ layer, no attention, no f (a fidelity baseline).

    pSp's split: styles [0, 3) read T1, [3, 7) read T2, the rest T3; w+ = latent_avg + styles(x). pSp has no
    single w: we define w = the mean of w+ over layers, and an edit of w moves every layer of w+ by the same
    amount (pSp's way of applying a W direction). ``styles.0`` reads T1 like :class:`WEncoder`'s w head.
    """

    coarse_ind, middle_ind = 3, 7
    has_feature = w_attention = f_attention = False

    def __init__(self, backbone: str = "ir_se50", input_size: tuple[int, int] = (256, 256), style_dim: int = 512,
                 n_latent: int = 18):
        super().__init__(backbone, input_size, style_dim)
        self.n_latent = n_latent
        self.styles = nn.ModuleList(
            GradualStyleBlock(self.width, style_dim, getattr(self.shapes, self.source_of(i))) for i in range(n_latent)
        )

    def features(self, x: torch.Tensor) -> EncoderOutput:
        styles, _, t3 = self.read_styles(x, self.styles)
        offsets = torch.stack(styles, dim=1)
        return EncoderOutput(offsets.mean(dim=1), offsets, t3)

    def w_plus_offset(self, w_off: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """Every layer's offset, shifted by how far ``w_off`` is from their mean (0 unless w was edited)."""
        return deltas + (w_off - deltas.mean(dim=1))[:, None]

    def feature(self, t3: torch.Tensor, w_off: torch.Tensor) -> None:
        return None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, EncoderOutput]:
        feats = self.features(x)
        return feats.w_offset, feats.deltas, None, feats
