"""Models: generator format and maths, encoder/CLCAE structure, ablations, contrastive loss, edits."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from clcae.config import load_config
from clcae.factory import build_aligner, build_clcae
from clcae.models.attention import CrossAttention, TransformerEncoderLayer
from clcae.models.contrastive import info_nce
from clcae.models.stylegan2 import Blur, Generator, ModulatedConv2d, Upsample, make_kernel


def tiny_cfg(*overrides: str):
    return load_config("configs/tiny.yaml", list(overrides))


def official_cfg(size: int, *overrides: str):
    return load_config("configs/ffhq.yaml", [f"generator.size={size}", "generator.checkpoint=null",
                                             "encoder.pretrained=null", *overrides])


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_clcae(tiny_cfg())


# ------------------------------------------------------------------------------------------ generator
# (size, state_dict entries, parameters) of rosinality's Generator(size, 512, 8, channel_multiplier=2)
ROSINALITY_TABLE = [(256, 135, 30_034_338), (512, 153, 30_276_583), (1024, 171, 30_370_060)]


@pytest.mark.parametrize(("size", "entries", "params"), ROSINALITY_TABLE)
def test_generator_matches_rosinality_key_table(size, entries, params):
    with torch.device("meta"):  # shapes only: nothing is allocated
        g = Generator(size)
    sd = g.state_dict()
    assert len(sd) == entries
    assert sum(p.numel() for p in g.parameters()) == params
    assert sd["convs.0.conv.blur.kernel"].shape == (4, 4)
    assert sd["to_rgbs.0.upsample.kernel"].shape == (4, 4)
    assert sd["conv1.conv.weight"].shape == (1, 512, 512, 3, 3)
    assert sd[f"noises.noise_{g.num_layers - 1}"].shape == (1, 1, size, size)
    assert "style.8.weight" in sd and "style.9.weight" not in sd


@pytest.mark.parametrize("size", [32, 64, 128, 256, 512, 1024])
def test_generator_shapes_and_latent_counts(size):
    with torch.device("meta"):
        g = Generator(size)
        w_plus = torch.empty(2, g.n_latent, 512)
        image = g.synthesis(w_plus)
        g5, skip = g.synthesis_prefix(w_plus)
    assert g.n_latent == 2 * int(math.log2(size)) - 2
    assert image.shape == (2, 3, size, size)
    assert g5.shape == (2, 512, 16, 16) and skip.shape == (2, 3, 16, 16)


def test_generator_rejects_bad_sizes_and_latents():
    with pytest.raises(ValueError, match="power of two in 32..1024"):
        Generator(48)
    g = Generator(32, 16, 1, channel_max=8)
    with pytest.raises(ValueError, match=r"\(B, 8, 16\)"):
        g.synthesis(torch.zeros(1, 7, 16))


def test_feature_injection_of_own_g5_is_exact():
    torch.manual_seed(1)
    g = Generator(64, 32, 2, channel_max=16).eval()
    w_plus = g.broadcast(g.mapping(torch.randn(3, 32)))
    with torch.no_grad():
        reference = g.synthesis(w_plus)
        assert torch.equal(g.synthesis(w_plus, f=g.g5(w_plus)), reference)
        # f does matter: another feature changes the image, the 16x16 skip is still the generator's own
        other = g.synthesis(w_plus, f=torch.zeros_like(g.g5(w_plus)))
    assert not torch.allclose(other, reference)


def _upfirdn2d_naive(x, kernel, up, pad0, pad1):
    """Textbook upfirdn2d (zero-insertion, padding, correlation with the flipped kernel), for checking."""
    b, c, h, w = x.shape
    if up > 1:
        z = x.new_zeros(b, c, h * up, w * up)
        z[:, :, ::up, ::up] = x
        x = z
    x = F.pad(x, (pad0, pad1, pad0, pad1))
    k = torch.flip(kernel, (0, 1))[None, None].expand(c, 1, *kernel.shape)
    return F.conv2d(x, k, groups=c)


def test_blur_and_upsample_equal_upfirdn2d():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 9, 9, dtype=torch.float64)
    blur = Blur((1, 3, 3, 1), pad=(1, 1), upsample_factor=2).double()
    ref = _upfirdn2d_naive(x, make_kernel((1, 3, 3, 1)).double() * 4, 1, 1, 1)
    torch.testing.assert_close(blur(x), ref, rtol=0, atol=1e-12)
    up = Upsample((1, 3, 3, 1)).double()
    ref = _upfirdn2d_naive(x, make_kernel((1, 3, 3, 1)).double() * 4, 2, 2, 1)
    torch.testing.assert_close(up(x), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("upsample", [False, True])
def test_modulated_conv_equals_per_sample_weights(upsample):
    """Our shared-weight form == StyleGAN2's definition: per-sample modulated, demodulated weights."""
    torch.manual_seed(0)
    conv = ModulatedConv2d(6, 4, 3, 8, upsample=upsample).double()
    x, style = torch.randn(3, 6, 8, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    s = conv.modulation(style)
    outs = []
    for i in range(3):
        wi = conv.scale * conv.weight[0] * s[i][None, :, None, None]
        wi = wi * torch.rsqrt(wi.pow(2).sum((1, 2, 3), keepdim=True) + 1e-8)
        if upsample:
            y = F.conv_transpose2d(x[i:i + 1], wi.transpose(0, 1), stride=2)
            outs.append(_upfirdn2d_naive(y, make_kernel((1, 3, 3, 1)).double() * 4, 1, 1, 1))
        else:
            outs.append(F.conv2d(x[i:i + 1], wi, padding=1))
    torch.testing.assert_close(conv(x, style), torch.cat(outs), rtol=1e-9, atol=1e-9)


def test_mean_latent_is_seeded_mean_of_mapping():
    torch.manual_seed(0)
    g = Generator(32, 16, 2, channel_max=8)
    a, b = g.mean_latent(3000, seed=5, chunk=1000), g.mean_latent(3000, seed=5, chunk=3000)
    torch.testing.assert_close(a, b)
    z = torch.randn(3000, 16, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, g.mapping(z).mean(0, keepdim=True), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ encoder / CLCAE
# The authors' AFPSP state_dict (reference/clcae-official-keys.md) + our latent_avg buffer.
AFPSP_TABLE = [(256, 914, 275_761_762, 245_727_424), (1024, 1062, 342_198_732, 311_828_672)]


@pytest.mark.parametrize(("size", "entries", "params", "encoder_params"), AFPSP_TABLE)
def test_clcae_matches_authors_afpsp_key_table(size, entries, params, encoder_params):
    with torch.device("meta"):
        model = build_clcae(official_cfg(size), load_pretrained=False)
    sd = model.state_dict()
    assert len(sd) == entries + 1 and "latent_avg" in sd
    assert sum(p.numel() for p in model.parameters()) == params
    assert sum(p.numel() for p in model.encoder.parameters()) == encoder_params
    n = model.decoder.n_latent
    assert f"encoder.styles_others.{n - 2}.linear.weight" in sd
    assert f"encoder.cross_attention.{n - 1}.norm1.weight" in sd  # unused, but in their checkpoints
    assert sd["encoder.content_layer.convs.2.weight"].shape == (512, 512, 3, 3)
    assert sd["encoder.body.23.res_layer.5.fc2.weight"].shape == (512, 32, 1, 1)


def test_contrastive_matches_authors_key_tables():
    with torch.device("meta"):
        aligner = build_aligner(official_cfg(1024))
    # best_model_image.pt: 41,374,913 params incl. logit_scale; best_model_latent.pt: 6,834,176
    assert sum(p.numel() for p in aligner.image_encoder.parameters()) + 1 == 41_374_913
    assert sum(p.numel() for p in aligner.latent_encoder.parameters()) == 6_834_176
    assert len(aligner.state_dict()) == 407 + 44 + 2  # + our image_avg and latent_avg buffers


def test_clcae_outputs_and_shapes(tiny_model):
    cfg = tiny_cfg()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    out = tiny_model(x)
    n, d = tiny_model.decoder.n_latent, cfg.generator.style_dim
    assert out.w.shape == (2, d) and out.w_plus.shape == (2, n, d)
    assert out.f.shape == out.g5.shape == (2, tiny_model.decoder.feature_channels, 16, 16)
    for img in (out.image_w, out.image_w_plus, out.image_f):
        assert img.shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        tiny_model(torch.zeros(2, 3, 32, 32))


def test_shared_prefix_render_equals_separate_generator_passes(tiny_model):
    tiny_model.eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        out = tiny_model(x)
        g = tiny_model.decoder
        torch.testing.assert_close(out.image_w, g.synthesis(out.w), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.image_w_plus, g.synthesis(out.w_plus), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.image_f, g.synthesis(out.w_plus, f=out.f), rtol=1e-5, atol=1e-5)


def test_render_returns_its_outputs_and_changes_no_argument(tiny_model):
    from clcae.models.clcae import Rendered

    tiny_model.eval()
    with torch.no_grad():
        out = tiny_model(torch.rand(2, 3, 64, 64) * 2 - 1)
        args = (out.w.clone(), out.w_plus.clone(), out.f.clone())
        rendered = tiny_model.render(*args, outputs=("w_plus", "f"))
        g5 = tiny_model.decoder.synthesis_prefix(out.w_plus)[0]
    assert isinstance(rendered, Rendered) and set(rendered.images) == {"w_plus", "f"}
    assert all(torch.equal(a, b) for a, b in zip(args, (out.w, out.w_plus, out.f)))  # inputs untouched
    torch.testing.assert_close(rendered.images["f"], out.image_f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rendered.images["w_plus"], out.image_w_plus, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rendered.g5, g5, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.g5, tiny_model.render(out.w, out.w_plus, out.f).g5)  # forward reports render's G5


def test_encoder_gets_gradients_generator_does_not(tiny_model):
    tiny_model.train()
    tiny_model.zero_grad()
    out = tiny_model(torch.rand(2, 3, 64, 64) * 2 - 1)
    (out.image_w.square().mean() + out.image_w_plus.square().mean() + out.image_f.square().mean()).backward()
    assert all(p.grad is None for p in tiny_model.decoder.parameters())
    assert not any(p.requires_grad for p in tiny_model.decoder.parameters())
    assert not tiny_model.decoder.training
    used = {n: p for n, p in tiny_model.encoder.named_parameters() if p.requires_grad}
    assert all(".norm1." in n for n, p in tiny_model.encoder.named_parameters() if not p.requires_grad)
    missing = [n for n, p in used.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    tiny_model.zero_grad()
    tiny_model.eval()


def _encode(cfg, x):
    torch.manual_seed(0)
    model = build_clcae(cfg).eval()
    with torch.no_grad():
        return model, model(x)


def test_ablation_switches_change_the_computation():
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    full_model, full = _encode(tiny_cfg(), x)
    no_w_model, no_w = _encode(tiny_cfg("model.w_attention=false"), x)
    no_f_model, no_f = _encode(tiny_cfg("model.f_attention=false"), x)
    assert not hasattr(no_w_model.encoder, "cross_attention")
    assert not hasattr(no_f_model.encoder, "feature_cross_attention")
    # Same seed, same shared weights: w is unchanged, the ablated branch is not.
    torch.testing.assert_close(no_w.w, full.w)
    assert not torch.allclose(no_w.w_plus, full.w_plus)
    torch.testing.assert_close(no_f.w_plus, full.w_plus)
    assert not torch.allclose(no_f.f, full.f)
    # without W+ attention, layer 0 of w+ is w itself and the other layers are w + the raw residuals
    torch.testing.assert_close(no_w.w_plus[:, 0], no_w.w)
    torch.testing.assert_close(no_w.w_plus[:, 1:], no_w.w[:, None] + no_w.deltas[:, 1:])


def test_single_token_attention_is_query_independent_and_shortcut_exact():
    torch.manual_seed(0)
    block = CrossAttention(16, 4, 32, dropout=0.1).eval()
    q1, q2, mem = torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.randn(2, 1, 16)
    full = block.multihead_attn(q1, mem, mem, need_weights=False)[0]
    torch.testing.assert_close(block.attend(q1, mem), full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(block.attend(q2, mem), block.attend(q1, mem))  # Q never matters
    layer = TransformerEncoderLayer(16, 4, 32).eval()
    src, pos = torch.randn(2, 1, 16), torch.randn(1, 1, 16)
    attn = layer.self_attn(src + pos, src + pos, src, need_weights=False)[0]  # the full DETR computation
    x = layer.norm1(src + attn)
    manual = layer.norm2(x + layer.linear2(F.relu(layer.linear1(x))))
    torch.testing.assert_close(layer(src, pos), manual, rtol=1e-6, atol=1e-6)


def test_multi_token_attention_depends_on_the_query():
    torch.manual_seed(0)
    block = CrossAttention(16, 4, 32, dropout=0.0, tokens=4).eval()
    mem = torch.randn(2, 1, 16)
    a, b = block.attend(torch.randn(2, 3, 16), mem), block.attend(torch.randn(2, 3, 16), mem)
    assert not torch.allclose(a, b)
    cfg = tiny_cfg("model.attention_tokens=3")
    model = build_clcae(cfg)
    assert model.encoder.cross_attention[0].tokenizer.out_features == 3 * cfg.generator.style_dim


# ------------------------------------------------------------------------------------------ contrastive
def test_info_nce_is_symmetric_and_falls_for_aligned_pairs():
    torch.manual_seed(0)
    img, lat = F.normalize(torch.randn(8, 16), dim=-1), F.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(10.0)
    assert torch.allclose(info_nce(img, lat, scale), info_nce(lat, img, scale))
    aligned = info_nce(img, img, scale)
    shuffled = info_nce(img, img[torch.randperm(8)], scale)
    assert aligned < info_nce(img, lat, scale) and aligned < shuffled  # aligned pairs give the lowest loss
    # lambda weights the two directions: lambda=1 is the image->latent term alone
    manual = F.cross_entropy(scale * img @ lat.t(), torch.arange(8))
    torch.testing.assert_close(info_nce(img, lat, scale, lambda_image=1.0), manual)


def test_info_nce_with_gathered_negatives_matches_global_batch_rows():
    torch.manual_seed(0)
    img, lat = F.normalize(torch.randn(8, 16), dim=-1), F.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(5.0)
    # rows 4..7 seen from "worker 1": same logits as the global loss restricted to those rows
    local = info_nce(img[4:], lat[4:], scale, all_img=img, all_lat=lat, offset=4)
    logits_i, logits_w = scale * img @ lat.t(), scale * lat @ img.t()
    t = torch.arange(8)
    ref = 0.5 * F.cross_entropy(logits_i[4:], t[4:]) + 0.5 * F.cross_entropy(logits_w[4:], t[4:])
    torch.testing.assert_close(local, ref)


def test_aligner_trains_towards_alignment_and_freezes():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    aligner = build_aligner(cfg)
    images, w = torch.rand(8, 3, 64, 64) * 2 - 1, torch.randn(8, cfg.generator.style_dim)
    opt = torch.optim.Adam(aligner.parameters(), lr=1e-3)
    first = None
    for _ in range(15):
        loss = aligner.loss(images, w)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert aligner.loss(images, w).item() < first
    aligner.freeze()
    assert not aligner.training and not any(p.requires_grad for p in aligner.parameters())
    assert aligner.scale().item() <= cfg.contrastive.max_logit_scale


def test_seed_sets_the_encoder_init_and_generator_seed_the_generator():
    a, b, c = build_clcae(tiny_cfg("seed=1")), build_clcae(tiny_cfg("seed=1")), build_clcae(tiny_cfg("seed=2"))
    wa, wb, wc = (m.encoder.styles[0].linear.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert torch.equal(a.decoder.input.input, c.decoder.input.input)  # same generator.init_seed
