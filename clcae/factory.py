"""Build models and the direction registry from a config: the one place where config fields turn into module
arguments."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator

import torch

from clcae.config import CLCAEConfig, StorageConfig, n_latent
from clcae.data.images import InputError, decode_image, pil_to_tensor
from clcae.data.storage import filesystem
from clcae.editing import DirectionRegistry
from clcae.models.clcae import CLCAE
from clcae.models.contrastive import ContrastiveAligner, ImageEncoder, LatentEncoder
from clcae.models.encoder import CLCAEEncoder, PSPEncoder
from clcae.models.stylegan2 import FEATURE_RES, Generator, channel_table
from clcae.weights import MissingWeightsError, WeightsError, load_generator, load_irse_into_encoder

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Draw from ``seed`` inside, then give the caller back its own random stream untouched.

    Weights come out as ``torch.manual_seed(seed)`` made them (CPU init draws from the default generator), but
    the caller's stream is not reset: a Ray Train rank that seeded ``seed + rank`` keeps its own stream.
    Only the CPU generator is seeded and restored; modules are built on the CPU, and seeding CUDA here would
    reset every rank's device stream too.
    """
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


def build_generator(cfg: CLCAEConfig, load: bool = True) -> tuple[Generator, torch.Tensor]:
    """The frozen generator and latent_avg (D,): from ``generator.checkpoint`` or a seeded random init."""
    g = cfg.generator
    if load and g.checkpoint:
        with _seeded(g.init_seed):  # the noise maps an old file lacks are drawn at init: seeded, not the caller's
            return load_generator(g.checkpoint, cfg)
    with _seeded(g.init_seed):
        gen = Generator(g.size, g.style_dim, g.n_mlp, g.channel_multiplier, lr_mlp=g.lr_mlp,
                        channel_max=g.channel_max).eval()
    if load:
        log.info("generator: seeded random init (seed %d); set generator.checkpoint for real weights", g.init_seed)
    return gen, gen.mean_latent(min(g.mean_latent_samples, 10_000), seed=g.init_seed)[0]


def build_encoder(cfg: CLCAEConfig, feature_channels: int) -> CLCAEEncoder | PSPEncoder:
    """The encoder of ``model.variant``: CLCAE (the paper), or the pSp / e4e baselines of the fidelity study."""
    m = cfg.model
    common = dict(backbone=cfg.encoder.backbone, input_size=tuple(cfg.encoder.input_size),
                  style_dim=cfg.generator.style_dim, n_latent=n_latent(cfg))
    if m.variant == "psp":
        return PSPEncoder(**common)
    if m.variant == "e4e":  # w + per-layer deltas: CLCAE's encoder without W+ attention and without f
        return CLCAEEncoder(**common, feature_channels=feature_channels, w_attention=False, f_attention=False,
                            feature=False)
    return CLCAEEncoder(
        **common, feature_channels=feature_channels, w_attention=m.w_attention, f_attention=m.f_attention,
        heads=m.attention_heads, ffn=m.attention_ffn, dropout=m.attention_dropout, tokens=m.attention_tokens,
        feature=m.feature,
    )


def build_clcae(cfg: CLCAEConfig, generator: Generator | None = None, latent_avg: torch.Tensor | None = None,
                load_pretrained: bool = True, average_image: bool = True) -> CLCAE:
    """The inversion network with its generator; the encoder body from ``encoder.pretrained`` if set.

    ``average_image``: set x_avg now (``model.average_image`` or G(latent_avg)); loaders that replace the
    generator's weights afterwards pass False and set it once the weights are in (clcae.pretrained)."""
    if generator is None:
        generator, latent_avg = build_generator(cfg, load=load_pretrained)
    # The encoder's random init follows cfg.seed, the same in every process that builds from this config,
    # without resetting the caller's stream.
    with _seeded(cfg.seed):
        encoder = build_encoder(cfg, generator.feature_channels)
    if load_pretrained and cfg.encoder.pretrained:
        load_irse_into_encoder(cfg.encoder.pretrained, encoder)
    crop = tuple(cfg.generator.crop) if cfg.generator.crop else None
    model = CLCAE(encoder, generator, latent_avg, crop=crop, center_input=cfg.model.center_input)
    if average_image:
        set_average_image(model, cfg)
    return model


def build_aligner(cfg: CLCAEConfig, image_avg: torch.Tensor | None = None,
                  latent_avg: torch.Tensor | None = None) -> ContrastiveAligner:
    c, d = cfg.contrastive, cfg.generator.style_dim
    image = ImageEncoder(cfg.encoder.backbone, tuple(cfg.encoder.input_size), d, c.projection_dim)
    latent = LatentEncoder(d, c.layers, c.heads, c.ffn, c.dropout, c.projection_dim)
    return ContrastiveAligner(image, latent, image_avg, latent_avg, c.init_temperature, c.max_logit_scale,
                              c.lambda_image)


def build_directions(cfg: CLCAEConfig) -> DirectionRegistry:
    """The ``directions`` section -> a registry (files are read when a direction is first used)."""
    spec = {name: {k: v for k, v in dataclasses.asdict(d).items() if v is not None}
            for name, d in cfg.directions.items()}
    return DirectionRegistry.from_config(spec, style_dim=cfg.generator.style_dim)


def set_average_image(model, cfg: CLCAEConfig, stored: torch.Tensor | None = None) -> None:
    """x_avg: the one stored with the weights, else ``model.average_image`` (a file), else G(latent_avg)."""
    if stored is None and cfg.model.average_image:
        stored = read_average_image(cfg.model.average_image, tuple(cfg.encoder.input_size), cfg.storage)
    model.set_average_image(None if stored is None else stored.float())


def read_average_image(uri: str, size: tuple[int, int], storage: StorageConfig | None = None) -> torch.Tensor:
    """The authors' ``image_avg.png`` (or any image) -> (1, 3, H, W) in [-1, 1] at the encoder's input size."""
    fs, path = filesystem(uri, storage)
    try:
        with fs.open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise MissingWeightsError(f"model.average_image = {uri}: file not found") from None
    try:
        return pil_to_tensor(decode_image(data), size)[None]
    except InputError as exc:
        raise WeightsError(f"model.average_image = {uri}: {exc}") from None


def latent_shapes(cfg: CLCAEConfig) -> dict[str, tuple[int, ...]]:
    """Per-image shapes of the latents a model of ``cfg`` gives (Serve's /v1/invert and /v1/edit, the batch job's
    table): w, w+, f (G5's output, FEATURE_RES x FEATURE_RES) and the encoder's residuals (like w+)."""
    g = cfg.generator
    channels = channel_table(g.channel_multiplier, g.channel_max)[FEATURE_RES]
    w_plus = (n_latent(cfg), g.style_dim)
    return {"w": (g.style_dim,), "w_plus": w_plus, "f": (channels, FEATURE_RES, FEATURE_RES), "deltas": w_plus}
