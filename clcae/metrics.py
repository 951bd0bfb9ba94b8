"""Reconstruction metrics, computed per image, each with its convention stated.

All functions take ``pred`` and ``target`` as (B, 3, H, W) RGB batches in [-1, 1] (the generator's range)
and return one value per image, shape (B,). :class:`MetricSuite` accumulates them over a dataset.

Conventions, and how they relate to published numbers:
* PSNR / SSIM: images mapped to [0, 1] and clamped, data range 1, full frame, no quantisation to 8 bits
  (the authors' ``measure.py`` reads saved JPEG/PNG files, so their inputs were quantised).
* SSIM window: Gaussian 11 / sigma 1.5 by default (Wang et al.); ``"uniform21"`` reproduces the authors'
  ``skimage.metrics.structural_similarity(win_size=21, data_range=1)``. The two are not comparable.
* LPIPS: alex, both images resized to 256x256, as pSp/e4e/ReStyle/CLCAE's ``calc_losses_on_images.py``.
* ID similarity: ArcFace IR-SE50 (the training ID network) on pSp's face crop. The papers' ID metric uses
  CurricularFace IR-101 on MTCNN-aligned faces, so the numbers are not directly comparable.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.aggregation import CatMetric
from torchmetrics.functional.image import peak_signal_noise_ratio

from clcae.losses import IDLoss, LPIPSLoss, check_images

SSIM_WINDOWS = ("gaussian11", "uniform21")
LPIPS_SIZE = 256


def check_pair(pred: Tensor, target: Tensor) -> None:
    """Raise a ValueError unless both are (B, 3, H, W) float batches of the same shape."""
    check_images(pred, "pred")
    check_images(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have one shape")


def to_unit_range(x: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1], clamped (what saving an image would do, minus the 8-bit rounding)."""
    return ((x + 1) / 2).clamp(0, 1)


def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB per image, on [0, 1] images with data range 1.

    Identical images give ``+inf`` (the MSE is 0), reported as is rather than capped at an arbitrary value.
    """
    check_pair(pred, target)
    return peak_signal_noise_ratio(to_unit_range(pred), to_unit_range(target), data_range=1.0,
                                   reduction="none", dim=(1, 2, 3))


def _gaussian_1d(size: int, sigma: float) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(pred: Tensor, target: Tensor, window: str = "gaussian11") -> Tensor:
    """Structural similarity per image on [0, 1] images, data range 1, K1 0.01, K2 0.03.

    The SSIM map is computed where the window fits inside the image ("valid"; equivalently skimage's
    reflect-filter-then-crop) and averaged over pixels and channels.
    * ``"gaussian11"``: Gaussian window 11, sigma 1.5, population (co)variances (Wang et al. 2004;
      skimage with ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False``).
    * ``"uniform21"``: 21x21 uniform window with sample (co)variances, i.e. skimage's defaults with
      ``win_size=21``: the authors' ``mertric/measure.py``.
    torchmetrics' SSIM reflect-pads and averages the border too, which is why it is not used here
    (it differs from skimage by about 3e-4 at 256x256 for gaussian11 and 6e-3 for uniform21).
    """
    check_pair(pred, target)
    if window == "gaussian11":
        size, kernel, cov_norm = 11, _gaussian_1d(11, 1.5), 1.0
    elif window == "uniform21":
        size, kernel, cov_norm = 21, torch.full((21,), 1 / 21, dtype=torch.float64), 441 / 440
    else:
        raise ValueError(f"unknown SSIM window {window!r}; choose one of {SSIM_WINDOWS}")
    if min(pred.shape[-2:]) < size:
        raise ValueError(f"SSIM with window {window!r} needs images of at least {size}x{size}, "
                         f"got {tuple(pred.shape[-2:])}")
    # float64: the variances are differences of nearly equal means, which float32 loses on flat regions.
    x, y = to_unit_range(pred).double(), to_unit_range(target).double()
    kernel = kernel.to(x.device)
    rows, cols = kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1), kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1)

    def blur(z: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(z, rows, groups=3), cols, groups=3)

    mx, my = blur(x), blur(y)
    vx = cov_norm * (blur(x * x) - mx * mx)
    vy = cov_norm * (blur(y * y) - my * my)
    vxy = cov_norm * (blur(x * y) - mx * my)
    c1, c2 = 0.01**2, 0.03**2
    s = (2 * mx * my + c1) * (2 * vxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).to(pred.dtype)


def lpips_distance(pred: Tensor, target: Tensor, net: LPIPSLoss) -> Tensor:
    """LPIPS per image with both images resized to 256x256 (bilinear, antialiased like PIL's resize)."""
    check_pair(pred, target)
    if pred.shape[-2:] != (LPIPS_SIZE, LPIPS_SIZE):
        size = (LPIPS_SIZE, LPIPS_SIZE)
        pred = F.interpolate(pred, size=size, mode="bilinear", align_corners=False, antialias=True)
        target = F.interpolate(target, size=size, mode="bilinear", align_corners=False, antialias=True)
    return net.per_image(pred, target)


def id_similarity(pred: Tensor, target: Tensor, net: IDLoss) -> Tensor:
    """Cosine similarity per image between identity embeddings (1 = same identity embedding)."""
    check_pair(pred, target)
    return net.similarity(target, pred)


class MetricSuite(nn.Module):
    """PSNR, SSIM, LPIPS and (optionally) ID similarity accumulated per image over many batches.

    ``compute()`` returns ``{name: {"mean", "std", "n"}}`` with the population std (``np.std``, as pSp's
    "m+-s" reports). A PSNR of ``inf`` (an exact reconstruction) makes that mean ``inf`` and its std
    ``nan``. Values are torchmetrics ``CatMetric`` states, so they are gathered across processes when
    ``torch.distributed`` is initialised. ``id_weights=None`` with ``id_network="arcface"`` builds a random
    ArcFace (a warning is logged); use ``id_network="none"`` where no weights are available.
    """

    def __init__(self, lpips_pretrained_backbone: bool = True, id_weights: str | None = None,
                 id_network: str = "arcface", ssim_window: str = "gaussian11", id_backbone: str = "ir_se50"):
        super().__init__()
        if ssim_window not in SSIM_WINDOWS:
            raise ValueError(f"unknown SSIM window {ssim_window!r}; choose one of {SSIM_WINDOWS}")
        if id_network not in ("arcface", "none"):
            raise ValueError(f"id_network must be 'arcface' or 'none', got {id_network!r}")
        self.ssim_window = ssim_window
        self.lpips = LPIPSLoss("alex", pretrained_backbone=lpips_pretrained_backbone)
        self.id_net = IDLoss("arcface", id_weights, id_backbone) if id_network == "arcface" else None
        names = ["psnr", "ssim", "lpips"] + (["id_similarity"] if self.id_net is not None else [])
        self.values = nn.ModuleDict({name: CatMetric(nan_strategy="error") for name in names})
        for metric in self.values.values():
            metric.set_dtype(torch.float64)

    @torch.no_grad()
    def per_image(self, pred: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Every metric for one batch, (B,) each, without accumulating."""
        check_pair(pred, target)
        out = {
            "psnr": psnr(pred, target),
            "ssim": ssim(pred, target, self.ssim_window),
            "lpips": lpips_distance(pred, target, self.lpips),
        }
        if self.id_net is not None:
            out["id_similarity"] = id_similarity(pred, target, self.id_net)
        return out

    def update(self, pred: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Accumulate one batch; returns its per-image values."""
        batch = self.per_image(pred, target)
        for name, value in batch.items():
            self.values[name].update(value.detach().double())
        return batch

    def compute(self) -> dict[str, dict[str, float]]:
        result = {}
        for name, metric in self.values.items():
            values = metric.compute() if metric.update_count else torch.zeros(0, dtype=torch.float64)
            n = values.numel()
            mean = values.mean().item() if n else math.nan
            std = values.std(correction=0).item() if n else math.nan
            result[name] = {"mean": mean, "std": std, "n": n}
        return result

    def reset(self) -> None:
        for metric in self.values.values():
            metric.reset()
