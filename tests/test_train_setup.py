"""Training set-up without a Ray cluster: paths the user typed are resolved in the driver, and building the
models leaves the caller's random stream alone (so each Ray Train rank keeps its own)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from clcae.config import DirectionConfig, load_config
from clcae.factory import build_clcae, build_encoder, build_generator
from clcae.models.stylegan2 import Generator

ROOT = Path(__file__).resolve().parents[1]


def tiny(*overrides: str):
    return load_config(ROOT / "configs" / "tiny.yaml", list(overrides))


def test_every_user_path_is_made_absolute_where_it_was_typed(tmp_path, monkeypatch):
    from clcae.train.preflight import resolve_paths

    monkeypatch.chdir(tmp_path)
    cfg = tiny("contrastive.checkpoint=runs/tiny-s1", "data.train=[shards/train,s3://bucket/train]",
               "data.pairs=[shards/pairs]", "data.test=[file://shards/test]", "train.storage_path=runs",
               "generator.checkpoint=pretrained/g.pt", "encoder.pretrained=pretrained/irse.pth",
               "loss.id_weights=pretrained/id.pth")
    # the authors' stage-1 pair replaces contrastive.checkpoint (the config refuses both): set on the object
    cfg.contrastive.official_image, cfg.contrastive.official_latent = "img.pt", "s3://bucket/lat.pt"
    cfg.directions = {"smile": DirectionConfig(kind="interfacegan", path="editing/smile.pt")}
    out = resolve_paths(cfg)
    here = str(tmp_path.resolve())
    assert out.contrastive.checkpoint == f"{here}/runs/tiny-s1"
    assert out.data.train == [f"{here}/shards/train", "s3://bucket/train"]  # remote URIs are left alone
    assert out.data.pairs == [f"{here}/shards/pairs"]
    assert out.data.test == [f"file://{here}/shards/test"]
    assert out.train.storage_path == f"{here}/runs"
    assert out.generator.checkpoint == f"{here}/pretrained/g.pt"
    assert out.encoder.pretrained == f"{here}/pretrained/irse.pth"
    assert out.loss.id_weights == f"{here}/pretrained/id.pth"
    assert out.contrastive.official_image == f"{here}/img.pt"
    assert out.contrastive.official_latent == "s3://bucket/lat.pt"
    assert out.directions["smile"].path == f"{here}/editing/smile.pt"
    assert cfg.contrastive.checkpoint == "runs/tiny-s1"  # the caller's config is not modified
    os.chdir("/")  # what a Ray worker does (RAY_CHDIR_TO_TRIAL_DIR): the resolved paths still hold
    assert resolve_paths(out) == out


def test_building_models_leaves_the_global_rng_alone_and_builds_the_same_weights():
    cfg = tiny()
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    generator, latent_avg = build_generator(cfg)
    model = build_clcae(cfg, generator, latent_avg)
    assert torch.equal(torch.get_rng_state(), before), "model construction moved the caller's random stream"
    built_alone = build_clcae(cfg)  # the generator built inside: the same weights again
    assert torch.equal(torch.get_rng_state(), before)

    # The weights are the ones the factory built before it stopped reseeding the global generator: G from
    # generator.init_seed, the encoder from cfg.seed.
    g = cfg.generator
    torch.manual_seed(g.init_seed)
    old_g = Generator(g.size, g.style_dim, g.n_mlp, g.channel_multiplier, lr_mlp=g.lr_mlp, channel_max=g.channel_max)
    torch.manual_seed(cfg.seed)
    old_encoder = build_encoder(cfg, old_g.feature_channels)
    for built in (model, built_alone):
        for name, value in old_g.state_dict().items():
            assert torch.equal(built.decoder.state_dict()[name], value), name
        for name, value in old_encoder.state_dict().items():
            assert torch.equal(built.encoder.state_dict()[name], value), name
    assert torch.equal(latent_avg, old_g.mean_latent(min(g.mean_latent_samples, 10_000), seed=g.init_seed)[0])


def test_building_a_stage_leaves_each_rank_its_own_stream_and_the_same_modules():
    from clcae.train.loop import build_stage

    cfg = tiny("model.use_align=false")
    draws, weights = [], []
    for rank in (0, 1):
        torch.manual_seed(cfg.seed + rank)  # what the loop does on each rank
        step = build_stage(cfg, "inversion", None, resuming=False)
        draws.append(torch.rand(4))
        weights.append({k: v.clone() for k, v in step.model.state_dict().items()}
                       | {f"criterion.{k}": v.clone() for k, v in step.criterion.state_dict().items()})
    assert not torch.equal(draws[0], draws[1]), "both ranks draw the same random numbers after building"
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:  # every rank builds identical modules (random LPIPS trunks included)
        assert torch.equal(weights[0][name], weights[1][name]), name


def test_event_log_on_object_storage_uploads_each_file_once_and_purges_after_a_resume(tmp_path):
    """Object storage (fsspec's memory:// stands in for s3://): events are written locally, uploaded whole at
    each forced sync, and a resumed run hides what the failed attempt logged past its checkpoint."""
    import fsspec
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from clcae.train.events import EventLog

    run = "memory://bucket/runs/tb-unit"
    first = EventLog(run)
    for step in (1, 2, 3, 4):
        first.scalars({"loss": float(step)}, step)
        first.sync(force=step == 2)  # a checkpoint at step 2; steps 3-4 reach storage when the attempt closes
    first.image("samples", Image.new("RGB", (8, 4), "red"), 4)
    first.close()
    resumed = EventLog(run, resumed_step=2)  # the retry restarts from the step-2 checkpoint
    for step in (3, 4):
        resumed.scalars({"loss": 10.0 + step}, step)
    resumed.close()

    fs = fsspec.filesystem("memory")
    files = sorted(fs.ls("/bucket/runs/tb-unit/tensorboard", detail=False))
    assert len(files) == 3  # one per sync: nothing re-uploaded, no object rewritten
    for f in files:
        fs.get(f, str(tmp_path / f.rsplit("/", 1)[1]))
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0}).Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]
    assert acc.Images("samples") == []  # the failed attempt's step-4 image is purged with its scalars
