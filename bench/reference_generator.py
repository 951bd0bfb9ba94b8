"""The generator's synthesis as it was computed before the speed work (commit 45f640c), as plain functions
on a :class:`clcae.models.stylegan2.Generator`'s own weights: contiguous NCHW activations, the modulated conv as
``demod * conv(x * style, W)``, a depthwise blur, every element-wise step out of place.

Kept for two readers: ``tests/test_speed_paths.py`` checks that today's path equals it (same weights, 1e-4), and
``bench/generator.py`` times today's path against it in one process.  Not used by the library.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from clcae.models.stylegan2 import FEATURE_CONV, SQRT2, Generator, ModulatedConv2d, StyledConv, ToRGB


def _equal_linear(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.weight * layer.scale, layer.bias * layer.lr_mul)


def modulated_conv(conv: ModulatedConv2d, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    s = _equal_linear(conv.modulation, style)
    w = conv.weight[0] * conv.scale
    x = x * s[:, :, None, None]
    if conv.upsample:
        x = F.conv_transpose2d(x, w.transpose(0, 1), stride=2, padding=0)
        k = torch.flip(conv.blur.kernel, (0, 1)).expand(x.shape[1], 1, *conv.blur.kernel.shape)
        p0, p1 = conv.blur.pad
        x = F.conv2d(F.pad(x, (p0, p1, p0, p1)), k, groups=x.shape[1])
    else:
        x = F.conv2d(x, w, padding=conv.padding)
    if conv.demodulate:
        d = torch.rsqrt((s * s) @ (w * w).sum(dim=(2, 3)).t() + 1e-8)
        x = x * d[:, :, None, None]
    return x


def styled_conv(layer: StyledConv, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    x = modulated_conv(layer.conv, x, style)
    x = x + layer.noise.weight * noise
    return F.leaky_relu(x + layer.activate.bias.view(1, -1, 1, 1), 0.2) * SQRT2


def to_rgb(layer: ToRGB, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
    out = modulated_conv(layer.conv, x, style) + layer.bias
    if skip is not None:
        k = layer.upsample.kernel.expand(skip.shape[1], 1, *layer.upsample.kernel.shape)
        out = out + F.conv_transpose2d(skip, k, stride=2, padding=1, groups=skip.shape[1])
    return out


def prefix(g: Generator, w_plus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w_plus = g.broadcast(w_plus)
    noise = g.noise_maps()
    out = styled_conv(g.conv1, g.input(w_plus.shape[0]), w_plus[:, 0], noise[0])
    skip = to_rgb(g.to_rgb1, out, w_plus[:, 1], None)
    for k in range(FEATURE_CONV // 2 + 1):
        out = styled_conv(g.convs[2 * k], out, w_plus[:, 2 * k + 1], noise[2 * k + 1])
        out = styled_conv(g.convs[2 * k + 1], out, w_plus[:, 2 * k + 2], noise[2 * k + 2])
        skip = to_rgb(g.to_rgbs[k], out, w_plus[:, 2 * k + 3], skip)
    return out, skip


def suffix(g: Generator, feature: torch.Tensor, skip: torch.Tensor, w_plus: torch.Tensor) -> torch.Tensor:
    w_plus = g.broadcast(w_plus)
    noise = g.noise_maps()
    out = feature
    for k in range(FEATURE_CONV // 2 + 1, len(g.to_rgbs)):
        out = styled_conv(g.convs[2 * k], out, w_plus[:, 2 * k + 1], noise[2 * k + 1])
        out = styled_conv(g.convs[2 * k + 1], out, w_plus[:, 2 * k + 2], noise[2 * k + 2])
        skip = to_rgb(g.to_rgbs[k], out, w_plus[:, 2 * k + 3], skip)
    return skip


def synthesis(g: Generator, w_plus: torch.Tensor, f: torch.Tensor | None = None) -> torch.Tensor:
    """G(w+) (or G(w+, f) with f replacing the input of convs.4), constant noise, the old way."""
    g5, skip = prefix(g, w_plus)
    return suffix(g, g5 if f is None else f, skip, w_plus)
