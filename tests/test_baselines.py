"""The pSp and e4e baselines behind ``model.variant``: structure, outputs, gradients, training terms."""

from __future__ import annotations

import pytest
import torch

from clcae.config import load_config
from clcae.factory import build_clcae
from clcae.losses import InversionCriterion, delta_reg_loss
from clcae.models.encoder import CLCAEEncoder, PSPEncoder
from clcae.train.steps import InversionStep


def tiny_cfg(*overrides: str):
    return load_config("configs/tiny.yaml", ["model.use_align=false", *overrides])


def build(variant: str, *overrides: str):
    torch.manual_seed(0)
    return build_clcae(tiny_cfg(f"model.variant={variant}", *overrides))


@pytest.fixture(scope="module")
def x():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_psp_has_one_style_block_per_layer_with_psp_split_and_no_f(x):
    model = build("psp").eval()
    enc = model.encoder
    n = model.decoder.n_latent
    assert isinstance(enc, PSPEncoder) and len(enc.styles) == n
    assert [enc.source_of(i) for i in range(n)] == ["t1"] * 3 + ["t2"] * 4 + ["t3"] * (n - 7)
    names = dict(enc.named_modules())
    assert not any(k.startswith(("cross_attention", "feature_cross_attention", "content_layer")) for k in names)
    with torch.no_grad():
        out = model(x)
    assert out.w_plus.shape == (2, n, 64) and out.f is None and out.image_f is None
    torch.testing.assert_close(out.w, out.w_plus.mean(dim=1))  # pSp has no single w: its mean stands in
    torch.testing.assert_close(out.image_w_plus, model.decoder.synthesis(out.w_plus), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no F branch"):
        model(x, outputs=("f",))


def test_psp_edit_in_w_moves_every_layer(x):
    model = build("psp").eval()
    d = torch.randn(64)
    with torch.no_grad():
        feats = model.encoder.features(x)
        w, w_plus, f = model.heads(feats.w_offset, feats.deltas, feats.t3)
        _, w_plus_edit, _ = model.heads(feats.w_offset + d, feats.deltas, feats.t3)
    assert f is None
    torch.testing.assert_close(w_plus, model.latent_avg + feats.deltas)
    torch.testing.assert_close(w_plus_edit, w_plus + d, rtol=1e-5, atol=1e-5)


def test_e4e_is_w_plus_deltas_without_attention_or_f(x):
    model = build("e4e").eval()
    enc = model.encoder
    assert isinstance(enc, CLCAEEncoder) and not enc.has_feature
    assert not hasattr(enc, "cross_attention") and not hasattr(enc, "content_layer")
    assert not hasattr(enc, "feature_cross_attention")
    with torch.no_grad():
        out = model(x)
    assert out.f is None and out.image_f is None and out.image_w is not None
    torch.testing.assert_close(out.w_plus[:, 0], out.w)
    torch.testing.assert_close(out.w_plus[:, 1:], out.w[:, None] + out.deltas[:, 1:])


def test_clcae_variant_is_unchanged_by_the_switch(x):
    default, explicit = build_clcae_default(), build("clcae")
    assert default.state_dict().keys() == explicit.state_dict().keys()
    with torch.no_grad():
        a, b = default.eval()(x), explicit.eval()(x)
    torch.testing.assert_close(a.image_f, b.image_f)


def build_clcae_default():
    torch.manual_seed(0)
    return build_clcae(load_config("configs/tiny.yaml", ["model.use_align=false"]))


@pytest.mark.parametrize("variant", ["psp", "e4e"])
def test_baseline_trains_on_g_w_plus_and_every_encoder_weight_learns(variant, x):
    overrides = ["loss.delta_reg=0.01"] if variant == "e4e" else []
    cfg = tiny_cfg(f"model.variant={variant}", *overrides)
    torch.manual_seed(0)
    model = build_clcae(cfg)
    step = InversionStep(cfg, model)
    before = {n: p.detach().clone() for n, p in model.encoder.named_parameters()}
    terms = step(x, step=1)
    recon = {k for k in terms if "/" in k}
    assert recon == {"l2/w_plus", "lpips/w_plus"}  # pSp/e4e train G(w+) alone; no f, no L_align
    assert ("delta_reg" in terms) == (variant == "e4e")
    assert "feature_reg" not in terms and "align" not in terms
    assert not any(p.grad is not None for p in model.decoder.parameters())
    unmoved = [n for n, p in model.encoder.named_parameters() if torch.equal(p.detach(), before[n])]
    assert not unmoved, unmoved


def test_delta_reg_is_e4es_sum_of_layer_norms_and_only_in_the_criterion_when_weighted():
    w_plus = torch.randn(3, 5, 8)
    manual = sum((w_plus[:, i] - w_plus[:, 0]).norm(dim=1).mean() for i in range(1, 5))
    torch.testing.assert_close(delta_reg_loss(w_plus), manual)
    cfg = tiny_cfg("model.variant=e4e", "loss.delta_reg=0.5", "loss.lpips=0", "loss.align=0")
    out = type("Out", (), {"w": w_plus[:, 0], "w_plus": w_plus, "f": None,
                           "image_w_plus": torch.zeros(3, 3, 64, 64)})()
    x = torch.zeros(3, 3, 64, 64)
    crit = InversionCriterion(cfg.loss)
    total, terms = crit(x, out)
    assert terms["delta_reg"] == pytest.approx(manual.item(), rel=1e-5)
    assert total.item() == pytest.approx(0.5 * manual.item(), rel=1e-5)  # the images match: L2 is 0
    _, terms = InversionCriterion(tiny_cfg("loss.lpips=0", "loss.align=0").loss)(x, out)
    assert "delta_reg" not in terms
