"""Checkpoint formats: rosinality generators, TreB1eN IR-SE, the authors' CLCAE files, ours; error messages."""

from __future__ import annotations

import pytest
import torch

from clcae import checkpoints, weights
from clcae.checkpoints import save_checkpoint
from clcae.cli import main as cli_main
from clcae.config import load_config, to_dict
from clcae.factory import build_aligner, build_clcae, build_generator
from clcae.models.irse import IRSEBackbone
from clcae.weights import (
    MissingWeightsError,
    WeightsError,
    load_generator,
    load_official_contrastive,
    load_official_inversion,
    save_rosinality,
)


def tiny(*overrides: str):
    return load_config("configs/tiny.yaml", list(overrides))


@pytest.fixture(scope="module")
def generator_file(tmp_path_factory):
    gen, latent_avg = build_generator(tiny())
    path = tmp_path_factory.mktemp("g") / "stylegan2-tiny.pt"
    save_rosinality(path, gen, latent_avg)
    return path, gen, latent_avg


def test_rosinality_round_trip_loads_strictly(generator_file):
    path, gen, latent_avg = generator_file
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"g_ema", "latent_avg"} and set(ckpt["g_ema"]) == set(gen.state_dict())
    loaded, la = load_generator(str(path), tiny("generator.init_seed=123"))
    torch.testing.assert_close(la, latent_avg)
    w = torch.randn(2, gen.n_latent, gen.style_dim)
    with torch.no_grad():
        assert torch.equal(loaded.synthesis(w), gen.synthesis(w))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_config_checkpoint_path_is_used(generator_file):
    path, gen, latent_avg = generator_file
    model = build_clcae(tiny(f"generator.checkpoint={path}", "generator.init_seed=7"))
    torch.testing.assert_close(model.latent_avg, latent_avg)
    torch.testing.assert_close(model.decoder.input.input, gen.input.input)


def test_missing_latent_avg_falls_back_to_mean_latent(tmp_path, generator_file, caplog):
    _, gen, _ = generator_file
    path = tmp_path / "no_avg.pt"
    save_rosinality(path, gen, None)
    cfg = tiny("generator.mean_latent_samples=2000")
    _, la = load_generator(str(path), cfg)
    torch.testing.assert_close(la, gen.mean_latent(2000, seed=cfg.generator.init_seed)[0])
    assert "no latent_avg" in caplog.text


def test_old_checkpoint_without_noise_buffers_loads(tmp_path, generator_file, caplog):
    _, gen, latent_avg = generator_file
    state = {k: v for k, v in gen.state_dict().items() if not k.startswith("noises.")}
    torch.save({"g_ema": state, "latent_avg": latent_avg}, tmp_path / "old.pt")
    load_generator(str(tmp_path / "old.pt"), tiny())
    assert "no noise buffers" in caplog.text


def test_generator_errors_name_file_keys_and_fix(tmp_path, generator_file):
    path, _, _ = generator_file
    with pytest.raises(MissingWeightsError, match="stylegan2-ffhq-config-f.pt.*clcae weights fetch stylegan2-ffhq"):
        load_generator(str(tmp_path / "stylegan2-ffhq-config-f.pt"), tiny())
    with pytest.raises(WeightsError) as err:
        load_generator(str(path), tiny("generator.size=128"))
    msg = str(err.value)
    assert str(path) in msg and "missing keys (16)" in msg and "convs.8" in msg and "generator.size=64" in msg
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pt is not a readable PyTorch checkpoint"):
        load_generator(str(tmp_path / "junk.pt"), tiny())
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="no 'g_ema'"):
        load_generator(str(tmp_path / "other.pt"), tiny())


def test_channel_multiplier_mismatch_is_diagnosed(tmp_path):
    gen, la = build_generator(tiny("generator.channel_max=512", "generator.channel_multiplier=1"))
    save_rosinality(tmp_path / "cm1.pt", gen, la)
    with pytest.raises(WeightsError, match="generator.channel_multiplier=1"):
        load_generator(str(tmp_path / "cm1.pt"), tiny("generator.channel_max=512"))


def test_irse_file_inits_encoder_and_arcface_strictly(tmp_path):
    arcface = IRSEBackbone("ir_se_tiny")
    torch.save(arcface.state_dict(), tmp_path / "model_ir_se50.pth")
    model = build_clcae(tiny(f"encoder.pretrained={tmp_path / 'model_ir_se50.pth'}"))
    torch.testing.assert_close(model.encoder.body[0].res_layer[1].weight, arcface.body[0].res_layer[1].weight)
    other = IRSEBackbone("ir_se_tiny")
    weights.load_arcface(str(tmp_path / "model_ir_se50.pth"), other)
    torch.testing.assert_close(other.output_layer[3].weight, arcface.output_layer[3].weight)
    torch.save({"foo": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match="0 matching keys"):
        build_clcae(tiny(f"encoder.pretrained={tmp_path / 'wrong.pth'}"))


def test_authors_inversion_checkpoint_loads_onto_ours(tmp_path):
    torch.manual_seed(0)
    src = build_clcae(tiny()).eval()
    state = {k: v for k, v in src.state_dict().items() if k != "latent_avg"}  # their files lack it
    torch.save({"state_dict": state, "opts": {"output_size": 64, "learn_in_w": True}}, tmp_path / "best_model.pt")
    torch.manual_seed(1)
    dst = build_clcae(tiny("generator.init_seed=5")).eval()
    load_official_inversion(str(tmp_path / "best_model.pt"), dst, latent_avg=src.latent_avg)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(dst(x).image_f, src(x).image_f)
    bad = dict(state)
    bad.pop("encoder.content_layer.convs.0.weight")
    torch.save({"state_dict": bad, "opts": {}}, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match="missing keys \\(1\\): encoder.content_layer.convs.0.weight"):
        load_official_inversion(str(tmp_path / "bad.pt"), dst)


def test_authors_contrastive_pair_maps_onto_aligner(tmp_path):
    torch.manual_seed(0)
    src = build_aligner(tiny())
    with torch.no_grad():
        src.logit_scale.fill_(3.0)
    sd = src.state_dict()
    image = {k[len("image_encoder."):]: v for k, v in sd.items() if k.startswith("image_encoder.")}
    image["logit_scale"] = sd["logit_scale"]
    names = {"layers.0.": "coarse.", "layers.1.": "medium.", "layers.2.": "fine."}
    latent = {}
    for k, v in sd.items():
        if k.startswith("latent_encoder."):
            k = k[len("latent_encoder."):]
            for ours, theirs in names.items():
                k = k.replace(ours, theirs)
            latent[k] = v
    assert "coarse.self_attn.in_proj_weight" in latent and "latent_projection.lin1.weight" in latent
    torch.save({"state_dict": image, "opts": {}}, tmp_path / "best_model_image.pt")
    torch.save({"state_dict": latent, "opts": {}}, tmp_path / "best_model_latent.pt")
    torch.manual_seed(1)
    dst = build_aligner(tiny())
    load_official_contrastive(str(tmp_path / "best_model_image.pt"), str(tmp_path / "best_model_latent.pt"), dst)
    assert dst.logit_scale.item() == 3.0
    src.eval(), dst.eval()
    x, w = torch.rand(2, 3, 64, 64), torch.randn(2, 64)
    with torch.no_grad():
        for a, b in zip(dst(x, w), src(x, w)):
            torch.testing.assert_close(a, b)


def test_our_checkpoint_round_trip_and_kind_check(tmp_path):
    cfg = tiny()
    model = build_clcae(cfg)
    save_checkpoint(tmp_path / "c.pt", "inversion", model, to_dict(cfg), step=3)
    ckpt = checkpoints.read_checkpoint(str(tmp_path / "c.pt"), kind="inversion")
    assert ckpt["step"] == 3 and ckpt["config"]["name"] == "tiny" and "latent_avg" in ckpt["state_dict"]
    with pytest.raises(WeightsError, match="holds a 'inversion' checkpoint, expected 'contrastive'"):
        checkpoints.read_checkpoint(str(tmp_path / "c.pt"), kind="contrastive")
    torch.save({"state_dict": {}}, tmp_path / "theirs.pt")
    with pytest.raises(WeightsError, match="not a clcae-platform checkpoint"):
        checkpoints.read_checkpoint(str(tmp_path / "theirs.pt"))


def test_weights_cli_lists_official_files_and_rejects_unknown(capsys):
    assert cli_main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("stylegan2-ffhq", "ir-se50", "moco-v2", "clcae-ffhq", "interfacegan-smile"):
        assert name in out
    with pytest.raises(SystemExit, match="unknown file 'nope'"):
        cli_main(["weights", "fetch", "nope"])
