"""Reconstruction metrics: reference values, ordering with noise, input checks and aggregation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from clcae.metrics import MetricSuite, lpips_distance, psnr, ssim


def images(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) * 2 - 1


def pattern(h: int, w: int, phase: float) -> torch.Tensor:
    """A smooth deterministic RGB image in [-1, 1] (no RNG, so reference values stay valid)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h, dtype=torch.float64),
                            torch.linspace(0, 1, w, dtype=torch.float64), indexing="ij")
    channels = [0.5 + 0.4 * torch.sin(6.0 * xx + 3 * yy * (c + 1) + phase) * torch.cos(4 * yy - c + phase * xx)
                for c in range(3)]
    return torch.stack(channels)[None] * 2 - 1


@pytest.fixture(scope="module")
def suite() -> MetricSuite:
    torch.manual_seed(0)
    return MetricSuite(lpips_pretrained_backbone=False, id_backbone="ir_se_tiny")


def test_psnr_matches_hand_computation():
    target = torch.zeros(1, 3, 8, 8)  # 0.5 in [0, 1]
    pred = torch.full((1, 3, 8, 8), 0.2)  # 0.6 in [0, 1]: MSE 0.01 -> 20 dB
    assert psnr(pred, target).item() == pytest.approx(20.0, abs=1e-4)
    # Out-of-range values are clamped like a saved image: 1 vs 0 in [0, 1] -> MSE 1 -> 0 dB.
    assert psnr(torch.full((1, 3, 8, 8), 5.0), torch.full((1, 3, 8, 8), -1.0)).item() == pytest.approx(0.0)


# Values from skimage 0.26 on the same pattern pair, channel_axis=-1, data_range=1:
#   uniform21 = structural_similarity(win_size=21)  (the authors' measure.py call)
#   gaussian11 = structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
#   psnr = peak_signal_noise_ratio
SKIMAGE = {
    (64, 64): {"uniform21": 0.7590405790629536, "gaussian11": 0.706240804305712, "psnr": 18.889608702240807},
    (48, 80): {"uniform21": 0.7598700077249744, "gaussian11": 0.6761694532087502, "psnr": 18.892203487978616},
}


@pytest.mark.parametrize("size", list(SKIMAGE))
def test_ssim_and_psnr_reproduce_skimage(size):
    a, b = pattern(*size, 0.0), pattern(*size, 0.5)
    ref = SKIMAGE[size]
    assert ssim(b, a, "uniform21").item() == pytest.approx(ref["uniform21"], abs=1e-9)
    assert ssim(b, a, "gaussian11").item() == pytest.approx(ref["gaussian11"], abs=1e-9)
    assert ssim(b, a).item() == pytest.approx(ref["gaussian11"], abs=1e-9)  # the default window
    assert ssim(b.float(), a.float(), "uniform21").item() == pytest.approx(ref["uniform21"], abs=1e-6)
    assert psnr(b, a).item() == pytest.approx(ref["psnr"], abs=1e-5)


def test_identical_images(suite):
    x = images(2, 3, 64, 64)
    values = suite.per_image(x, x)
    assert torch.isinf(values["psnr"]).all() and (values["psnr"] > 0).all()
    torch.testing.assert_close(values["ssim"], torch.ones(2))
    torch.testing.assert_close(ssim(x, x, "uniform21"), torch.ones(2))
    assert values["lpips"].abs().max().item() < 1e-6
    torch.testing.assert_close(values["id_similarity"], torch.ones(2))


def test_more_noise_scores_worse_on_every_metric(suite):
    x = images(2, 3, 64, 64)
    noise = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    rows = [suite.per_image((x + s * noise).clamp(-1, 1), x) for s in (0.02, 0.1, 0.4)]
    for name, better_is_higher in (("psnr", True), ("ssim", True), ("lpips", False), ("id_similarity", True)):
        vals = torch.stack([r[name] for r in rows])  # (noise level, image)
        diffs = vals[1:] - vals[:-1]
        assert ((diffs < 0) if better_is_higher else (diffs > 0)).all(), (name, vals)


def test_lpips_metric_compares_at_256(suite):
    net = suite.lpips
    x, y = images(1, 3, 64, 64), images(1, 3, 64, 64, seed=1)
    up = [F.interpolate(t, size=(256, 256), mode="bilinear", align_corners=False, antialias=True) for t in (x, y)]
    torch.testing.assert_close(lpips_distance(x, y, net), net.per_image(*up))
    # Below LPIPS' own minimum size the metric still works, because it resizes first.
    assert lpips_distance(images(1, 3, 16, 16), images(1, 3, 16, 16, seed=2), net).shape == (1,)


@pytest.mark.parametrize(("pred", "target", "match"), [
    ((2, 3, 64, 64), (2, 3, 32, 32), "same shape|one shape"),
    ((3, 64, 64), (3, 64, 64), r"\(B, 3, H, W\)"),
    ((2, 1, 64, 64), (2, 1, 64, 64), r"\(B, 3, H, W\)"),
])
def test_bad_input_is_rejected(pred, target, match):
    with pytest.raises(ValueError, match=match):
        psnr(torch.zeros(pred), torch.zeros(target))
    with pytest.raises(ValueError, match=match):
        ssim(torch.zeros(pred), torch.zeros(target))


def test_ssim_window_errors():
    with pytest.raises(ValueError, match="unknown SSIM window"):
        ssim(images(1, 3, 32, 32), images(1, 3, 32, 32), "gaussian7")
    with pytest.raises(ValueError, match="at least 21x21"):
        ssim(images(1, 3, 16, 16), images(1, 3, 16, 16), "uniform21")
    with pytest.raises(ValueError, match="unknown SSIM window"):
        MetricSuite(lpips_pretrained_backbone=False, id_network="none", ssim_window="box")


def test_suite_aggregates_over_batches(suite):
    suite.reset()
    a_pred, a_true = images(2, 3, 64, 64, seed=1), images(2, 3, 64, 64, seed=2)
    b_pred, b_true = images(3, 3, 64, 64, seed=3), images(3, 3, 64, 64, seed=4)
    first, second = suite.update(a_pred, a_true), suite.update(b_pred, b_true)
    result = suite.compute()
    assert set(result) == {"psnr", "ssim", "lpips", "id_similarity"}
    for name, stats in result.items():
        values = np.concatenate([first[name].numpy(), second[name].numpy()]).astype(np.float64)
        assert stats["n"] == 5
        assert stats["mean"] == pytest.approx(values.mean(), rel=1e-6)
        assert stats["std"] == pytest.approx(values.std(), rel=1e-5)  # population std, like np.std
    suite.reset()
    assert suite.compute()["psnr"]["n"] == 0 and math.isnan(suite.compute()["psnr"]["mean"])


def test_suite_without_id_network():
    suite = MetricSuite(lpips_pretrained_backbone=False, id_network="none", ssim_window="uniform21")
    suite.update(images(1, 3, 32, 32), images(1, 3, 32, 32, seed=1))
    assert set(suite.compute()) == {"psnr", "ssim", "lpips"}
    with pytest.raises(ValueError, match="id_network"):
        MetricSuite(lpips_pretrained_backbone=False, id_network="moco")
