"""The models users bring (clcae.pretrained): the authors' files give the authors' outputs through every front
door, by path and by registry name; our checkpoints keep their outputs; exports are bit-identical and slim.

The authors' files are made here in their layout (``{'state_dict': encoder.*/decoder.*, 'opts': {...}}``, no
latent_avg, the generator file beside it) with random weights at the tiny size: the layout, not the size, is what
the loader reads.
"""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clcae import pretrained
from clcae.checkpoints import save_checkpoint
from clcae.config import ConfigError, DirectionConfig, load_config, to_dict
from clcae.editing import save_interfacegan
from clcae.factory import build_clcae
from clcae.inference import Inverter
from clcae.models.stylegan2 import blend_feature
from clcae.weights import MissingWeightsError, WeightsError, save_rosinality

ROOT = Path(__file__).resolve().parents[1]
AUTHORS_OPTS = {  # what the authors' train options store (README FFHQ command), at the tiny size
    "output_size": 64, "learn_in_w": True, "dataset_type": "ffhq_encode_inversion",
    "encoder_type": "GradualStyleEncoder", "stylegan_weights": "/apdcephfs/pretrained/stylegan2-ffhq-config-f.pt",
    "use_norm": True, "no_w_attention": False, "no_feature_attention": False, "not_for_feature": False,
    "not_for_ww": False, "no_res": False, "idx_k": None, "lpips_lambda": 0.2, "id_lambda": 0.1,
}


def tiny(*overrides: str):
    return load_config(ROOT / "configs" / "tiny.yaml", list(overrides))


@pytest.fixture(scope="module")
def src():
    """The 'released' network: random tiny weights in eval mode."""
    torch.manual_seed(0)
    model = build_clcae(tiny()).eval().requires_grad_(False)
    with torch.no_grad():  # make the encoder's random output non-trivial
        for p in model.encoder.parameters():
            p.mul_(1.5)
    return model


def write_authors(folder: Path, model, opts=None, name: str = "clcae_ffhq_inversion.pt",
                  generator: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if k != "latent_avg"}  # their files lack it
    torch.save({"state_dict": state, "opts": dict(AUTHORS_OPTS if opts is None else opts), "iter": 1},
               folder / name)
    if generator:
        save_rosinality(folder / "stylegan2-ffhq-config-f.pt", model.decoder, model.latent_avg)
    return folder / name


@pytest.fixture(scope="module")
def authors(tmp_path_factory, src) -> Path:
    return write_authors(tmp_path_factory.mktemp("release"), src)


@pytest.fixture
def photo_bytes() -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(2):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def authors_forward(model, x: torch.Tensor, x_avg: torch.Tensor) -> torch.Tensor:
    """G(w+, f) as the authors' AFPSP.forward computes it: encoder(x - x_avg), w = latent_avg + styles[0], w+ =
    w + CrossAttn_k(w_off, latents[k]), f = content_layer(FCrossAttn(p1, w_off)), f replacing convs.4's input."""
    enc, g = model.encoder, model.decoder
    t1, t2, t3 = enc.pyramid(x - x_avg)
    maps = {"t1": t1, "t2": t2, "t3": t3}
    w_off = enc.styles[0](t1)
    latents = [w_off] + [blk(maps[enc.source_of(i)]) for i, blk in enumerate(enc.styles_others)]
    refine = torch.stack([attn(w_off[:, None], lat[:, None])[:, 0] for attn, lat in zip(enc.cross_attention, latents)],
                         dim=1)
    w_plus = model.latent_avg + w_off[:, None] + refine
    b, c, h, w = t3.shape
    tokens = enc.feature_cross_attention(t3.flatten(2).transpose(1, 2), w_off[:, None])
    f = enc.content_layer(tokens.transpose(1, 2).reshape(b, c, h, w))
    g5, skip = g.synthesis_prefix(w_plus)
    return model.to_input_resolution(g.synthesis_suffix(blend_feature(g5, f, 1.0), skip, w_plus))


# ---------------------------------------------------------------------------------------------- centring
def test_authors_file_gives_the_authors_outputs(authors, src, photo_bytes):
    inv = Inverter.from_pretrained(str(authors), device="cpu")
    assert inv.model_id == "authors:clcae_ffhq_inversion.pt"
    assert inv.model.center_input
    res = inv.invert(photo_bytes)
    x = inv.preprocess(photo_bytes)
    x_avg = src.average_image()  # the authors' image_avg.png: G(latent_avg) at the input size
    with torch.no_grad():
        # 1e-4: issue 14's bound for the fast paths (the Inverter runs the encoder channels-last, the generator
        # folds style and demodulation into the weight at batch 1); measured 1.7e-5 here
        torch.testing.assert_close(res.image, authors_forward(src, x, x_avg), rtol=0, atol=1e-4)
        # without centring the outputs are different: the test fails if centring is removed
        assert (res.image - authors_forward(src, x, torch.zeros_like(x_avg))).abs().max() > 1e-2
        # and the encoder sees exactly x - x_avg
        torch.testing.assert_close(inv.model.encoder_input(x), x - x_avg)


def test_average_image_file_is_used_and_checked(authors, src, photo_bytes, tmp_path):
    grey = tmp_path / "image_avg.png"
    Image.new("RGB", (64, 64), (40, 90, 200)).save(grey)
    base = Inverter.from_pretrained(str(authors), device="cpu")
    other = Inverter.from_pretrained(str(authors), overrides=[f"model.average_image={grey}"], device="cpu")
    x = other.preprocess(photo_bytes)
    expected = torch.tensor([40, 90, 200]).float().div(127.5).sub(1).reshape(1, 3, 1, 1).expand(1, 3, 64, 64)
    torch.testing.assert_close(other.model.x_avg, expected)
    assert not torch.allclose(other.invert(photo_bytes).image, base.invert(photo_bytes).image)
    with torch.no_grad():
        torch.testing.assert_close(other.invert(photo_bytes).image, authors_forward(src, x, expected), rtol=0,
                                   atol=1e-4)  # the generator path holds 1e-4 (issue 14)
    with pytest.raises(MissingWeightsError, match="model.average_image = .*nope.png: file not found"):
        Inverter.from_pretrained(str(authors), overrides=[f"model.average_image={tmp_path / 'nope.png'}"])


def test_our_old_checkpoints_keep_their_outputs(tmp_path, photo_bytes):
    """A checkpoint written before centring existed (no model.center_input in its config) loads with the raw-image
    convention it was trained with."""
    torch.manual_seed(3)
    old = build_clcae(tiny("model.center_input=false")).eval()
    stored = to_dict(tiny())
    del stored["model"]["center_input"], stored["model"]["feature"], stored["model"]["average_image"]
    stored["serve"]["checkpoint"] = stored["serve"].pop("model")  # the old key name
    payload_path = tmp_path / "old.pt"
    save_checkpoint(payload_path, "inversion", old, stored)
    data = torch.load(payload_path, weights_only=True)
    data.pop("x_avg")  # old checkpoints did not carry it
    torch.save(data, payload_path)
    inv = Inverter.from_pretrained(str(payload_path), device="cpu")
    assert inv.model.center_input is False
    ref = Inverter(old, device="cpu")
    assert torch.equal(inv.invert(photo_bytes).image, ref.invert(photo_bytes).image)


# ---------------------------------------------------------------------------------------------- registry
def test_registry_name_resolves_in_clcae_home(authors, monkeypatch, photo_bytes, tmp_path):
    monkeypatch.setenv("CLCAE_HOME", str(authors.parent))
    monkeypatch.chdir(tmp_path)  # no ./pretrained here
    by_name = Inverter.from_pretrained("clcae-ffhq", device="cpu")
    by_path = Inverter.from_pretrained(str(authors), device="cpu")
    assert by_name.model_id == "clcae-ffhq"
    assert torch.equal(by_name.invert(photo_bytes).image, by_path.invert(photo_bytes).image)


def test_clear_errors_for_missing_files_and_names(src, tmp_path, monkeypatch):
    monkeypatch.delenv("CLCAE_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingWeightsError, match=r"clcae-car: clcae_car_inversion.pt not found in .*pretrained.*"
                                                  r"clcae weights fetch clcae-car"):
        pretrained.resolve("clcae-car")
    with pytest.raises(MissingWeightsError, match=r"clcae-ffhqq .*registry names: clcae-ffhq, clcae-car"):
        pretrained.resolve("clcae-ffhqq")
    lonely = write_authors(tmp_path / "lonely", src, generator=False)
    with pytest.raises(MissingWeightsError, match=r"stylegan2-ffhq-config-f.pt.*generator.checkpoint=PATH"):
        pretrained.prepare(str(lonely))
    gen_dir = tmp_path / "gens"
    gen_dir.mkdir()
    save_rosinality(gen_dir / "g.pt", src.decoder, src.latent_avg)
    source, cfg = pretrained.prepare(str(lonely), overrides=[f"generator.checkpoint={gen_dir / 'g.pt'}"])
    assert cfg.generator.checkpoint == str(gen_dir / "g.pt")
    with pytest.raises(MissingWeightsError, match="generator.checkpoint = .*missing.pt: file not found"):
        pretrained.prepare(str(lonely), overrides=[f"generator.checkpoint={gen_dir / 'missing.pt'}"])


@pytest.mark.parametrize(("change", "message"), [
    ({"no_feature_attention": True}, "opts.no_feature_attention=True"),
    ({"no_w_attention": True}, "opts.no_w_attention=True: .*2 w"),
    ({"learn_in_w": False}, "opts.learn_in_w=False"),
    ({"encoder_type": "BackboneEncoderUsingLastLayerIntoW"}, "opts.encoder_type"),
    ({"output_size": 1024}, "opts.output_size=1024 but the decoder weights are a 64 px generator"),
])
def test_options_we_cannot_honour_are_named(src, tmp_path, change, message):
    path = write_authors(tmp_path, src, {**AUTHORS_OPTS, **change})
    with pytest.raises(WeightsError, match=message):
        pretrained.resolve(str(path))


def test_wrong_kinds_of_file_are_explained(src, tmp_path):
    save_rosinality(tmp_path / "g.pt", src.decoder, src.latent_avg)
    with pytest.raises(WeightsError, match="StyleGAN2 generator, not an inversion model"):
        pretrained.resolve(str(tmp_path / "g.pt"))
    save_checkpoint(tmp_path / "s1.pt", "contrastive", torch.nn.Linear(2, 2), to_dict(tiny()))
    with pytest.raises(WeightsError, match="stage-1 .* checkpoint"):
        pretrained.resolve(str(tmp_path / "s1.pt"))


def test_overriding_the_architecture_is_refused(authors):
    with pytest.raises(ConfigError, match="generator.size is part of the model's architecture"):
        pretrained.prepare(str(authors), overrides=["generator.size=256"])


def test_cars_options_give_the_car_crop_and_input():
    torch.manual_seed(0)
    car_cfg = tiny("generator.size=128", "encoder.input_size=[96,128]", "generator.crop=[16,112,0,128]")
    model = build_clcae(car_cfg).eval()
    state = model.state_dict()
    cfg = pretrained.config_from_opts({**AUTHORS_OPTS, "output_size": 128, "dataset_type": "car_encode_inversion"},
                                      state, "car.pt")
    assert cfg["generator"]["crop"] == [16, 112, 0, 128]  # the authors' rows 32:224 of 256, scaled
    assert cfg["encoder"]["input_size"] == [96, 128]


# ---------------------------------------------------------------------------------------------- the edit
def test_w_edit_reaches_block_zero_like_the_authors(src, tmp_path, photo_bytes):
    d = torch.nn.functional.normalize(torch.randn(1, 64, generator=torch.Generator().manual_seed(1)), dim=1)
    save_interfacegan(d, tmp_path / "smile.pt")
    cfg = tiny()
    cfg.directions = {"smile": DirectionConfig(kind="interfacegan", path=str(tmp_path / "smile.pt"))}
    from clcae.factory import build_directions

    inv = Inverter(src, build_directions(cfg), device="cpu")
    res = inv.invert(photo_bytes)
    assert torch.equal(inv.edit(res, [("smile", 0.0)]), res.image)  # strength 0 is the exact identity
    edited = inv.edit(res, [("smile", 2.0)])
    # the authors' edit: latent_base + offset is the query of every block AND block 0's key/value
    enc, g = src.encoder, src.decoder
    with torch.no_grad():
        w_edit = res.deltas[:, 0] + 2.0 * d
        memory = torch.cat([w_edit[:, None], res.deltas[:, 1:]], dim=1)
        refine = torch.stack([a(w_edit[:, None], memory[:, i:i + 1])[:, 0] for i, a in enumerate(enc.cross_attention)],
                             dim=1)
        w_plus_edit = src.latent_avg + w_edit[:, None] + refine
        f_edit = enc.feature(res.t3, w_edit)
        g5_edit, skip = g.synthesis_prefix(w_plus_edit)
        g5 = g.synthesis_prefix(res.w_plus)[0]
        expected = src.to_input_resolution(g.synthesis_suffix(f_edit + g5_edit - g5, skip, w_plus_edit))
        torch.testing.assert_close(edited, expected, rtol=0, atol=1e-4)
        # the old path (block 0 fed the unedited w) differs in layer 0
        stale = enc.cross_attention[0](w_edit[:, None], res.deltas[:, :1])[:, 0]
        assert (stale - refine[:, 0]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------- export
def test_export_is_bit_identical_and_slim(src, tmp_path, photo_bytes):
    cfg = tiny()
    opt = torch.optim.Adam(src.encoder.parameters())
    src.encoder.zero_grad()
    for p in src.encoder.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # optimiser state: exp_avg and exp_avg_sq per encoder parameter, as a training checkpoint holds
    cfg.directions = {"smile": DirectionConfig(kind="interfacegan", path=str(tmp_path / "gone.pt"))}
    ckpt = tmp_path / "run" / "checkpoint_000010" / "checkpoint.pt"
    ckpt.parent.mkdir(parents=True)
    save_checkpoint(ckpt, "inversion", src, to_dict(cfg), optimizer=opt.state_dict(), step=10,
                    model_id="run@10")
    out = tmp_path / "model.safetensors"
    info = pretrained.export(str(tmp_path / "run"), str(out))  # a run directory: its newest checkpoint
    assert info["model_id"] == "run@10"
    src_inv = Inverter.from_pretrained(str(ckpt), device="cpu")   # the direction file is gone: still loads
    exp_inv = Inverter.from_pretrained(str(out), device="cpu")
    assert exp_inv.model_id == "run@10" and exp_inv.directions.names() == []
    assert torch.equal(exp_inv.invert(photo_bytes).image, src_inv.invert(photo_bytes).image)
    assert out.stat().st_size < 0.5 * ckpt.stat().st_size
    header = pretrained._read_safetensors_header(str(out), None)["__metadata__"]
    config = json.loads(header["config"])
    assert set(config) == {"name", "generator", "encoder", "model"}  # no optimiser, data, train or directions
    assert config["generator"]["checkpoint"] is None
    half = tmp_path / "model16.safetensors"
    pretrained.export(str(out), str(half), dtype="fp16")
    assert half.stat().st_size < 0.6 * out.stat().st_size
    h_inv = Inverter.from_pretrained(str(half), device="cpu")
    assert (h_inv.invert(photo_bytes).image - src_inv.invert(photo_bytes).image).abs().max() < 0.1


def test_export_of_the_authors_file_and_the_cli(authors, tmp_path, photo_bytes):
    from clcae import cli

    out = tmp_path / "authors.safetensors"
    assert cli.main(["weights", "convert", str(authors), str(out)]) == 0
    a = Inverter.from_pretrained(str(authors), device="cpu")
    b = Inverter.from_pretrained(str(out), device="cpu")
    assert torch.equal(a.invert(photo_bytes).image, b.invert(photo_bytes).image)
    assert cli.main(["export", str(authors), str(tmp_path / "x.pt")]) == 2


# ---------------------------------------------------------------------------------------------- front doors
def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_cli", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_job_takes_the_authors_file(authors, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    args = ["--model", str(authors), "--config", str(ROOT / "configs" / "tiny.yaml"), "--input", str(folder),
            "--out", str(tmp_path / "eval"), "--no-timing", "--batch-size", "2"]
    assert _job("evaluate").main(args) == 0
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["images"] == 2
    assert _job("evaluate").main([*args[:1], str(tmp_path / "nothing.pt"), *args[2:]]) == 2
    assert "model not found" in capsys.readouterr().err


def test_serve_builder_resolves_the_model_in_the_driver(authors, tmp_path):
    spec = importlib.util.spec_from_file_location("clcae_serve_app_p", ROOT / "serve" / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    assert app.build_app({"model": str(authors)}) is not None
    with pytest.raises(MissingWeightsError, match="model not found"):
        app.build_app({"model": str(tmp_path / "missing.pt")})
    from clcae.serving import _inverter

    source, cfg = pretrained.prepare(str(authors), tiny())
    replica = _inverter(to_dict(cfg), source)
    assert replica.model_id == "authors:clcae_ffhq_inversion.pt" and replica.model.center_input


def test_stage2_init_from_a_released_model(authors, src):
    from clcae.train.loop import TrainSetupError, build_stage, init_source

    cfg = tiny(f"train.init_from={authors}", "model.use_align=false")
    init = init_source(cfg)
    step = build_stage(cfg, "inversion", None, resuming=False, init_from=init)
    for k, v in src.encoder.state_dict().items():
        assert torch.equal(step.model.encoder.state_dict()[k], v), k
    with pytest.raises(TrainSetupError, match="encoder.input_size: model \\[64, 64\\], run \\[128, 128\\]"):
        init_source(tiny(f"train.init_from={authors}", "model.use_align=false", "encoder.input_size=[128,128]"))


def test_the_authors_contrastive_pair_feeds_l_align(tmp_path):
    from clcae.factory import build_aligner
    from clcae.train.loop import build_stage
    from clcae.weights import CONTRASTIVE_LATENT_RENAMES

    cfg = tiny()
    torch.manual_seed(4)
    aligner = build_aligner(cfg)
    st = aligner.state_dict()
    image = {k[len("image_encoder."):]: v for k, v in st.items() if k.startswith("image_encoder.")}
    image["logit_scale"] = st["logit_scale"]
    latent = {}
    for k, v in st.items():
        if k.startswith("latent_encoder."):
            k = k[len("latent_encoder."):]
            for new_prefix, old_prefix in ((v2, k2) for k2, v2 in CONTRASTIVE_LATENT_RENAMES.items()):
                if k.startswith(new_prefix):
                    k = old_prefix + k[len(new_prefix):]
            latent[k] = v
    torch.save({"state_dict": image, "opts": {}}, tmp_path / "best_model_image.pt")
    torch.save({"state_dict": latent, "opts": {}}, tmp_path / "best_model_latent.pt")
    cfg = tiny(f"contrastive.official_image={tmp_path / 'best_model_image.pt'}",
               f"contrastive.official_latent={tmp_path / 'best_model_latent.pt'}")
    step = build_stage(cfg, "inversion", None, resuming=False)
    assert step.aligner is not None
    assert torch.equal(step.aligner.image_encoder.image_projection.lin1.weight,
                       aligner.image_encoder.image_projection.lin1.weight)
    with pytest.raises(ConfigError, match="contrastive.official_latent"):
        tiny(f"contrastive.official_image={tmp_path / 'best_model_image.pt'}")


def test_invert_job_takes_the_authors_file_by_name(authors, tmp_path, monkeypatch, ray_cluster):
    import pyarrow.parquet as pq

    monkeypatch.setenv("CLCAE_HOME", str(authors.parent))
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    out = tmp_path / "table"
    job = _job("invert")
    assert job.main(["--model", "clcae-ffhq", "--config", str(ROOT / "configs" / "tiny.yaml"), "--input", str(folder),
                     "--output", str(out), "infer.psnr=false"]) == 0
    table = pq.read_table(out / "latents")
    assert table.num_rows == 3 and set(table.column("model_id").to_pylist()) == {"clcae-ffhq"}
    # the table holds the authors' w: the same as the library computes for the same photo
    inv = Inverter.from_pretrained("clcae-ffhq", device="cpu")
    row = table.to_pylist()[[r["key"] for r in table.to_pylist()].index("p0.png")]
    expected = inv.invert([(folder / "p0.png").read_bytes()]).w[0]
    torch.testing.assert_close(torch.tensor(row["w"]), expected, rtol=0, atol=1e-5)
    assert job.main(["--model", "clcae-car", "--input", str(folder), "--output", str(out)]) == 2
