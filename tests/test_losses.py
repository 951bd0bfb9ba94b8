"""Losses of the inversion stage: values, freezing, gradients, weight loading and the weighted total."""

from __future__ import annotations

import logging
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torchvision
from torch.nn import functional as F

from clcae.config import LossConfig
from clcae.losses import (
    IDLoss,
    InversionCriterion,
    LPIPSLoss,
    arcface_crop,
    feature_reg_loss,
    moco_encoder_state_dict,
)
from clcae.models.irse import IRSEBackbone


def images(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def lpips_loss() -> LPIPSLoss:
    return LPIPSLoss("alex", pretrained_backbone=False)


@pytest.fixture(scope="module")
def id_loss() -> IDLoss:
    torch.manual_seed(0)
    return IDLoss("arcface", None, backbone="ir_se_tiny")


# ---------------------------------------------------------------- LPIPS


def test_lpips_zero_for_identical_and_grows_with_noise(lpips_loss):
    x = images(2, 3, 64, 64)
    noise = images(2, 3, 64, 64, seed=1)
    assert lpips_loss(x, x).item() == pytest.approx(0.0, abs=1e-7)
    values = [lpips_loss(x, (x + s * noise).clamp(-1, 1)).item() for s in (0.05, 0.2, 0.8)]
    assert values[0] < values[1] < values[2]
    assert lpips_loss.per_image(x, x + 0.1 * noise).shape == (2,)


def test_lpips_stays_frozen_but_passes_gradients(lpips_loss):
    parent = torch.nn.Sequential(lpips_loss)
    parent.train()
    assert not any(m.training for m in lpips_loss.modules())
    assert not any(p.requires_grad for p in lpips_loss.parameters())
    rec = images(1, 3, 64, 64).requires_grad_(True)
    lpips_loss(rec, images(1, 3, 64, 64, seed=3)).backward()
    assert rec.grad is not None and rec.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips_loss.parameters())


def test_lpips_rejects_bad_input(lpips_loss):
    with pytest.raises(ValueError, match="at least 31"):
        lpips_loss(images(1, 3, 16, 16), images(1, 3, 16, 16))
    with pytest.raises(ValueError, match="same shape|one shape"):
        lpips_loss(images(1, 3, 64, 64), images(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        lpips_loss(images(3, 64, 64), images(3, 64, 64))
    with pytest.raises(ValueError, match="unknown LPIPS net"):
        LPIPSLoss("resnet", pretrained_backbone=False)


# ---------------------------------------------------------------- ID loss


def test_id_loss_zero_for_identical_positive_otherwise(id_loss):
    x = images(2, 3, 64, 64)
    assert id_loss(x, x).item() == pytest.approx(0.0, abs=1e-5)
    assert id_loss(x, images(2, 3, 64, 64, seed=5)).item() > 1e-3
    emb = id_loss.embed(x)
    assert emb.shape == (2, 512)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))


def test_id_loss_gradient_reaches_reconstruction_only(id_loss):
    torch.nn.Sequential(id_loss).train()
    assert not any(m.training for m in id_loss.modules())
    rec = images(1, 3, 64, 64).requires_grad_(True)  # batch 1 would fail BatchNorm1d in train mode
    id_loss(images(1, 3, 64, 64, seed=1), rec).backward()
    assert rec.grad is not None and rec.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in id_loss.parameters())


def test_arcface_crop_is_psp_crop_at_256_and_scales():
    x = images(1, 3, 256, 256)
    torch.testing.assert_close(arcface_crop(x, 188), x[:, :, 35:223, 32:220])
    y = images(1, 3, 512, 512)
    torch.testing.assert_close(arcface_crop(y, 376), y[:, :, 70:446, 64:440])
    assert arcface_crop(y).shape == (1, 3, 112, 112)


def test_random_id_weights_log_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="clcae.losses"):
        IDLoss("arcface", None, backbone="ir_se_tiny")
    assert "meaningless" in caplog.text


def test_arcface_weights_round_trip(tmp_path):
    torch.manual_seed(1)
    ref = IRSEBackbone("ir_se_tiny").eval()
    path = tmp_path / "model_ir_se_tiny.pth"
    torch.save(ref.state_dict(), path)
    loss = IDLoss("arcface", path, backbone="ir_se_tiny")
    x = images(2, 3, 256, 256)
    expected = ref(F.adaptive_avg_pool2d(x[:, :, 35:223, 32:220], 112))
    torch.testing.assert_close(loss.embed(x), expected)


def test_arcface_wrong_file_names_keys(tmp_path):
    state = IRSEBackbone("ir_se_tiny").state_dict()
    del state["output_layer.3.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        IDLoss("arcface", path, backbone="ir_se_tiny")
    msg = str(err.value)
    assert "broken.pth" in msg and "output_layer.3.weight" in msg and "extra.weight" in msg


@pytest.mark.parametrize(("network", "official"), [("arcface", "model_ir_se50.pth"),
                                                    ("moco", "moco_v2_800ep_pretrain")])
def test_missing_weights_file_names_file_and_source(tmp_path, network, official):
    with pytest.raises(FileNotFoundError) as err:
        IDLoss(network, tmp_path / "nowhere.pt", backbone="ir_se_tiny")
    assert "nowhere.pt" in str(err.value) and official in str(err.value)


def test_unknown_id_network():
    with pytest.raises(ValueError, match="arcface"):
        IDLoss("vgg_face")


# ---------------------------------------------------------------- MoCo


def moco_checkpoint(resnet: torch.nn.Module) -> dict:
    """The official ``moco_v2_800ep_pretrain.pth.tar`` layout: query encoder with MLP head, key encoder, queue."""
    state = {f"module.encoder_q.{k}": v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    state.update({
        "module.encoder_q.fc.0.weight": torch.zeros(2048, 2048), "module.encoder_q.fc.0.bias": torch.zeros(2048),
        "module.encoder_q.fc.2.weight": torch.zeros(128, 2048), "module.encoder_q.fc.2.bias": torch.zeros(128),
        "module.encoder_k.conv1.weight": torch.zeros(64, 3, 7, 7), "module.queue": torch.zeros(128, 8),
    })
    return {"epoch": 800, "arch": "resnet50", "state_dict": state}


def test_moco_loader_round_trip(tmp_path):
    torch.manual_seed(2)
    ref = torchvision.models.resnet50(weights=None)
    ref.fc = torch.nn.Identity()
    ref.eval()
    path = tmp_path / "moco_v2_800ep_pretrain.pt"
    torch.save(moco_checkpoint(ref), path)
    loss = IDLoss("moco", path)
    for k, v in ref.state_dict().items():
        assert torch.equal(loss.net.state_dict()[k], v), k
    x = images(1, 3, 64, 64)
    with torch.no_grad():
        expected = F.normalize(ref(F.interpolate(x, size=224)), dim=1)
        torch.testing.assert_close(loss.embed(x), expected)
    assert loss.embed(x).shape == (1, 2048)


def test_moco_wrong_file_names_missing_and_unexpected_keys(tmp_path):
    ckpt = {"state_dict": {
        "module.encoder_q.conv1.weight": torch.zeros(64, 3, 7, 7),
        "module.encoder_q.bogus.weight": torch.zeros(3),
    }}
    path = tmp_path / "not_moco.pt"
    torch.save(ckpt, path)
    with pytest.raises(ValueError) as err:
        IDLoss("moco", path)
    msg = str(err.value)
    assert "not_moco.pt" in msg and "missing keys (317)" in msg and "bn1.weight" in msg
    assert "unexpected keys" in msg and "bogus.weight" in msg


def test_moco_state_dict_rejects_other_layouts():
    with pytest.raises(ValueError, match="not a MoCo checkpoint"):
        moco_encoder_state_dict({"conv1.weight": torch.zeros(1)}, "plain.pt")
    with pytest.raises(ValueError, match="no 'module.encoder_q"):
        moco_encoder_state_dict({"state_dict": {"module.encoder_k.conv1.weight": torch.zeros(1)}}, "k.pt")


# ---------------------------------------------------------------- feature regulariser


def test_feature_reg_pulls_f_not_g5():
    f = torch.randn(2, 8, 16, 16, requires_grad=True)
    g5 = torch.randn(2, 8, 16, 16, requires_grad=True)
    loss = feature_reg_loss(f, g5)
    torch.testing.assert_close(loss, ((f - g5) ** 2).mean())
    loss.backward()
    assert f.grad is not None and g5.grad is None
    with pytest.raises(ValueError, match="same shape"):
        feature_reg_loss(f, g5[:, :4])


# ---------------------------------------------------------------- criterion


def LossCfg(**overrides):  # noqa: N802 - reads as the config it builds
    """The real LossConfig at test sizes: a random LPIPS trunk and the tiny IR-SE for ID (no downloads)."""
    return LossConfig(**{"lpips_pretrained": False, "id_backbone": "ir_se_tiny", **overrides})


class RecordingAlign:
    """Stands in for the frozen contrastive module; remembers what it was given."""

    def __init__(self):
        self.calls = []

    def __call__(self, images: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        self.calls.append((images, w))
        return (images.mean(dim=(1, 2, 3)) - w.mean(dim=1)).pow(2).mean()


def model_output(size: int = 64, seed: int = 10, **overrides) -> SimpleNamespace:
    out = SimpleNamespace(
        w=torch.randn(2, 512, generator=torch.Generator().manual_seed(seed)),
        image_w=images(2, 3, size, size, seed=seed + 1),
        image_w_plus=images(2, 3, size, size, seed=seed + 2),
        image_f=images(2, 3, size, size, seed=seed + 3),
        f=images(2, 8, 16, 16, seed=seed + 4),
        g5=images(2, 8, 16, 16, seed=seed + 5),
    )
    for k, v in overrides.items():
        setattr(out, k, v)
    return out


@pytest.fixture(scope="module")
def criterion_and_align():
    torch.manual_seed(0)
    align = RecordingAlign()
    return InversionCriterion(LossCfg(), align=align), align


def test_total_is_weighted_sum_of_logged_terms(criterion_and_align):
    crit, align = criterion_and_align
    cfg = LossCfg()
    x = images(2, 3, 64, 64)
    out = model_output()
    total, logs = crit(x, out)
    expected_keys = {f"{loss}/{rec}" for loss in ("l2", "lpips", "id") for rec in ("w", "w_plus", "f")}
    assert set(logs) == expected_keys | {"feature_reg", "align", "total"}
    assert all(isinstance(v, float) for v in logs.values())
    weights = {"l2": cfg.l2, "lpips": cfg.lpips, "id": cfg.id, "feature_reg": cfg.feature_reg, "align": cfg.align}
    weighted = sum(weights[k.split("/")[0]] * v for k, v in logs.items() if k != "total")
    assert logs["total"] == pytest.approx(weighted, rel=1e-5)
    assert total.item() == pytest.approx(logs["total"], rel=1e-6)
    assert logs["l2/w"] == pytest.approx(F.mse_loss(out.image_w, x).item(), rel=1e-6)
    assert logs["feature_reg"] == pytest.approx(F.mse_loss(out.f, out.g5).item(), rel=1e-6)
    # Paper Eq. 3/10: the alignment compares the *input* image with w, not G(w).
    images_seen, w_seen = align.calls[-1]
    assert images_seen is x and w_seen is out.w


def test_criterion_gradients_reach_outputs_not_loss_networks(criterion_and_align):
    crit, _ = criterion_and_align
    crit.train()
    assert not any(m.training for m in crit.modules())
    out = model_output()
    for name in ("image_w", "image_w_plus", "image_f", "f", "g5"):
        getattr(out, name).requires_grad_(True)
    total, _ = crit(images(2, 3, 64, 64), out)
    total.backward()
    for name in ("image_w", "image_w_plus", "image_f", "f"):
        grad = getattr(out, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert out.g5.grad is None
    assert all(p.grad is None for p in crit.parameters())


def test_zero_weights_build_nothing():
    crit = InversionCriterion(LossCfg(lpips=0.0, id=0.0, align=0.0))
    children = dict(crit.named_children())
    assert "lpips" not in children and "id_loss" not in children and crit.align is None
    assert not any(True for _ in crit.parameters())
    _, logs = crit(images(2, 3, 64, 64), model_output())
    assert set(logs) == {"l2/w", "l2/w_plus", "l2/f", "feature_reg", "total"}
    no_id = InversionCriterion(LossCfg(lpips=0.0, align=0.0, id_network="none"))
    assert "id_loss" not in dict(no_id.named_children())


def test_absent_reconstructions_are_skipped(criterion_and_align):
    crit, _ = criterion_and_align
    out = model_output(image_w=None, image_f=None, f=None, g5=None)
    _, logs = crit(images(2, 3, 64, 64), out)
    assert set(logs) == {"l2/w_plus", "lpips/w_plus", "id/w_plus", "align", "total"}


def test_f_blend_zero_skips_the_duplicate_f_image():
    crit = InversionCriterion(LossCfg(lpips=0.0, id=0.0, align=0.0))
    _, logs = crit(images(2, 3, 64, 64), model_output(), f_blend=0.0)
    assert "l2/f" not in logs and "l2/w_plus" in logs and "feature_reg" in logs
    with pytest.raises(ValueError, match="f_blend"):
        crit(images(2, 3, 64, 64), model_output(), f_blend=1.5)


def test_larger_reconstructions_are_average_pooled_to_input_size():
    crit = InversionCriterion(LossCfg(lpips=0.0, id=0.0, align=0.0, feature_reg=0.0))
    x = images(2, 3, 32, 32)
    big = model_output(size=64)
    _, logs = crit(x, big)
    assert logs["l2/w"] == pytest.approx(F.mse_loss(F.avg_pool2d(big.image_w, 2), x).item(), rel=1e-6)
    with pytest.raises(ValueError, match="aspect ratios differ"):
        crit(images(2, 3, 24, 32), big)
    with pytest.raises(ValueError, match="smaller than"):
        crit(images(2, 3, 128, 128), big)


def test_criterion_config_errors():
    with pytest.raises(ValueError, match="no contrastive module"):
        InversionCriterion(LossCfg(lpips=0.0, id=0.0))
    with pytest.raises(ValueError, match="'lpips_net'"):
        InversionCriterion(SimpleNamespace(l2=1.0, lpips=0.2, id=0.0, feature_reg=0.0, align=0.0,
                                           id_network="none"))
    with pytest.raises(ValueError, match=">= 0"):
        InversionCriterion(replace(LossCfg(), l2=-1.0))
    with pytest.raises(ValueError, match="id_network"):
        InversionCriterion(LossCfg(lpips=0.0, align=0.0, id_network="curricularface"))
