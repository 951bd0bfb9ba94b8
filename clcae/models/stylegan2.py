"""StyleGAN2 generator, state_dict-compatible with rosinality/stylegan2-pytorch, in pure PyTorch.

Every key, shape and buffer matches rosinality's ``Generator`` (``g_ema`` of its checkpoints and of
``convert_weight.py``), so official weights load with ``strict=True``.  The maths is the same; the
formulation is chosen for speed on CPU and GPU without compiled extensions:

* Modulated convolutions are computed as ``demod * conv(x * style, W)`` with ONE shared weight instead of a
  per-sample weight tensor and a grouped convolution.  The two are algebraically identical; the shared-weight
  form never materialises a (B, C_out, C_in, 3, 3) tensor, which on CPU made per-image time grow with batch.
* The FIR blur after each upsampling conv is a depthwise ``conv2d`` (groups=C) instead of upfirdn2d's
  pad/reshape emulation, and the ToRGB skip upsampler is a depthwise stride-2 ``conv_transpose2d``.
  Both are exact re-expressions of upfirdn2d (checked against the reference at 1e-13 in float64).
* The synthesis network is split at the output of ``convs.3`` (G5, the 16x16 feature CLCAE/FS replace),
  so callers can run the shared prefix once and the suffix on several features.

Latent layout (rosinality): conv1 <- w[:, 0], to_rgb1 <- w[:, 1], convs[2k] <- w[:, 2k+1],
convs[2k+1] <- w[:, 2k+2], to_rgbs[k] <- w[:, 2k+3]; noise[0] -> conv1, noise[2k+1] -> convs[2k],
noise[2k+2] -> convs[2k+1].
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

SQRT2 = math.sqrt(2.0)
# Index (in rosinality's ``convs`` list) of the conv whose output is G5, and the resolution of G5.
FEATURE_CONV = 3
FEATURE_RES = 16


def channel_table(channel_multiplier: int = 2, channel_max: int = 512) -> dict[int, int]:
    """Channels per resolution (rosinality's table), optionally capped for narrow test models."""
    cm = channel_multiplier
    table = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * cm, 128: 128 * cm, 256: 64 * cm, 512: 32 * cm,
             1024: 16 * cm}
    return {res: min(ch, channel_max) for res, ch in table.items()}


def float32_region(x: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    """Autocast switched off where it is on, so the enclosed ops run in their inputs' dtype (callers pass float32
    or float64); a no-op otherwise (plain fp32 runs, meta tensors)."""
    device_type = x.device.type
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def _high(x: torch.Tensor) -> torch.Tensor:
    """x in float32 unless it already is float32 or float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _reduced_precision(x: torch.Tensor) -> bool:
    """x is (or autocast will make its convolutions) bf16 / fp16."""
    if x.dtype not in (torch.float32, torch.float64):
        return True
    return x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)


def make_kernel(k: Sequence[float]) -> torch.Tensor:
    k = torch.tensor(k, dtype=torch.float32)
    if k.ndim == 1:
        k = k[None, :] * k[:, None]
    return k / k.sum()


def bias_leaky_relu(x: torch.Tensor, bias: torch.Tensor, negative_slope: float = 0.2,
                    scale: float = SQRT2) -> torch.Tensor:
    """StyleGAN's fused bias + leaky ReLU + gain, for (B, C) and (B, C, H, W) inputs."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return F.leaky_relu(x + bias.view(shape), negative_slope) * scale


class PixelNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x * x, dim=1, keepdim=True) + 1e-8)


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate: weights stored at N(0, 1/lr_mul), scaled at run time."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, bias_init: float = 0.0,
                 lr_mul: float = 1.0, activation: str | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init))) if bias else None
        self.activation = activation
        self.scale = (1.0 / math.sqrt(in_dim)) * lr_mul
        self.lr_mul = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The equalised-lr scale goes on a float32 (B, in) input rather than on a scaled copy of the (out, in)
        # weight; a bf16/fp16 input would be rounded once more by it (measured: 1-1.4 dB of the Inverter's bf16
        # PSNR), so there the weight takes it, in float32, as autocast casts it anyway.
        if x.dtype in (torch.float32, torch.float64):
            x, weight = x * self.scale, self.weight
        else:
            weight = self.weight * self.scale
        if self.activation:
            return bias_leaky_relu(F.linear(x, weight), self.bias * self.lr_mul)
        bias = self.bias * self.lr_mul if self.bias is not None else None
        return F.linear(x, weight, bias=bias)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, lr_mul={self.lr_mul}"


class Blur(nn.Module):
    """upfirdn2d(x, kernel, pad) for a symmetric kernel, as a depthwise convolution."""

    def __init__(self, kernel: Sequence[float], pad: tuple[int, int], upsample_factor: int = 1):
        super().__init__()
        k = make_kernel(kernel)
        if upsample_factor > 1:
            k = k * (upsample_factor ** 2)
        self.register_buffer("kernel", k)
        self.pad = pad

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The blur, plus a per-channel ``bias`` if given (free in the convolution's epilogue)."""
        c = x.shape[1]
        # upfirdn2d correlates with the flipped kernel; flipping keeps it exact for asymmetric kernels too.
        w = torch.flip(self.kernel, (0, 1)).to(x.dtype).expand(c, 1, *self.kernel.shape)
        p0, p1 = self.pad
        if p0 == p1:
            return F.conv2d(x, w, bias, padding=p0, groups=c)
        return F.conv2d(F.pad(x, (p0, p1, p0, p1)), w, bias, groups=c)


class Upsample(nn.Module):
    """upfirdn2d(x, kernel * 4, up=2, pad=(2, 1)) == depthwise conv_transpose2d(stride 2, padding 1)."""

    def __init__(self, kernel: Sequence[float], factor: int = 2):
        super().__init__()
        if factor != 2 or len(kernel) != 4:
            raise ValueError("Upsample supports the StyleGAN2 4-tap kernel with factor 2")
        self.register_buffer("kernel", make_kernel(kernel) * (factor ** 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        w = self.kernel.to(x.dtype).expand(c, 1, *self.kernel.shape)
        return F.conv_transpose2d(x, w, stride=2, padding=1, groups=c)


class ModulatedConv2d(nn.Module):
    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int,
                 demodulate: bool = True, upsample: bool = False,
                 blur_kernel: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        self.in_channel, self.out_channel, self.kernel_size = in_channel, out_channel, kernel_size
        self.upsample, self.demodulate = upsample, demodulate
        if upsample:
            factor = 2
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        self.scale = 1.0 / math.sqrt(in_channel * kernel_size ** 2)
        self.padding = kernel_size // 2
        # Stored in the channels-last layout its convolution takes (for the transposed one: of the (C_in, C_out,
        # k, k) transpose), as the activations are: oneDNN otherwise copies the whole weight into it on every call
        # (9.4 MB per 512-channel layer).  Values, keys and shapes are rosinality's; load_state_dict copies into
        # this layout.
        weight = torch.randn(out_channel, in_channel, kernel_size, kernel_size)
        if upsample:
            weight = weight.transpose(0, 1).contiguous(memory_format=torch.channels_last).transpose(0, 1)
        else:
            weight = weight.contiguous(memory_format=torch.channels_last)
        self.weight = nn.Parameter(weight.unsqueeze(0))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1.0)

    def styles(self, style: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(s * scale, demodulation) in float32 whatever autocast says: the style affine and the demodulation
        norms are the numerically sensitive part (a sum of C_in * k * k squares), and tiny next to the conv.
        The equalised-lr ``scale`` rides on the style, so the stored weight is used as it is (no scaled copy)."""
        with float32_region(style):
            s = self.modulation(_high(style)) * self.scale           # (B, C_in)
            if not self.demodulate:
                return s, None
            # sum_{i,k} (w_oik * s_i)^2 = (s^2) @ (sum_k w_oik^2)^T : (B, C_out), never (B, C_out, C_in, k, k).
            d = torch.rsqrt((s * s) @ self.weight_norms().t() + 1e-8)
        return s, d

    def weight_norms(self) -> torch.Tensor:
        """(C_out, C_in) sums of squared taps of the stored weight.  A frozen weight's are cached (a read of the
        whole weight per call otherwise: 9.4 MB per 512-channel layer), keyed on the tensor's storage and version
        counter so a load_state_dict or in-place update recomputes them; never cached under autograd or compile."""
        weight = self.weight[0]
        if torch.is_grad_enabled() and self.weight.requires_grad or torch.compiler.is_compiling():
            return (weight * weight).sum(dim=(2, 3))
        key = (self.weight.data_ptr(), self.weight._version, self.weight.dtype, self.weight.device)
        cached = getattr(self, "_norms", None)
        if cached is None or cached[0] != key:
            # an ordinary tensor even inside inference_mode, so a later autograd pass may save it for backward
            with torch.inference_mode(False), torch.no_grad():
                cached = (key, (weight * weight).sum(dim=(2, 3)))
            self._norms = cached
        return cached[1]

    def modulated(self, x: torch.Tensor, style: torch.Tensor, gain: float = 1.0, bias: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(y, d)``.  ``d`` None: y = gain * this layer's output + bias, complete.  Otherwise the caller finishes
        it as ``y * d[:, :, None, None] + bias`` (gain is inside d), fused with whatever follows.

        At batch 1 without autograd, where the weight is no larger than the input (the high-resolution layers), the
        style, the demodulation and ``gain`` are folded into the weight (StyleGAN2's own per-sample weight, in one
        multiply of the weight) and the bias goes into the convolution, so no pass over the activations is spent on
        any of them.  In the 512-channel layers at 4-64 px the weight (2.4M values) outweighs the activations, and
        scaling those is the cheaper pass (measured 1-2% of a 1024 pass).  Otherwise the input is scaled by the
        style (one shared weight, no (B, C_out, C_in, k, k) copy) and ``d`` is left to the caller
        (:class:`StyledConv` fuses it with the noise and bias add).
        """
        s, d = self.styles(style)
        weight = self.weight[0]
        # The fold only where autograd records nothing: under autograd the folded weight would need its own
        # gradient, a second convolution-sized backward (measured: a 256 training step 1.2x slower at batch 1).
        # In bf16/fp16 the fold is kept whatever the sizes: the style and demodulation then meet the weight in
        # float32 and are rounded once, with the weight (measured at 1024: 45 dB against fp32, 40 dB when the
        # low-resolution layers scaled the activations instead).
        if x.shape[0] == 1 and (weight.numel() <= x.numel() or _reduced_precision(x)) and not (
                torch.is_grad_enabled() and (x.requires_grad or s.requires_grad)):
            out_scale = d[0] * gain if d is not None else torch.full_like(s[0, :1], gain).expand(self.out_channel)
            weight = weight * (out_scale[:, None] * s[0][None, :])[:, :, None, None]
            return self._conv(x, weight, bias), None
        y = self._conv(x * s[:, :, None, None].to(x.dtype), weight)
        if d is None:
            d = torch.full((x.shape[0], self.out_channel), gain, device=x.device)
        return y, d * gain if self.demodulate else d

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        y, d = self.modulated(x, style)
        return y if d is None else y * d[:, :, None, None].to(y.dtype)

    def _conv(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        w = w.to(x.dtype)
        bias = bias.to(x.dtype) if bias is not None else None
        if self.upsample:
            # Transposed conv wants (C_in, C_out, k, k); the blur then removes the checkerboard (and adds the bias:
            # it is per channel, so after the linear blur is the same place as after the conv).
            x = F.conv_transpose2d(x, w.transpose(0, 1), stride=2, padding=0)
            return self.blur(x, bias)
        return F.conv2d(x, w, bias, padding=self.padding)

    def extra_repr(self) -> str:
        return (f"{self.in_channel}, {self.out_channel}, {self.kernel_size}, upsample={self.upsample}, "
                f"demodulate={self.demodulate}")


class NoiseInjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:
            b, _, h, w = x.shape
            noise = x.new_empty(b, 1, h, w).normal_()
        return x + self.weight * noise


class FusedLeakyReLU(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bias_leaky_relu(x, self.bias)


class StyledConv(nn.Module):
    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int,
                 upsample: bool = False, blur_kernel: Sequence[float] = (1, 3, 3, 1), demodulate: bool = True):
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, kernel_size, style_dim, demodulate=demodulate,
                                    upsample=upsample, blur_kernel=blur_kernel)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel)

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """leaky_relu(conv * d + noise_weight * noise + bias) * sqrt(2), in two passes over the activations.

        leaky_relu(a * t) = a * leaky_relu(t) for a > 0, so the sqrt(2) gain moves into d and into the
        per-pixel term ``sqrt(2) * (noise_weight * noise + bias)`` (one image's worth, shared by the batch):
        one fused multiply-add, then the activation.  Where autograd records nothing both run in place: the
        high-resolution layers are memory-bound, and every fresh activation-sized tensor also costs page faults.
        """
        bias = SQRT2 * self.activate.bias
        y, d = self.conv.modulated(x, style, gain=SQRT2, bias=bias)
        b, _, h, w = y.shape
        if noise is None:
            noise = y.new_empty(b, 1, h, w, dtype=torch.float32).normal_()
        noise_term = (SQRT2 * self.noise.weight) * noise            # (1 or B, 1, H, W)
        # In place exactly when autograd records nothing here (no_grad, inference_mode, or inputs that need no
        # gradient), so a render outside no_grad of frozen latents takes the same kernels as one inside.
        inplace = not y.requires_grad
        if d is None:  # batch 1: modulation, demodulation, gain and bias are already in y
            noise_term = noise_term.to(y.dtype)
            y = y.add_(noise_term) if inplace else y + noise_term
            return F.leaky_relu_(y, 0.2) if inplace else F.leaky_relu(y, 0.2)
        d = d[:, :, None, None].to(y.dtype)
        if inplace:
            # (1 or B, C, H, W) in y's layout and dtype, so the fused multiply-add streams both in the same order
            shift = torch.empty((noise.shape[0], *y.shape[1:]), dtype=y.dtype, device=y.device,
                                memory_format=_layout(y))
            torch.add(noise_term, bias.view(1, -1, 1, 1), out=shift)
            return F.leaky_relu_(torch.addcmul(shift, y, d, out=y), 0.2)
        # the same layouts as the in-place branch: the vectorised kernels then round the same way
        shift = (noise_term + bias.view(1, -1, 1, 1)).to(y.dtype).contiguous(memory_format=_layout(y))
        return F.leaky_relu(torch.addcmul(shift, y, d), 0.2)


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format


class ToRGB(nn.Module):
    def __init__(self, in_channel: int, style_dim: int, upsample: bool = True,
                 blur_kernel: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        # A 1x1 modulated conv is a per-sample (3, C) matrix: one batched matmul over the pixels, never a
        # scaled copy of the (wide, high-resolution) input.
        s, _ = self.conv.styles(style)
        wb = (self.conv.weight[:, :, :, 0, 0] * s[:, None, :]).to(x.dtype)      # (B, 3, C)
        b, c, h, wd = x.shape
        if _layout(x) == torch.channels_last:
            # (B, HW, C) is a view of a channels-last tensor; the result is channels-last (B, 3, H, W).
            out = torch.matmul(x.permute(0, 2, 3, 1).reshape(b, h * wd, c), wb.transpose(1, 2))
            out = out.view(b, h, wd, 3).permute(0, 3, 1, 2)
        else:
            out = torch.matmul(wb, x.reshape(b, c, h * wd)).view(b, 3, h, wd)
        out = out + self.bias.to(out.dtype)
        if skip is not None:
            out = out + self.upsample(skip.to(out.dtype))
        return out


class ConstantInput(nn.Module):
    def __init__(self, channel: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.input.expand(batch, -1, -1, -1)


class Generator(nn.Module):
    """StyleGAN2 generator (config-f) with rosinality's constructor, keys and latent layout.

    ``channel_max`` caps every layer's width; the default 512 is the official table, tiny test models lower
    it.  Sizes 32..1024 (the CLCAE feature hook needs the 16x16 ``convs.3`` and a later ``convs.4``).
    """

    def __init__(self, size: int, style_dim: int = 512, n_mlp: int = 8, channel_multiplier: int = 2,
                 blur_kernel: Sequence[float] = (1, 3, 3, 1), lr_mlp: float = 0.01, channel_max: int = 512):
        super().__init__()
        if size < 32 or size > 1024 or size & (size - 1):
            raise ValueError(f"generator size must be a power of two in 32..1024, got {size}")
        self.size, self.style_dim = size, style_dim
        # Layout of the activations inside synthesis.  Channels-last measured 1.8-2x faster for the 3x3 and
        # transposed convs and 5-11x for the depthwise FIR filters on CPU (oneDNN's NHWC kernels); the inputs
        # and outputs of synthesis_prefix/suffix are ordinary contiguous tensors either way.
        self.memory_format = torch.channels_last
        self.style = nn.Sequential(PixelNorm(), *[
            EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation="fused_lrelu") for _ in range(n_mlp)
        ])
        self.channels = channel_table(channel_multiplier, channel_max)
        self.input = ConstantInput(self.channels[4])
        self.conv1 = StyledConv(self.channels[4], self.channels[4], 3, style_dim, blur_kernel=blur_kernel)
        self.to_rgb1 = ToRGB(self.channels[4], style_dim, upsample=False)

        self.log_size = int(math.log2(size))
        self.num_layers = (self.log_size - 2) * 2 + 1
        self.n_latent = self.log_size * 2 - 2
        self.convs = nn.ModuleList()
        self.upsamples = nn.ModuleList()  # empty; kept so the module tree mirrors rosinality's
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for layer_idx in range(self.num_layers):
            res = (layer_idx + 5) // 2
            self.noises.register_buffer(f"noise_{layer_idx}", torch.randn(1, 1, 2 ** res, 2 ** res))
        in_channel = self.channels[4]
        for i in range(3, self.log_size + 1):
            out_channel = self.channels[2 ** i]
            self.convs.append(StyledConv(in_channel, out_channel, 3, style_dim, upsample=True,
                                         blur_kernel=blur_kernel))
            self.convs.append(StyledConv(out_channel, out_channel, 3, style_dim, blur_kernel=blur_kernel))
            self.to_rgbs.append(ToRGB(out_channel, style_dim))
            in_channel = out_channel

    # ----------------------------------------------------------------------------------------- latents
    @property
    def feature_channels(self) -> int:
        """Channels of G5 (512 for every official generator)."""
        return self.channels[FEATURE_RES]

    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, D) -> w (B, D), in float32 under any autocast (eight chained layers: rounding would compound)."""
        with float32_region(z):
            return self.style(_high(z))

    get_latent = mapping  # rosinality's name

    @torch.no_grad()
    def mean_latent(self, n_samples: int = 100_000, seed: int | None = 0, chunk: int = 10_000) -> torch.Tensor:
        """Mean of the mapping network over ``n_samples`` z ~ N(0, I): the stand-in for a missing latent_avg."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        device = self.input.input.device
        total = torch.zeros(1, self.style_dim, dtype=torch.float64, device=device)
        done = 0
        while done < n_samples:
            n = min(chunk, n_samples - done)
            z = torch.randn(n, self.style_dim, generator=gen).to(device)
            total += self.style(z).double().sum(0, keepdim=True)
            done += n
        return (total / n_samples).float()

    def noise_maps(self, randomize: bool = False) -> list[torch.Tensor | None]:
        """Stored constant noise (rosinality's randomize_noise=False) or None (fresh noise per call)."""
        if randomize:
            return [None] * self.num_layers
        return [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)]

    def broadcast(self, w: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, N, D); (B, N, D) passes through after a shape check."""
        if w.ndim == 2 and w.shape[1] == self.style_dim:
            return w.unsqueeze(1).expand(-1, self.n_latent, -1)
        if w.ndim != 3 or w.shape[1] != self.n_latent or w.shape[2] != self.style_dim:
            raise ValueError(f"expected latents of shape (B, {self.n_latent}, {self.style_dim}) or "
                             f"(B, {self.style_dim}), got {tuple(w.shape)}")
        return w

    # --------------------------------------------------------------------------------------- synthesis
    def synthesis_prefix(self, w_plus: torch.Tensor, noise: list[torch.Tensor | None] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layers up to and including ``convs.3`` / ``to_rgbs.1``: returns (G5, rgb skip at 16x16)."""
        w_plus = self.broadcast(w_plus)
        noise = self.noise_maps() if noise is None else noise
        out = self.input(w_plus.shape[0]).contiguous(memory_format=self.memory_format)
        out = self.conv1(out, w_plus[:, 0], noise=noise[0])
        skip = self.to_rgb1(out, w_plus[:, 1])
        for k in range(FEATURE_CONV // 2 + 1):
            out = self.convs[2 * k](out, w_plus[:, 2 * k + 1], noise=noise[2 * k + 1])
            out = self.convs[2 * k + 1](out, w_plus[:, 2 * k + 2], noise=noise[2 * k + 2])
            skip = self.to_rgbs[k](out, w_plus[:, 2 * k + 3], skip)
        # The internal layout stays internal: callers get ordinary contiguous tensors (16x16, cheap to copy).
        return out.contiguous(), skip.contiguous()

    def synthesis_suffix(self, feature: torch.Tensor, skip: torch.Tensor, w_plus: torch.Tensor,
                         noise: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        """Layers from ``convs.4`` on, starting from a 16x16 feature (G5 or a replacement f)."""
        w_plus = self.broadcast(w_plus)
        noise = self.noise_maps() if noise is None else noise
        out = feature.contiguous(memory_format=self.memory_format)
        skip = skip.contiguous(memory_format=self.memory_format)
        for k in range(FEATURE_CONV // 2 + 1, len(self.to_rgbs)):
            out = self.convs[2 * k](out, w_plus[:, 2 * k + 1], noise=noise[2 * k + 1])
            out = self.convs[2 * k + 1](out, w_plus[:, 2 * k + 2], noise=noise[2 * k + 2])
            skip = self.to_rgbs[k](out, w_plus[:, 2 * k + 3], skip)
        return skip.contiguous()

    def synthesis(self, w_plus: torch.Tensor, f: torch.Tensor | None = None, f_blend: float = 1.0,
                  randomize_noise: bool = False) -> torch.Tensor:
        """Image (B, 3, size, size), unclamped, nominally [-1, 1].

        ``f`` (B, C, 16, 16) replaces the input of ``convs.4`` (blended as ``(1 - a) * G5 + a * f`` with
        ``a = f_blend``); the 16x16 RGB skip always comes from the generator's own G5, as in FS/CLCAE.
        """
        noise = self.noise_maps(randomize_noise)
        g5, skip = self.synthesis_prefix(w_plus, noise)
        feature = g5 if f is None else blend_feature(g5, f, f_blend)
        return self.synthesis_suffix(feature, skip, w_plus, noise)

    def g5(self, w_plus: torch.Tensor) -> torch.Tensor:
        """The output of the fifth styled conv (``convs.3``): (B, C, 16, 16)."""
        return self.synthesis_prefix(w_plus)[0]

    def forward(self, w_plus: torch.Tensor, f: torch.Tensor | None = None) -> torch.Tensor:
        return self.synthesis(w_plus, f)


def blend_feature(g5: torch.Tensor, f: torch.Tensor, alpha: float) -> torch.Tensor:
    if f.shape != g5.shape:
        raise ValueError(f"feature f must have shape {tuple(g5.shape)} (G5), got {tuple(f.shape)}")
    if alpha >= 1.0:
        return f
    if alpha <= 0.0:
        return g5
    return torch.lerp(g5, f, alpha)
