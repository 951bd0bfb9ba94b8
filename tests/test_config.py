"""Config loading: the shipped YAML files, overrides, inheritance, round trips and error messages."""

import dataclasses
import io
from pathlib import Path

import pytest
import torch

from clcae.config import (
    BACKBONE_WIDTHS,
    CLCAEConfig,
    ConfigError,
    DirectionConfig,
    LossConfig,
    from_dict,
    inference_config,
    load_config,
    n_latent,
    to_dict,
    to_yaml,
    validate,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def load(name: str, *overrides: str) -> CLCAEConfig:
    return load_config(CONFIGS / f"{name}.yaml", overrides)


# ---------------------------------------------------------------------------------------------------
# The shipped files


def test_ffhq_is_the_paper_setup():
    cfg = load("ffhq")
    assert (cfg.generator.size, n_latent(cfg), cfg.encoder.input_size) == (1024, 18, [256, 256])
    assert cfg.generator.checkpoint == "pretrained/stylegan2-ffhq-config-f.pt"
    assert cfg.encoder.pretrained == cfg.loss.id_weights == "pretrained/model_ir_se50.pth"
    assert cfg.loss.id_network == "arcface"
    assert set(cfg.directions) == {"smile", "age", "pose", "eyes", "beard", "lip", "white_hair"}
    smile = DirectionConfig("interfacegan", "pretrained/editing/smile.pt", max_strength=3.0)
    eyes = DirectionConfig("ganspace", "pretrained/editing/ffhq_pca.pt", 54, [7, 8], max_strength=20.0)
    assert (cfg.directions["smile"], cfg.directions["eyes"]) == (smile, eyes)
    # The file spells out the method's numbers; they must not drift from the schema defaults.
    defaults = CLCAEConfig()
    assert dataclasses.replace(cfg.loss, id_weights=None) == defaults.loss
    for section in ("model", "contrastive", "optim"):
        assert getattr(cfg, section) == getattr(defaults, section), section
    assert (defaults.loss.l2, defaults.loss.lpips, defaults.loss.id, defaults.loss.feature_reg,
            defaults.loss.align, defaults.contrastive.lambda_image) == (1.0, 0.2, 0.1, 0.01, 1.0, 0.5)
    assert load_config() == defaults


def test_cars_setup():
    cfg = load("cars")
    assert (cfg.generator.size, n_latent(cfg)) == (512, 16)
    assert cfg.generator.crop == [64, 448, 0, 512]
    assert cfg.encoder.input_size == [192, 256]
    assert (cfg.loss.id_network, cfg.loss.id_weights) == ("moco", "pretrained/moco_v2_800ep_pretrain.pt")
    assert {d.kind for d in cfg.directions.values()} == {"ganspace"}
    assert {d.path for d in cfg.directions.values()} == {"pretrained/editing/cars_pca.pt"}
    assert all(d.layers[1] <= 16 for d in cfg.directions.values())


def test_tiny_needs_no_files():
    cfg = load("tiny")
    g = cfg.generator
    assert (g.size, g.style_dim, g.n_mlp, g.channel_max, n_latent(cfg)) == (64, 64, 2, 32, 10)
    assert (cfg.encoder.backbone, cfg.encoder.input_size) == ("ir_se_tiny", [64, 64])
    assert (cfg.loss.lpips_pretrained, cfg.loss.id_network) == (False, "none")
    assert (cfg.train.max_steps, cfg.train.checkpoint_every, cfg.data.batch_size) == (20, 5, 4)
    paths = [g.checkpoint, cfg.encoder.pretrained, cfg.loss.id_weights, cfg.contrastive.checkpoint,
             cfg.contrastive.official_image, cfg.contrastive.official_latent]
    assert paths == [None] * 6 and cfg.directions == {}


def test_backbone_widths_match_the_model_table():
    from clcae.models.irse import BACKBONES

    assert {name: spec.depths[-1] for name, spec in BACKBONES.items()} == BACKBONE_WIDTHS


def test_n_latent():
    assert [n_latent(load("tiny", f"generator.size={s}")) for s in (32, 64, 256)] == [8, 10, 14]
    assert n_latent(CLCAEConfig().generator) == 18


# ---------------------------------------------------------------------------------------------------
# Overrides


def test_overrides_change_values():
    cfg = load("ffhq", "loss.lpips=0.5", "encoder.input_size=[128,128]", "generator.size=256",
               "train.use_gpu=false")
    assert cfg.loss.lpips == 0.5 and isinstance(cfg.loss.lpips, float)
    assert cfg.encoder.input_size == [128, 128]
    assert cfg.generator.size == 256 and n_latent(cfg) == 14
    assert cfg.train.use_gpu is False
    assert cfg.loss.l2 == 1.0  # untouched values stay


def test_override_adds_a_direction():
    cfg = load("tiny", "directions.up.kind=interfacegan", "directions.up.path=s3://bucket/up.pt")
    assert cfg.directions == {"up": DirectionConfig("interfacegan", "s3://bucket/up.pt")}


@pytest.mark.parametrize("clear", ["directions={}", "directions=null"])
def test_override_empties_the_directions(clear):
    """A machine without the direction files can still serve inversions: before, both overrides were merged into
    the config's directions and changed nothing, silently."""
    assert load("ffhq", clear).directions == {}
    mine = load("ffhq", clear, "directions.up.kind=interfacegan", "directions.up.path=up.pt")
    assert list(mine.directions) == ["up"]


def test_override_leaves_one_direction_out():
    full = load("ffhq").directions
    cfg = load("ffhq", "directions.smile=null", "directions.eyes=null")
    assert "smile" in full and "eyes" in full
    assert cfg.directions == {k: v for k, v in full.items() if k not in ("smile", "eyes")}
    assert load("ffhq", "train.resources_per_worker={}").directions == full


@pytest.mark.parametrize("clear", ["directions={}", "directions=null"])
def test_a_trained_models_overrides_empty_the_directions_too(clear):
    """--model runs through inference_config, the merge every front door uses for a trained model."""
    job = load("ffhq")
    model = {k: v for k, v in to_dict(job).items() if k in ("generator", "encoder", "model")}
    assert inference_config(model, job).directions == job.directions
    assert inference_config(model, job, [clear]).directions == {}
    assert "smile" not in inference_config(model, job, ["directions.smile=null"]).directions


def test_leaving_out_an_unknown_direction_names_the_ones_there():
    with pytest.raises(ConfigError, match=r"no directions.smiel to leave out \(entries: smile, age, pose"):
        load("ffhq", "directions.smiel=null")


def test_a_section_of_settings_cannot_be_set_to_null():
    with pytest.raises(ConfigError, match=r"serve = null .*a section of settings.*set its keys instead"):
        load("tiny", "serve=null")


def test_a_derived_file_can_drop_its_base_directions(tmp_path):
    (tmp_path / "none.yaml").write_text(f"base: {CONFIGS / 'ffhq.yaml'}\ndirections: {{}}\n")
    (tmp_path / "some.yaml").write_text(f"base: {CONFIGS / 'ffhq.yaml'}\ndirections:\n  smile: null\n")
    assert load_config(tmp_path / "none.yaml").directions == {}
    assert "smile" not in load_config(tmp_path / "some.yaml").directions
    assert "age" in load_config(tmp_path / "some.yaml").directions


def test_later_override_wins():
    assert load("tiny", "seed=1", "seed=2").seed == 2


@pytest.mark.parametrize(
    ("override", "key", "suggestion"),
    [
        ("loss.lpips_wieght=0.5", "loss.lpips_wieght", "loss.lpips"),
        ("loss.id_lambda=0.1", "loss.id_lambda", "loss.id"),
        ("los.lpips=0.5", "los", "loss"),
        ("train.batch_size=2", "train.batch_size", "data.batch_size"),
        ("directions.smile.compnent=3", "directions.smile.compnent", "directions.smile.component"),
    ],
)
def test_unknown_override_key_names_it_and_suggests(override, key, suggestion):
    with pytest.raises(ConfigError) as err:
        load("ffhq", override)
    msg = str(err.value)
    assert f"unknown key {key} " in msg
    assert f"did you mean '{suggestion}'" in msg
    assert repr(override) in msg  # where it came from
    assert err.value.keys == (key,)


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("train.max_steps=abc", "train.max_steps", "expected int, got str"),
        ("encoder.input_size=[a,128]", "encoder.input_size[0]", "expected int, got str"),
        ("encoder.input_size=128", "encoder.input_size", "expected a list of int, got int"),
        ("loss.lpips=null", "loss.lpips", "expected float, got null"),
        ("generator=3", "generator", "expected a mapping"),
    ],
)
def test_wrong_type_names_key_value_and_type(override, key, expected):
    with pytest.raises(ConfigError) as err:
        load("ffhq", override)
    msg = str(err.value)
    assert msg.startswith(f"{key} = ") and expected in msg
    assert override.split("=", 1)[1].strip("[]").split(",")[0] in msg  # the offending value


@pytest.mark.parametrize(
    ("config", "override", "key", "why"),
    [
        ("ffhq", "generator.size=300", "generator.size", "power of two"),
        ("ffhq", "generator.size=16", "generator.size", "32..1024"),
        ("ffhq", "encoder.input_size=[100,100]", "encoder.input_size", "divisible by 16"),
        ("ffhq", "encoder.input_size=[48,48]", "encoder.input_size", ">= 64"),
        ("ffhq", "encoder.input_size=[96,96]", "encoder.input_size", "power of two"),
        ("ffhq", "encoder.input_size=[192,256]", "encoder.input_size", "generator.crop"),
        ("cars", "encoder.input_size=[128,128]", "encoder.input_size", "aspect"),
        ("ffhq", "model.attention_heads=3", "generator.style_dim", "model.attention_heads"),
        ("ffhq", "contrastive.heads=5", "generator.style_dim", "contrastive.heads"),
        ("tiny", "generator.style_dim=128", "encoder.backbone", "pyramid width 64"),
        ("tiny", "generator.crop=[0,100,0,64]", "generator.crop", "bottom <= 64"),
        ("ffhq", "encoder.backbone=resnet50", "encoder.backbone", "ir_se50"),
        ("ffhq", "loss.lpips=-0.1", "loss.lpips", ">= 0"),
        ("ffhq", "loss.id_network=vgg", "loss.id_network", "arcface, moco, none"),
        ("ffhq", "contrastive.optimizer=sgd", "contrastive.optimizer", "adam, ranger"),
        ("ffhq", "model.attention_tokens=0", "model.attention_tokens", ">= 1"),
        ("tiny", "model.variant=restyle", "model.variant", "clcae, psp, e4e"),
        ("tiny", "model.variant=psp", "model.use_align", "set model.use_align=false"),
        ("tiny", "loss.delta_reg=-1", "loss.delta_reg", ">= 0"),
        ("ffhq", "model.attention_dropout=1.0", "model.attention_dropout", "[0, 1)"),
        ("ffhq", "train.num_workers=0", "train.num_workers", ">= 1"),
        ("ffhq", "device=gpu", "device", "cuda"),
        ("ffhq", "directions.eyes.component=null", "directions.eyes.component", "GANSpace"),
        ("ffhq", "directions.eyes.layers=[7]", "directions.eyes.layers", "[start, end)"),
        ("ffhq", "directions.eyes.layers=[7,19]", "directions.eyes.layers", "<= 18"),
        ("ffhq", "directions.smile.kind=sefa", "directions.smile.kind", "interfacegan, ganspace"),
    ],
)
def test_bad_value_names_key(config, override, key, why):
    with pytest.raises(ConfigError) as err:
        load(config, override)
    lines = [line.strip() for line in str(err.value).splitlines()]
    assert any(line.startswith(f"{key} = ") and why in line for line in lines), str(err.value)
    assert key in err.value.keys


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load("tiny", "seed=-1", "loss.l2=-1", "train.max_steps=0")
    assert err.value.keys == ("seed", "loss.l2", "train.max_steps")


@pytest.mark.parametrize(
    ("override", "text"),
    [
        ("loss.lpips", "is not of the form key=value"),
        ("=0.5", "is not a dotted key"),
        ("--loss.lpips=0.5", "drop the leading dashes"),
        ("loss.lpips=[0.5", "cannot parse the value"),
    ],
)
def test_malformed_override(override, text):
    with pytest.raises(ConfigError, match=text) as err:
        load("tiny", override)
    assert repr(override) in str(err.value)


def test_overrides_as_one_string_is_refused():
    with pytest.raises(ConfigError, match="list of 'key=value' strings"):
        load_config(CONFIGS / "tiny.yaml", "loss.lpips=0.5")


# ---------------------------------------------------------------------------------------------------
# Files and inheritance


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("loss:\n  lpips_wieght: 0.5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "unknown key loss.lpips_wieght = 0.5" in msg and str(path) in msg
    assert "did you mean 'loss.lpips'" in msg


def test_wrong_type_in_file_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_steps: lots\n")
    with pytest.raises(ConfigError, match=r"train.max_steps = 'lots' \(.*bad.yaml\): expected int"):
        load_config(path)


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"config file not found: {path}"):
        load_config(path)


@pytest.mark.parametrize(("text", "why"), [("a: [1\n", "cannot read"), ("- 1\n- 2\n", "must hold a mapping")])
def test_unreadable_file(tmp_path, text, why):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=why):
        load_config(path)


def test_empty_section_is_ignored(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text(f"base: {CONFIGS / 'tiny.yaml'}\ndirections:\n  # none yet\nloss:\n")
    assert load_config(path) == load("tiny")


def test_base_inheritance(tmp_path):
    (tmp_path / "parent.yaml").write_text("name: parent\nloss:\n  lpips: 0.7\n  id: 0.3\n")
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("base: ../parent.yaml\nname: child\nloss:\n  id: 0.0\n")
    cfg = load_config(child, ["loss.l2=2.0"])
    assert (cfg.name, cfg.loss.lpips, cfg.loss.id, cfg.loss.l2) == ("child", 0.7, 0.0, 2.0)
    assert cfg.generator == CLCAEConfig().generator


def test_base_can_be_a_shipped_config(tmp_path):
    path = tmp_path / "tiny_long.yaml"
    path.write_text(f"base: {CONFIGS / 'tiny.yaml'}\ntrain:\n  max_steps: 100\n")
    assert load_config(path) == load("tiny", "train.max_steps=100")


def test_base_cycle_and_missing_base(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"config file not found: .*gone.yaml \(the base of .*c.yaml\)"):
        load_config(tmp_path / "c.yaml")


# ---------------------------------------------------------------------------------------------------
# Round trips (configs are stored in checkpoints)


@pytest.mark.parametrize("name", ["ffhq", "cars", "tiny"])
def test_dict_round_trip_through_a_checkpoint(name):
    cfg = load(name, "loss.lpips=0.25")
    buf = io.BytesIO()
    torch.save({"config": to_dict(cfg)}, buf)
    buf.seek(0)
    stored = torch.load(buf, weights_only=True)["config"]
    assert from_dict(stored) == cfg


@pytest.mark.parametrize("name", ["ffhq", "cars", "tiny"])
def test_yaml_round_trip(tmp_path, name):
    cfg = load(name)
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


def test_from_dict_checks_keys_and_values():
    d = to_dict(load("tiny"))
    d["loss"]["lpips_wieght"] = 1.0
    with pytest.raises(ConfigError, match="unknown key loss.lpips_wieght"):
        from_dict(d)
    d = to_dict(load("tiny"))
    d["generator"]["size"] = 48
    with pytest.raises(ConfigError, match="generator.size = 48"):
        from_dict(d)


def test_validate_rejects_hand_built_config_with_wrong_type():
    cfg = CLCAEConfig(loss=LossConfig(lpips="high"))
    with pytest.raises(ConfigError, match="loss.lpips"):
        validate(cfg)


def test_baseline_variants_load_without_l_align():
    cfg = load("tiny", "model.variant=e4e", "model.use_align=false", "loss.delta_reg=0.01")
    assert (cfg.model.variant, cfg.loss.delta_reg) == ("e4e", 0.01)
    assert load("tiny").model.variant == "clcae" and load("tiny").loss.delta_reg == 0.0
    assert load("tiny", "model.variant=psp", "loss.align=0").model.variant == "psp"  # L_align off by weight


def test_direction_mode_and_preset_strength_are_in_the_schema():
    """The README's GANSpace ``mode="target"`` (the authors' get_delta) is a config key, checked per kind."""
    cfg = load_config(CONFIGS / "ffhq.yaml", ["directions.eyes.mode=target", "directions.eyes.strength=20"])
    assert cfg.directions["eyes"].mode == "target" and cfg.directions["eyes"].strength == 20
    with pytest.raises(ConfigError, match="directions.eyes.mode"):
        load_config(CONFIGS / "ffhq.yaml", ["directions.eyes.mode=absolute"])
    with pytest.raises(ConfigError, match="directions.smile.mode.*only GANSpace"):
        load_config(CONFIGS / "ffhq.yaml", ["directions.smile.mode=target"])
