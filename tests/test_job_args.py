"""The jobs' command lines as users type them (issue 12, items 14, 16, 18): defaults that work from any folder,
overrides that are never swallowed by a list option, directions given on the command line, and paths resolved
where the user typed them before any Ray worker (which may run in another folder) opens them.

No Ray cluster is started: the Ray-facing calls of the jobs are replaced by ones that record their arguments.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from clcae.config import load_config, to_dict
from clcae.editing import GANSpacePCA, save_ganspace, save_interfacegan
from clcae.factory import build_directions

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def script(path: str) -> ModuleType:
    """Import a job or bench script as a module (without running it)."""
    name = "script_" + re.sub(r"\W", "_", path)
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------- 14a: --config default
# (script, the arguments it needs besides --config)
DEFAULT_CONFIG_SCRIPTS = [
    ("jobs/invert.py", ["--input", "in", "--output", "out"]),
    ("jobs/synthesize.py", ["out"]),
    ("bench/batch.py", []),
    ("bench/serve_load.py", []),
    ("bench/export.py", []),
    ("bench/inference.py", []),
]


@pytest.mark.parametrize("path,argv", DEFAULT_CONFIG_SCRIPTS, ids=[p for p, _ in DEFAULT_CONFIG_SCRIPTS])
def test_config_default_works_from_another_folder(path, argv, monkeypatch, tmp_path):
    module = script(path)
    monkeypatch.chdir(tmp_path)
    args = module.parse_args(argv)
    assert Path(args.config).is_file(), f"{path}: default --config {args.config} not found from {tmp_path}"
    load_config(args.config)


def test_a_shipped_config_named_relative_to_the_repository_is_found_from_another_folder(monkeypatch, tmp_path):
    from clcae.cli_args import config_file

    monkeypatch.chdir(tmp_path)
    assert Path(config_file("configs/ffhq.yaml")) == ROOT / "configs" / "ffhq.yaml"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "ffhq.yaml").write_text("name: mine\n")  # the user's own file wins
    assert Path(config_file("configs/ffhq.yaml")).resolve() == (tmp_path / "configs" / "ffhq.yaml").resolve()


def test_load_config_finds_shipped_configs_from_another_folder(monkeypatch, tmp_path):
    """The entry points that pass --config on as typed (jobs/train.py, serve/app.py, make_shards) keep working from
    another folder: their default "configs/tiny.yaml" and the README's "configs/ffhq.yaml" are the shipped files."""
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/ffhq.yaml").name == "ffhq"
    ns, stage, _ = script("jobs/train.py").parse(["stage=contrastive", "--run-name", "x"])
    assert load_config(ns.config).name == "tiny"
    from clcae.config import ConfigError

    with pytest.raises(ConfigError, match="config file not found: configs/nope.yaml"):
        load_config("configs/nope.yaml")


class Recorded(Exception):
    """Raised by a stand-in for a Ray-facing call once it has recorded its arguments."""


def test_invert_job_runs_from_another_folder_with_its_default_config(monkeypatch, tmp_path):
    invert = script("jobs/invert.py")
    calls = {}

    def fake_invert_to_table(cfg, inputs, out, source=None, edits=None):
        calls.update(cfg=cfg, inputs=inputs, out=out, source=source)
        return {"inputs": 1, "skipped": 0, "written": 1, "errors": 0, "output": out}

    monkeypatch.setattr(invert, "invert_to_table", fake_invert_to_table)
    monkeypatch.setattr(invert, "init_ray", lambda *a, **k: None)
    monkeypatch.chdir(tmp_path)
    assert invert.main(["--input", "in", "--output", "out"]) == 0
    assert calls["cfg"].name == "tiny"


# ------------------------------------------------------------------------------------------- 14b: GANSpace default
def test_ganspace_default_components_fit_the_tiny_generator(tmp_path, capsys):
    directions = script("jobs/directions.py")
    base = ["ganspace", "--config", str(TINY), "--samples", "300", "--batch", "300"]
    assert directions.main([*base, "--out", str(tmp_path / "pca.pt")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["components"] == 64 == summary["style_dim"]  # min(80, style_dim)
    assert torch.load(tmp_path / "pca.pt", weights_only=True)["comp"].shape[0] == 64

    assert directions.main([*base, "--components", "100", "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert "100 components" in err and "at most 64" in err and "style_dim" in err
    assert not (tmp_path / "x.pt").exists()


# ------------------------------------------------------------------------------------------- 16: your own directions
def readme_direction_overrides() -> list[list[str]]:
    """The `directions.*` overrides of each command in README.md's "Your own directions" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Your own directions", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert blocks, "README.md: no bash block in 'Your own directions'"
    commands = [shlex.split(line, comments=True) for line in blocks[0].replace("\\\n", " ").splitlines()]
    return [[t for t in argv if t.startswith("directions.")] for argv in commands if argv]


def make_direction_files(folder: Path, overrides: list[str], style_dim: int) -> None:
    """Write, under ``folder``, the direction files the overrides name (of the kind they say)."""
    cfg = load_config(TINY, overrides)
    for d in cfg.directions.values():
        path = folder / d.path
        path.parent.mkdir(parents=True, exist_ok=True)
        if d.kind == "interfacegan":
            save_interfacegan(torch.randn(1, style_dim), path)
        else:
            k = d.component + 1
            comp = torch.linalg.qr(torch.randn(style_dim, k))[0].T
            save_ganspace(GANSpacePCA(mean=torch.zeros(style_dim), comp=comp, std=torch.ones(k)), path)


def test_readme_direction_overrides_parse_and_load(monkeypatch, tmp_path):
    commands = readme_direction_overrides()
    assert len(commands) == 3 and all(commands)  # Serve, evaluate, invert
    monkeypatch.chdir(tmp_path)
    for overrides in commands:
        make_direction_files(tmp_path, overrides, style_dim=64)
        cfg = load_config(TINY, overrides)
        registry = build_directions(cfg)
        assert registry.names() and set(registry.names()) == set(cfg.directions)


def test_readme_direction_commands_reach_each_front_door(monkeypatch):
    """The README's Serve / evaluate / invert lines, parsed by their own scripts: the overrides arrive intact."""
    text = (ROOT / "README.md").read_text().split("## Your own directions", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```bash\n(.*?)```", text, re.S)[0].replace("\\\n", " ")
    for line in block.splitlines():
        argv = shlex.split(line, comments=True)
        if not argv:
            continue
        expected = [t for t in argv if t.startswith("directions.")]
        if argv[1] == "serve/app.py":
            continue  # serve/app.py has no parse function to call; tests/test_docs.py parses it
        args = script(argv[1]).parse_args(argv[2:])
        assert args.overrides == expected, line


def test_invert_resolves_every_path_in_the_driver(monkeypatch, tmp_path):
    """Relative inputs, output, model and direction files become absolute before a Ray worker (which may run in
    another folder) sees them; the files then load from anywhere."""
    from clcae.checkpoints import save_checkpoint
    from clcae.factory import build_clcae

    invert = script("jobs/invert.py")
    work = tmp_path / "work"
    (work / "faces").mkdir(parents=True)
    cfg = load_config(TINY)
    save_checkpoint(work / "model.pt", "inversion", build_clcae(cfg, load_pretrained=False), to_dict(cfg),
                    model_id="tiny@0")
    overrides = readme_direction_overrides()[2]  # the README's invert line
    make_direction_files(work, overrides, style_dim=64)
    calls = {}

    def fake_invert_to_table(cfg, inputs, out, source=None, edits=None):
        calls.update(cfg=cfg, inputs=inputs, out=out, source=source)
        raise Recorded

    monkeypatch.setattr(invert, "invert_to_table", fake_invert_to_table)
    monkeypatch.setattr(invert, "init_ray", lambda *a, **k: None)
    monkeypatch.chdir(work)
    invert.main(["--model", "model.pt", "--config", str(TINY), "--input", "faces", "--output", "out", *overrides])
    assert calls["inputs"] == [str(work / "faces")]
    assert calls["out"] == str(work / "out")
    assert calls["source"].uri == str(work / "model.pt")
    paths = [d.path for d in calls["cfg"].directions.values()]
    assert paths and all(Path(p).is_absolute() and Path(p).is_file() for p in paths)

    monkeypatch.chdir(tmp_path)  # a worker elsewhere
    assert build_directions(calls["cfg"]).names() == sorted(calls["cfg"].directions)


def test_invert_refuses_a_missing_direction_file_before_starting(monkeypatch, tmp_path, capsys):
    invert = script("jobs/invert.py")
    monkeypatch.setattr(invert, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    monkeypatch.chdir(tmp_path)
    args = ["--input", "in", "--output", "out", "directions.x.kind=interfacegan", "directions.x.path=nowhere/x.pt"]
    code = invert.main([*args, "--edit", "x=1.0"])
    assert code == 2
    assert "nowhere/x.pt" in capsys.readouterr().err
    # without --edit the job needs no direction file (e.g. configs/ffhq.yaml without the e4e files): it starts

    class Started(BaseException):  # not an Exception: the jobs' error handling (cli_args.job) lets it through
        pass

    def started(*a, **k):
        raise Started

    monkeypatch.setattr(invert, "init_ray", started)
    with pytest.raises(Started):
        invert.main(args)


def test_synthesize_resolves_its_output_and_model_files_in_the_driver(monkeypatch, tmp_path):
    synthesize = script("jobs/synthesize.py")
    calls = {}

    def fake_synthesize(cfg, out, *args):
        calls.update(cfg=cfg, out=out)
        return {}

    monkeypatch.setattr(synthesize, "synthesize", fake_synthesize)
    monkeypatch.setattr(synthesize, "init_ray", lambda *a, **k: None)
    monkeypatch.chdir(tmp_path)
    assert synthesize.main(["pairs", "generator.checkpoint=g/stylegan2.pt"]) == 0
    assert calls["out"] == str(tmp_path / "pairs")
    assert calls["cfg"].generator.checkpoint == str(tmp_path / "g" / "stylegan2.pt")
    assert synthesize.main(["s3://bucket/pairs"]) == 0
    assert calls["out"] == "s3://bucket/pairs"  # URIs are left alone


def test_absolute_leaves_uris_alone(monkeypatch, tmp_path):
    from clcae.data.storage import absolute

    monkeypatch.chdir(tmp_path)
    assert absolute("a/b.pt") == str(tmp_path / "a" / "b.pt")
    assert absolute("file://a/b.pt") == f"file://{tmp_path / 'a' / 'b.pt'}"
    assert absolute("~/x") == str(Path.home() / "x")
    for uri in ("s3://b/k", "gs://b/k", "file:///abs/x", "/abs/x", "memory://x"):
        assert absolute(uri) == uri
    assert absolute(None) is None


# ------------------------------------------------------------------------------------------- 18: overrides vs lists
def test_a_list_option_does_not_swallow_an_override():
    batch = script("bench/batch.py")
    args = batch.parse_args(["--images", "2048", "--batch", "16", "--actors", "1", "encoder.input_size=[128,128]"])
    assert args.actors == [1] and args.overrides == ["encoder.input_size=[128,128]"]
    args = batch.parse_args(["--actors", "1", "2", "loss.l2=2", "--images", "8", "infer.actors=2"])
    assert args.actors == [1, 2] and args.images == 8 and args.overrides == ["loss.l2=2", "infer.actors=2"]

    invert = script("jobs/invert.py")
    args = invert.parse_args(["--input", "a", "b", "infer.actors=8", "--output", "o"])
    assert args.input == ["a", "b"] and args.overrides == ["infer.actors=8"]
    args = invert.parse_args(["--input", "s3://b/year=2020", "--output", "o"])  # a URI with '=' stays an input
    assert args.input == ["s3://b/year=2020"] and args.overrides == []

    fidelity = script("bench/fidelity.py")
    args = fidelity.parse_args(["--seeds", "0", "1", "loss.l2=2", "--runs", "psp", "clcae", "model.x=1"])
    assert args.seeds == [0, 1] and args.runs == ["psp", "clcae"] and args.overrides == ["loss.l2=2", "model.x=1"]

    evaluate = script("jobs/evaluate.py")  # an option whose value is NAME=VALUE keeps it
    args = evaluate.parse_args(["--input", "i", "loss.l2=2", "--out", "o", "--edit", "smile=2.0", "infer.actors=1"])
    assert args.edit == ["smile=2.0"] and args.overrides == ["loss.l2=2", "infer.actors=1"]

    inference = script("bench/inference.py")  # --set takes KEY=VALUE items
    assert inference.parse_args(["--set", "loss.l2=2", "loss.id=0"]).set == ["loss.l2=2", "loss.id=0"]

    directions = script("jobs/directions.py")
    args = directions.parse_args(["ganspace", "--config", "c.yaml", "--out", "o.pt", "loss.l2=2", "--seed", "1"])
    assert args.overrides == ["loss.l2=2"] and args.seed == 1
