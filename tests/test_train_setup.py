"""Training set-up without a Ray cluster: paths the user typed are resolved in the driver, and building the
models leaves the caller's random stream alone (so each Ray Train rank keeps its own)."""

from __future__ import annotations

from pathlib import Path

import torch

from clcae.config import load_config
from clcae.factory import build_clcae, build_encoder, build_generator
from clcae.models.stylegan2 import Generator

ROOT = Path(__file__).resolve().parents[1]


def tiny(*overrides: str):
    return load_config(ROOT / "configs" / "tiny.yaml", list(overrides))


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
