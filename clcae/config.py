"""Structured configs for CLCAE: dataclasses checked by OmegaConf, loaded from YAML plus dotlist overrides.

    cfg = load_config("configs/ffhq.yaml", ["loss.lpips=0.5", "encoder.input_size=[128,128]"])

Defaults are the paper's FFHQ setup. A YAML file may start with ``base: other.yaml`` (relative to
itself) to inherit from another file. Every failure (unknown key, wrong type, bad value, missing
file, malformed override) is a :class:`ConfigError` whose message names the full dotted key.

The resolved config travels inside checkpoints as :func:`to_dict` (plain Python types, so it loads
with ``torch.load(..., weights_only=True)``) and comes back with :func:`from_dict`.
"""

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, Node, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException, ValidationError

from clcae.errors import CLCAEError

# Pyramid width (depth of the last backbone stage) of every encoder backbone; the FPN maps T1..T3 to this
# width and map2style reads it, so it must equal the style dimension. Mirrors clcae.models.irse.BACKBONES
# (kept here so that parsing a config does not import torch; tests check the two agree).
BACKBONE_WIDTHS: dict[str, int] = {
    "ir_se50": 512, "ir_se100": 512, "ir_se152": 512, "ir50": 512, "ir_se_tiny": 64,
}
ID_NETWORKS = ("arcface", "moco", "none")
LPIPS_NETS = ("alex", "vgg", "squeeze")
CONTRASTIVE_OPTIMIZERS = ("adam", "ranger")
DIRECTION_KINDS = ("interfacegan", "ganspace")
MODEL_VARIANTS = ("clcae", "psp", "e4e")
# Numeric precision of inference (infer.precision) and training (train.precision): fp32 = exact (the default);
# bf16/fp16 = torch.autocast with the sensitive parts in float32 (clcae.device says which).
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class GeneratorConfig:
    size: int = 1024
    style_dim: int = 512
    n_mlp: int = 8
    channel_multiplier: int = 2
    channel_max: int = 512  # cap on every layer's channels; the tiny config lowers it
    lr_mlp: float = 0.01
    checkpoint: str | None = None  # rosinality .pt (g_ema + latent_avg); a URI
    mean_latent_samples: int = 100_000  # z samples averaged when the checkpoint has no latent_avg
    init_seed: int = 0  # random init when there is no checkpoint
    # [top, bottom, left, right] in generator pixels, cut from every generator output before it is
    # resized to the input size. Cars: the 512x512 generator draws the car in rows 64:448.
    crop: list[int] | None = None


@dataclass
class EncoderConfig:
    backbone: str = "ir_se50"  # one of BACKBONE_WIDTHS
    input_size: list[int] = field(default_factory=lambda: [256, 256])  # (H, W)
    pretrained: str | None = None  # model_ir_se50.pth (TreB1eN) to initialise the backbone


@dataclass
class ModelConfig:
    # "clcae" = the paper. "psp" / "e4e" are the baseline encoders of the fidelity study (bench/fidelity.py):
    # pSp = one map2style block per w+ layer; e4e = w + per-layer deltas (loss.delta_reg regularises them).
    # Neither has attention, f or L_align: the attention switches and f_ramp_steps do not apply to them, and
    # use_align must be false.
    variant: str = "clcae"
    w_attention: bool = True
    f_attention: bool = True
    use_align: bool = True  # False = the paper's "w/o L_align" ablation
    attention_heads: int = 4
    attention_ffn: int = 1024
    attention_dropout: float = 0.1
    attention_tokens: int = 1  # 1 = the paper (softmax over one key is 1); >1 = non-degenerate variant
    f_ramp_steps: int = 10_000  # f blends in 0 -> 1 once over these steps, as FeatureStyleEncoder does
    feature: bool = True  # False = no F branch: outputs w and w+ only (the authors' --not_for_feature)
    # The encoder sees x - x_avg, as in the authors' AFPSP.forward. False = the raw image: the convention of
    # checkpoints written before this key existed (they load with False and keep their outputs).
    center_input: bool = True
    # x_avg: null = G(latent_avg) at the input size; or the authors' image_avg.png (resized to the input size)
    average_image: str | None = None


@dataclass
class ContrastiveConfig:
    layers: int = 3
    heads: int = 4
    ffn: int = 1024
    dropout: float = 0.1
    projection_dim: int = 512
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0  # clamp of exp(logit_scale), as open_clip does
    lambda_image: float = 0.5  # Eq. 3's lambda: weight of the image -> latent term
    checkpoint: str | None = None  # our stage-1 checkpoint
    official_image: str | None = None  # the authors' best_model_image.pt
    official_latent: str | None = None  # the authors' best_model_latent.pt
    lr: float = 1e-4
    optimizer: str = "adam"  # "adam" (paper, after CLIP) or "ranger" (authors' code)


@dataclass
class LossConfig:
    l2: float = 1.0
    lpips: float = 0.2
    lpips_net: str = "alex"
    lpips_pretrained: bool = True
    id: float = 0.1
    id_network: str = "arcface"  # "arcface" (faces), "moco" (cars) or "none" (the ID term is skipped)
    id_weights: str | None = None
    id_backbone: str = "ir_se50"
    feature_reg: float = 0.01
    align: float = 1.0
    # e4e's delta regulariser: sum over layers i >= 1 of ||w+_i - w+_0||_2, mean over the batch (0 = off)
    delta_reg: float = 0.0


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.95, 0.999])
    eps: float = 1e-5
    weight_decay: float = 0.0
    lookahead_k: int = 6
    lookahead_alpha: float = 0.5
    grad_clip: float | None = None


@dataclass
class DirectionConfig:
    kind: str  # "interfacegan" | "ganspace"
    path: str
    component: int | None = None  # GANSpace: PCA component index
    layers: list[int] | None = None  # [start, end): the w+ layers an edit touches (GANSpace: required)
    max_strength: float = 5.0
    # GANSpace only: "offset" (ours: strength 0 = unedited) or "target" (the authors' get_delta: the strength is
    # the coordinate to move to); strength = the preset strength the authors' scripts use
    mode: str | None = None
    strength: float | None = None


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    pairs: list[str] = field(default_factory=list)  # stage-1 synthetic (image, w) shards
    batch_size: int = 8  # per worker
    num_synthetic: int = 100_000
    hflip: bool = True


@dataclass
class TrainConfig:
    max_steps: int = 500_000
    checkpoint_every: int = 5000
    sample_every: int = 1000
    log_every: int = 50
    num_workers: int = 1
    # Elastic training (Ray Train's ScalingConfig(num_workers=(min, max))): with min_workers < num_workers a run
    # starts with as many workers as the cluster has room for (at most num_workers) and, when a node is lost,
    # restarts from the newest checkpoint with the workers that still fit (at least min_workers) instead of waiting
    # for the node. None: always num_workers workers (a lost node is waited for).
    min_workers: int | None = None
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # Other Ray resources each worker needs besides CPU/GPU, e.g. {train_slot: 1} where every training node offers
    # one train_slot (one worker per node), or an accelerator-type resource.
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    max_failures: int = 3  # Ray FailureConfig; -1 = retry forever
    storage_path: str = "./runs"
    keep_checkpoints: int = 3
    # Stage 2 only: start the encoder from a trained model (a registry name like clcae-ffhq, the authors' file,
    # our checkpoint or run directory, or an exported model) to fine-tune it, e.g. on a new domain.
    init_from: str | None = None
    # Autocast for both stages' steps (clcae.train.steps): fp32 | bf16 | fp16 (fp16 adds a GradScaler).
    precision: str = "fp32"


@dataclass
class InferConfig:
    """The bulk inversion job (jobs/invert.py) and the Inverter's batching."""

    batch_size: int = 16  # images per model call
    actors: int = 1  # inversion actors (one GPU each with use_gpu)
    use_gpu: bool = False
    cpus_per_actor: float = 1.0
    # Batches an actor inverts at once, each on its own thread with cpus_per_actor / concurrent_batches intra-op
    # threads. null: one per whole CPU on CPU actors (a batch of small images keeps one core busy better than two
    # share it: bench/results/batch_cpu.json), 1 on a GPU.
    concurrent_batches: int | None = None
    rows_per_file: int = 20_000  # latent-table rows per Parquet file (about 0.8 GB of w+ at 18x512)
    with_f: bool = False  # also store f (C x 16 x 16, float16): about 256 KB per row at C = 512
    psnr: bool = True  # store the reconstruction PSNR of G(w+, f) per row
    # Raw photos in: "faces" (FFHQ alignment, every face a row keyed <key>#face<i>) or "cars" (the official crop);
    # null = inputs are already aligned crops, resized to the input size.
    align: str | None = None
    largest_face_only: bool = False  # with align=faces: one row per photo, its largest face
    max_retries: int = 3  # retries of a task hit by a transient failure (out of memory, storage timeout)
    # The Inverter's arithmetic, hence Serve's and the batch job's: fp32 (exact) | bf16 | fp16 (torch.autocast;
    # bench/results/precision_cpu.md has the speed and PSNR of each).
    precision: str = "fp32"
    # torch.compile the Inverter's model (opt-in: the first calls of each batch shape pay the compilation).
    compile: bool = False


@dataclass
class ServeConfig:
    """Ray Serve app (serve/app.py): HTTP, batching, autoscaling and limits."""

    # The model to serve: a registry name (clcae-ffhq), the authors' file, our checkpoint or run directory, or an
    # exported model; None = the config's own model (random encoder: only for trying the service out).
    model: str | None = None
    host: str = "127.0.0.1"  # loopback unless an API key is set
    port: int = 8000
    api_key: str | None = None  # required in the X-API-Key header when set; else env CLCAE_API_KEY (serve_api_key)
    max_body_mb: float = 10.0  # larger uploads get 413
    request_timeout_s: float = 30.0
    max_batch_size: int = 8  # @serve.batch on the inversion deployment
    batch_wait_timeout_s: float = 0.02
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 8.0
    # Autoscaling of the model deployments (Ray Serve's AutoscalingConfig; these defaults are Ray's): Serve averages
    # the requests in flight per replica over look_back_period_s, as the ingress's handles report them every
    # metrics_interval_s, and adds replicas once it has wanted more for upscale_delay_s, removes them once it has
    # wanted fewer for downscale_delay_s.  README "Serve autoscaling" has a measured curve.
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    look_back_period_s: float = 30.0
    metrics_interval_s: float = 10.0
    # How often Serve checks each model replica; one that died (killed, node lost) is replaced after the next check
    health_check_period_s: float = 10.0
    max_ongoing_requests: int = 16  # per replica; >= max_batch_size so batches can fill
    max_queued_requests: int = 32  # per deployment; beyond it requests get 503 + Retry-After at once
    use_gpu: bool = False
    cpus_per_replica: float = 1.0
    # With use_gpu: the GPU share Ray reserves for each model replica (InvertModel, EditModel). 0.5: one GPU holds
    # one replica of each, so a one-GPU machine serves; 1: a GPU per replica (two GPUs before the first request).
    gpus_per_replica: float = 0.5
    max_strength: float = 10.0  # cap on |strength| on top of each direction's own max_strength
    # What `align=true` requests align to: "faces" (MTCNN + FFHQ alignment) or "cars" (the official 4:3 centre
    # crop); None follows the model: cars when generator.crop is set (only car models crop), else faces.
    align_domain: str | None = None


API_KEY_ENV = "CLCAE_API_KEY"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def serve_api_key(serve: ServeConfig) -> str | None:
    """The one decision on the API key: ``serve.api_key``, else the CLCAE_API_KEY environment variable, else
    None (no key: the API is open, so it may only bind to loopback).  Both the host check below and the
    ingress's auth use this; the Serve builder resolves it once and ships the result to the replicas, whose
    environment (on other nodes) need not have the variable."""
    return serve.api_key or os.environ.get(API_KEY_ENV) or None


@dataclass
class StorageConfig:
    # None -> the standard AWS variables (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, ...)
    endpoint_url: str | None = None
    region: str | None = None
    key: str | None = None
    secret: str | None = None
    anon: bool = False


@dataclass
class CLCAEConfig:
    name: str = "ffhq"
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N" or "mps"
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    directions: dict[str, DirectionConfig] = field(default_factory=dict)

    @property
    def uses_align(self) -> bool:
        """Stage 2 trains with L_align (and so needs the stage-1 module): model.use_align and loss.align > 0."""
        return self.model.use_align and self.loss.align > 0


class ConfigError(CLCAEError, ValueError):
    """A config that cannot be loaded or is invalid; ``keys`` lists the dotted keys at fault."""

    def __init__(self, message: str, keys: Sequence[str] = ()):
        super().__init__(message)
        self.keys = tuple(keys)


# ---------------------------------------------------------------------------------------------------
# Public API


REPO_ROOT = Path(__file__).resolve().parents[1]


def find_config(path: str | Path) -> Path:
    """A config path as typed (relative to the working directory) when that file exists; else, for a relative path
    that names a config shipped with the platform (``configs/ffhq.yaml``, as the README and the jobs' defaults write
    it), that file; else the path as typed, which :func:`load_config` reports missing.  So the shipped configs are
    found from any folder, not only from the repository root, and a user's own file of the same name still wins."""
    p = Path(path).expanduser()
    if p.is_file() or p.is_absolute():
        return p
    shipped = REPO_ROOT / p
    return shipped if shipped.is_file() else p


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> CLCAEConfig:
    """Defaults <- YAML file (after its ``base:`` chain) <- ``key=value`` overrides, then validated.
    ``path`` is found with :func:`find_config`."""
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of 'key=value' strings, got the string {overrides!r}")
    conf = OmegaConf.structured(CLCAEConfig)
    if path is not None:
        for raw, source in _load_yaml_chain(find_config(path), ()):
            conf = _merge(conf, raw, source)
    return _finish(_apply_overrides(conf, overrides), "config")


def from_dict(d: Mapping[str, Any]) -> CLCAEConfig:
    """Rebuild (and validate) a config stored with :func:`to_dict`, e.g. from a checkpoint."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"a config dict must be a mapping, got {type(d).__name__}")
    try:
        raw = OmegaConf.create(dict(d))
    except OmegaConfBaseException as e:
        raise ConfigError(f"config dict: {e.msg or e}") from None
    conf = _merge(OmegaConf.structured(CLCAEConfig), raw, "config dict")
    return _finish(conf, "config dict")


def to_dict(cfg: CLCAEConfig) -> dict[str, Any]:
    """Plain nested dict of str/int/float/bool/None/list (safe for ``torch.load(weights_only=True)``)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: CLCAEConfig) -> str:
    """The resolved config as YAML that :func:`load_config` reads back to an equal config."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# The sections that describe a trained model: they travel with it (our checkpoints, exports, the authors' opts)
# and decide its architecture. Every other section (infer, serve, storage, directions, device, loss, ...) belongs
# to the job that uses the model.
MODEL_SECTIONS = ("generator", "encoder", "model")
# Model keys a user may still set when using a trained model: where latent_avg comes from (the authors' files
# lack it) and the average-image file.
SETTABLE_MODEL_KEYS = ("generator.checkpoint", "model.average_image")


def upgrade_stored(d: Mapping[str, Any]) -> dict[str, Any]:
    """A config stored by an earlier version, in today's schema, meaning what it meant when it was written.

    * ``model.center_input`` did not exist: those models were trained on the raw image, so it is False.
    * ``serve.checkpoint`` is now ``serve.model``.
    """
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in d.items()}
    model = out.setdefault("model", {})
    if isinstance(model, dict):
        model.setdefault("center_input", False)
    serve = out.get("serve")
    if isinstance(serve, dict) and "checkpoint" in serve:
        serve["model"] = serve.pop("checkpoint")
    return out


def model_part(d: Mapping[str, Any]) -> dict[str, Any]:
    """The model's own sections of a config dict (what an exported model stores)."""
    return {k: dict(d[k]) for k in MODEL_SECTIONS if k in d}


def inference_config(model: Mapping[str, Any], job: CLCAEConfig | Mapping[str, Any] | None = None,
                     overrides: Sequence[str] = (), source: str = "the model") -> CLCAEConfig:
    """The one merge every front door uses to run a trained model: the model's sections (``MODEL_SECTIONS``,
    from its checkpoint/export/opts) + the job's settings (``job``: a config or dict; None = defaults) +
    ``key=value`` overrides.  Overriding the model's architecture is refused, naming the key."""
    base = to_dict(job) if isinstance(job, CLCAEConfig) else dict(job or {})
    merged = {**base, **model_part(model)}
    for item in overrides:
        key = str(item).split("=", 1)[0].strip()
        if key.split(".", 1)[0] in MODEL_SECTIONS and key not in SETTABLE_MODEL_KEYS:
            raise ConfigError(f"override {item!r}: {key} is part of the model's architecture, fixed by {source}; "
                              f"only {', '.join(SETTABLE_MODEL_KEYS)} can be set for a trained model", [key])
    conf = _apply_overrides(_merge(OmegaConf.structured(CLCAEConfig), OmegaConf.create(merged), source), overrides)
    return _finish(conf, source)


def n_latent(cfg: CLCAEConfig | GeneratorConfig) -> int:
    """Number of w+ layers of the generator: 18 for 1024, 16 for 512, 10 for 64."""
    gen = cfg.generator if isinstance(cfg, CLCAEConfig) else cfg
    return 2 * _log2(gen.size) - 2


def validate(cfg: CLCAEConfig) -> CLCAEConfig:
    """Check values and their relations; raises one ConfigError listing every problem by dotted key."""
    if not isinstance(cfg, CLCAEConfig):
        raise ConfigError(f"validate() takes a CLCAEConfig, got {type(cfg).__name__}")
    try:  # types first, so that a hand-built config with a str where an int belongs fails here, clearly
        OmegaConf.structured(cfg)
    except OmegaConfBaseException as e:
        raise _from_omegaconf(e, "config") from None
    problems: list[tuple[str, str]] = []

    def check(ok: bool, key: str, why: str) -> None:
        if not ok:
            problems.append((key, why))

    _check_top(cfg, check)
    _check_generator(cfg, check)
    _check_encoder(cfg, check)
    _check_model(cfg, check)
    _check_losses_and_optim(cfg, check)
    _check_data_train_storage(cfg, check)
    _check_directions(cfg, check)
    if problems:
        lines = [f"{key} = {_show(_get(cfg, key))}: {why}" for key, why in problems]
        keys = list(dict.fromkeys(key for key, _ in problems))
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines), keys)
    return cfg


# ---------------------------------------------------------------------------------------------------
# Value checks. Each reports through `check(ok, dotted_key, why)`.

Check = Callable[[bool, str, str], None]


def _check_top(cfg: CLCAEConfig, check: Check) -> None:
    check(bool(cfg.name.strip()), "name", "must not be empty (it names runs and checkpoints)")
    check(cfg.seed >= 0, "seed", "must be >= 0 (numpy seeds are unsigned)")
    check(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.device) is not None, "device",
          "must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")


def _check_generator(cfg: CLCAEConfig, check: Check) -> None:
    g = cfg.generator
    # 32 is the smallest generator that has convs.4, whose input f replaces.
    check(_is_pow2(g.size) and 32 <= g.size <= 1024, "generator.size", "must be a power of two in 32..1024")
    check(g.style_dim > 0, "generator.style_dim", "must be > 0")
    check(g.n_mlp >= 1, "generator.n_mlp", "must be >= 1")
    check(g.channel_multiplier >= 1, "generator.channel_multiplier", "must be >= 1")
    check(g.channel_max >= 8, "generator.channel_max", "must be >= 8")
    check(g.lr_mlp > 0, "generator.lr_mlp", "must be > 0")
    check(g.mean_latent_samples >= 1, "generator.mean_latent_samples", "must be >= 1")
    check(g.init_seed >= 0, "generator.init_seed", "must be >= 0")
    for heads_key, heads in (("model.attention_heads", cfg.model.attention_heads),
                             ("contrastive.heads", cfg.contrastive.heads)):
        if heads >= 1:  # heads < 1 is reported under its own key
            check(g.style_dim % heads == 0, "generator.style_dim",
                  f"must be divisible by {heads_key} ({heads})")
    if g.crop is not None:
        ok = len(g.crop) == 4 and all(0 <= lo < hi <= g.size for lo, hi in (g.crop[:2], g.crop[2:]))
        check(ok, "generator.crop", f"must be [top, bottom, left, right] with 0 <= top < bottom <= {g.size} "
              f"and 0 <= left < right <= {g.size} (generator.size)")


def _check_encoder(cfg: CLCAEConfig, check: Check) -> None:
    e, g = cfg.encoder, cfg.generator
    size = e.input_size
    if len(size) != 2:
        check(False, "encoder.input_size", "must be two ints [H, W]")
    else:
        h, w = size
        # T3 = input/4 is halved by stride-2 convs down to G5's 16x16 (the shorter side is zero-padded first,
        # as for cars' 192x256), so each side must reach T3 >= 16 and the longer side must be a power of two.
        check(h % 16 == 0 and w % 16 == 0 and min(h, w) >= 64, "encoder.input_size",
              "each side must be divisible by 16 and >= 64 (the F branch needs T3 = input/4 >= 16x16)")
        check(_is_pow2(max(h, w)), "encoder.input_size",
              "the longer side must be a power of two (T3 is halved down to 16x16 for f)")
        if g.crop is not None and len(g.crop) == 4 and min(h, w) > 0:
            ch, cw = g.crop[1] - g.crop[0], g.crop[3] - g.crop[2]
            check(ch > 0 and cw > 0 and math.isclose(ch / cw, h / w, rel_tol=0.01), "encoder.input_size",
                  f"aspect H/W must match generator.crop's {ch}x{cw} (else generator outputs are distorted)")
        if g.crop is None:
            check(h == w, "encoder.input_size", "a non-square input needs generator.crop of the same aspect "
                  "(the generator's output is square)")
    if e.backbone not in BACKBONE_WIDTHS:
        check(False, "encoder.backbone", f"unknown backbone; choose one of {', '.join(BACKBONE_WIDTHS)}")
    else:
        width = BACKBONE_WIDTHS[e.backbone]
        check(width == g.style_dim, "encoder.backbone",
              f"its pyramid width {width} must equal generator.style_dim ({g.style_dim}); "
              "use ir_se_tiny with style_dim 64, the other backbones with 512")


def _check_model(cfg: CLCAEConfig, check: Check) -> None:
    m, c = cfg.model, cfg.contrastive
    check(m.variant in MODEL_VARIANTS, "model.variant", f"must be one of {', '.join(MODEL_VARIANTS)}")
    if m.variant in ("psp", "e4e"):
        check(not cfg.uses_align, "model.use_align",
              f"the {m.variant} baseline has no L_align (it trains on G(w+) alone): set model.use_align=false")
    check(m.attention_heads >= 1, "model.attention_heads", "must be >= 1")
    check(m.attention_ffn >= 1, "model.attention_ffn", "must be >= 1")
    check(0 <= m.attention_dropout < 1, "model.attention_dropout", "must be in [0, 1)")
    check(m.attention_tokens >= 1, "model.attention_tokens", "must be >= 1 (1 = the paper)")
    check(m.f_ramp_steps >= 0, "model.f_ramp_steps", "must be >= 0 (0 = no ramp)")
    check(c.layers >= 1, "contrastive.layers", "must be >= 1")
    check(c.heads >= 1, "contrastive.heads", "must be >= 1")
    check(c.ffn >= 1, "contrastive.ffn", "must be >= 1")
    check(0 <= c.dropout < 1, "contrastive.dropout", "must be in [0, 1)")
    check(c.projection_dim >= 1, "contrastive.projection_dim", "must be >= 1")
    check(c.init_temperature > 0, "contrastive.init_temperature", "must be > 0")
    check(c.max_logit_scale > 0, "contrastive.max_logit_scale", "must be > 0")
    if c.init_temperature > 0:
        check(1 / c.init_temperature <= c.max_logit_scale, "contrastive.max_logit_scale",
              f"must be >= 1/contrastive.init_temperature ({1 / c.init_temperature:.4g}), "
              "else the scale is clamped from step 0")
    check(0 <= c.lambda_image <= 1, "contrastive.lambda_image", "must be in [0, 1] (Eq. 3)")
    check(c.lr > 0, "contrastive.lr", "must be > 0")
    check(bool(c.official_image) == bool(c.official_latent), "contrastive.official_latent" if c.official_image
          else "contrastive.official_image", "the authors' pair goes together: set both contrastive.official_image "
          "(best_model_image.pt) and contrastive.official_latent (best_model_latent.pt), or neither")
    check(not (c.official_image and c.checkpoint), "contrastive.checkpoint",
          "give the stage-1 module once: contrastive.checkpoint (ours) or contrastive.official_image/_latent")
    check(c.optimizer in CONTRASTIVE_OPTIMIZERS, "contrastive.optimizer",
          f"must be one of {', '.join(CONTRASTIVE_OPTIMIZERS)}")


def _check_losses_and_optim(cfg: CLCAEConfig, check: Check) -> None:
    loss, o = cfg.loss, cfg.optim
    for name in ("l2", "lpips", "id", "feature_reg", "align", "delta_reg"):
        check(getattr(loss, name) >= 0, f"loss.{name}", "loss weights must be >= 0")
    check(loss.lpips_net in LPIPS_NETS, "loss.lpips_net", f"must be one of {', '.join(LPIPS_NETS)}")
    check(loss.id_network in ID_NETWORKS, "loss.id_network", f"must be one of {', '.join(ID_NETWORKS)}")
    check(loss.id_backbone in BACKBONE_WIDTHS, "loss.id_backbone",
          f"unknown backbone; choose one of {', '.join(BACKBONE_WIDTHS)}")
    check(o.lr > 0, "optim.lr", "must be > 0")
    check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas",
          "must be two floats in [0, 1)")
    check(o.eps > 0, "optim.eps", "must be > 0")
    check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    check(o.lookahead_k >= 1, "optim.lookahead_k", "must be >= 1")
    check(0 < o.lookahead_alpha <= 1, "optim.lookahead_alpha", "must be in (0, 1]")
    check(o.grad_clip is None or o.grad_clip > 0, "optim.grad_clip", "must be > 0, or null for no clipping")


def _check_data_train_storage(cfg: CLCAEConfig, check: Check) -> None:
    d, t, s = cfg.data, cfg.train, cfg.storage
    check(d.batch_size >= 1, "data.batch_size", "must be >= 1")
    check(d.num_synthetic >= 1, "data.num_synthetic", "must be >= 1")
    counts = ("max_steps", "checkpoint_every", "sample_every", "log_every", "num_workers", "keep_checkpoints")
    for name in counts:
        check(getattr(t, name) >= 1, f"train.{name}", "must be >= 1")
    check(t.cpus_per_worker > 0, "train.cpus_per_worker", "must be > 0")
    check(t.min_workers is None or 1 <= t.min_workers <= t.num_workers, "train.min_workers",
          "must be >= 1 and <= train.num_workers, or null for a fixed number of workers")
    check(all(v > 0 for v in t.resources_per_worker.values()), "train.resources_per_worker", "amounts must be > 0")
    check(not {"CPU", "GPU"} & set(t.resources_per_worker), "train.resources_per_worker",
          "CPU and GPU come from train.cpus_per_worker and train.use_gpu")
    check(t.max_failures >= -1, "train.max_failures", "must be >= 0, or -1 to retry forever")
    check(bool(t.storage_path.strip()), "train.storage_path", "must not be empty")
    i = cfg.infer
    for name in ("batch_size", "actors", "rows_per_file"):
        check(getattr(i, name) >= 1, f"infer.{name}", "must be >= 1")
    check(i.cpus_per_actor > 0, "infer.cpus_per_actor", "must be > 0")
    check(i.concurrent_batches is None or i.concurrent_batches >= 1, "infer.concurrent_batches",
          "must be >= 1, or null for one per CPU of the actor (1 on a GPU)")
    check(i.align in (None, "faces", "cars"), "infer.align", "must be faces, cars or null (inputs already aligned)")
    check(i.max_retries >= 0, "infer.max_retries", "must be >= 0")
    check(i.precision in PRECISIONS, "infer.precision", f"must be one of {', '.join(PRECISIONS)}")
    check(t.precision in PRECISIONS, "train.precision", f"must be one of {', '.join(PRECISIONS)}")
    v = cfg.serve
    check(1 <= v.port <= 65535, "serve.port", "must be a TCP port (1..65535)")
    check(v.max_body_mb > 0, "serve.max_body_mb", "must be > 0")
    check(v.request_timeout_s > 0, "serve.request_timeout_s", "must be > 0")
    check(v.max_batch_size >= 1, "serve.max_batch_size", "must be >= 1")
    check(v.max_ongoing_requests >= v.max_batch_size, "serve.max_ongoing_requests",
          "must be >= serve.max_batch_size, or batches can never fill")
    check(1 <= v.min_replicas <= v.max_replicas, "serve.min_replicas", "must be >= 1 and <= serve.max_replicas")
    check(0 < v.target_ongoing_requests <= v.max_ongoing_requests, "serve.target_ongoing_requests",
          "must be > 0 and <= serve.max_ongoing_requests, or autoscaling never adds a replica")
    for name in ("upscale_delay_s", "downscale_delay_s"):
        check(getattr(v, name) >= 0, f"serve.{name}", "must be >= 0 seconds")
    check(v.metrics_interval_s > 0, "serve.metrics_interval_s", "must be > 0 seconds")
    check(v.look_back_period_s > v.metrics_interval_s, "serve.look_back_period_s",
          "must be > serve.metrics_interval_s: the average needs more than one report")
    check(v.health_check_period_s > 0, "serve.health_check_period_s", "must be > 0 seconds")
    check(v.max_queued_requests >= 1, "serve.max_queued_requests", "must be >= 1: a bounded queue")
    check(0 < v.gpus_per_replica <= 1, "serve.gpus_per_replica",
          "must be > 0 and <= 1: a replica runs its model on one GPU (0.5 shares one between two replicas)")
    check(v.align_domain in (None, "faces", "cars"), "serve.align_domain",
          "must be faces, cars or null (null: cars when generator.crop is set, else faces)")
    check(v.host in LOOPBACK_HOSTS or serve_api_key(v) is not None, "serve.host",
          f"binding beyond loopback needs an API key: serve.api_key or {API_KEY_ENV} "
          "(or put a gateway in front and keep loopback)")
    check((s.key is None) == (s.secret is None), "storage.secret" if s.key is not None else "storage.key",
          "storage.key and storage.secret go together: set both or neither")


def _check_directions(cfg: CLCAEConfig, check: Check) -> None:
    n = n_latent(cfg) if _is_pow2(cfg.generator.size) else None
    for name, d in cfg.directions.items():
        key = f"directions.{name}"
        check(d.kind in DIRECTION_KINDS, f"{key}.kind", f"must be one of {', '.join(DIRECTION_KINDS)}")
        check(bool(d.path.strip()), f"{key}.path", "must name the direction file")
        check(d.max_strength > 0, f"{key}.max_strength", "must be > 0")
        if d.kind == "ganspace":
            check(d.component is not None and d.component >= 0, f"{key}.component",
                  "a GANSpace direction needs a PCA component index >= 0")
            check(d.layers is not None, f"{key}.layers", "a GANSpace direction needs layers [start, end)")
        elif d.kind == "interfacegan":
            check(d.component is None, f"{key}.component", "only GANSpace directions take a component")
            check(d.mode is None and d.strength is None, f"{key}.mode" if d.mode is not None else f"{key}.strength",
                  "only GANSpace directions take a mode and a preset strength")
        check(d.mode in (None, "offset", "target"), f"{key}.mode", "must be offset or target (the authors')")
        if d.layers is not None:
            ok = len(d.layers) == 2 and 0 <= d.layers[0] < d.layers[1] and (n is None or d.layers[1] <= n)
            check(ok, f"{key}.layers", f"must be [start, end) with 0 <= start < end <= {n} (the w+ layers)")


# ---------------------------------------------------------------------------------------------------
# Loading, merging and error messages


def _load_yaml_chain(path: Path, chain: tuple[Path, ...]) -> list[tuple[DictConfig, str]]:
    """[(raw, source)] for `path` and its `base:` ancestors, the farthest ancestor first."""
    via = f" (the base of {chain[-1]})" if chain else ""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}{via}")
    try:
        raw = OmegaConf.load(path)
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}{via}: {e}") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not a {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return [(raw, str(path))]
    if not isinstance(base, str) or not base:
        raise ConfigError(f"base = {_show(base)} in {path}: must be the path of another config file")
    base_path = path.parent / base
    if base_path.resolve() in {p.resolve() for p in (*chain, path)}:
        cycle = " -> ".join(str(p) for p in (*chain, path, base_path))
        raise ConfigError(f"base: cycle in config inheritance: {cycle}")
    return [*_load_yaml_chain(base_path, (*chain, path)), (raw, str(path))]


_OVERRIDE_KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def _parse_override(item: str) -> DictConfig:
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. loss.lpips=0.5, "
                          "encoder.input_size=[128,128])")
    key = item.split("=", 1)[0].strip()
    if not _OVERRIDE_KEY.fullmatch(key):
        hint = " (drop the leading dashes)" if key.startswith("-") else ""
        raise ConfigError(f"override {item!r}: {key!r} is not a dotted key like loss.lpips{hint}")
    try:
        return OmegaConf.from_dotlist([item])
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(f"override {item!r}: cannot parse the value: {e}") from None


def _apply_overrides(conf: DictConfig, overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        conf = _merge(conf, _parse_override(item), f"override {item!r}", override=True)
    return conf


def _merge(conf: DictConfig, raw: DictConfig, source: str, override: bool = False) -> DictConfig:
    plain = OmegaConf.to_container(raw, resolve=False)
    _check_keys(plain, CLCAEConfig, "", source)
    try:
        conf = _remove_entries(conf, plain, CLCAEConfig, "", source, override)
        return OmegaConf.merge(conf, _drop_empty_sections(plain, CLCAEConfig))
    except OmegaConfBaseException as e:
        raise _from_omegaconf(e, source) from None


def _remove_entries(conf: DictConfig, node: dict, tp: Any, prefix: str, source: str, override: bool
                    ) -> DictConfig:
    """A merge only adds to a mapping of named entries (``directions``, ``train.resources_per_worker``); these
    take entries away instead: ``directions={}`` (or, on the command line, ``directions=null``) empties it,
    ``directions.smile=null`` leaves one out.  ``conf`` (the merge's own state) is changed in place and
    returned; ``node`` keeps only what is left to merge.  (A bare ``directions:`` header in a YAML file, its
    entries commented out, still changes nothing.)"""
    for key, hint in typing.get_type_hints(tp).items():
        if key not in node:
            continue
        value, full = node[key], f"{prefix}{key}"
        if dataclasses.is_dataclass(hint):
            if value is None and override:
                raise ConfigError(f"{full} = null ({source}): {full} is a section of settings, not a value; "
                                  f"set its keys instead (e.g. {_leaf_keys(hint, full + '.')[0]}=...)", [full])
            if isinstance(value, dict):
                conf = _remove_entries(conf, value, hint, full + ".", source, override)
            continue
        if typing.get_origin(hint) is not dict:
            continue
        if value == {} or (value is None and override):
            OmegaConf.update(conf, full, {}, merge=False)
            node.pop(key)
        elif isinstance(value, dict) and any(v is None for v in value.values()):
            entries = OmegaConf.select(conf, full)
            for name in [n for n, v in value.items() if v is None]:
                if name not in entries:
                    have = ", ".join(map(str, entries)) or "none"
                    raise ConfigError(f"{full}.{name} = null ({source}): there is no {full}.{name} to leave out "
                                      f"(entries: {have})", [f"{full}.{name}"])
                del entries[name]
                value.pop(name)
    return conf


def _finish(conf: DictConfig, source: str) -> CLCAEConfig:
    try:
        cfg = OmegaConf.to_object(conf)
    except OmegaConfBaseException as e:
        raise _from_omegaconf(e, source) from None
    return validate(cfg)


def _check_keys(node: Any, tp: Any, prefix: str, source: str) -> None:
    """Reject keys the schema does not have, naming the dotted key and the closest valid ones."""
    if node is None and (dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict):
        return
    if dataclasses.is_dataclass(tp):
        if not isinstance(node, dict):
            section = prefix.rstrip(".") or "the config"
            raise ConfigError(f"{section} = {_show(node)} ({source}): expected a mapping of settings",
                              [section])
        hints = typing.get_type_hints(tp)
        for key, value in node.items():
            full = f"{prefix}{key}"
            if key not in hints:
                raise ConfigError(f"unknown key {full} = {_show(value)} ({source}); "
                                  f"{_suggest(str(key), list(hints), prefix)}", [full])
            _check_keys(value, hints[key], full + ".", source)
    elif typing.get_origin(tp) is dict and isinstance(node, dict):
        _, value_tp = typing.get_args(tp)
        for key, value in node.items():
            _check_keys(value, value_tp, f"{prefix}{key}.", source)


def _drop_empty_sections(node: dict, tp: Any) -> dict:
    """A section header whose entries are all commented out (`directions:`) reads as null: skip it."""
    hints = typing.get_type_hints(tp)
    out = {}
    for key, value in node.items():
        hint = hints[key]
        if value is None and (dataclasses.is_dataclass(hint) or typing.get_origin(hint) is dict):
            continue
        out[key] = _drop_empty_sections(value, hint) if dataclasses.is_dataclass(hint) else value
    return out


def _suggest(key: str, valid: list[str], prefix: str) -> str:
    # `lpips_lambda`/`lpips_wieght` -> lpips (weights are named after their loss), then spelling, then the
    # same name in another section (`train.batch_size` -> data.batch_size).
    found = sorted((v for v in valid if key.startswith(v + "_")), key=len, reverse=True)
    found += difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    names = [prefix + v for v in dict.fromkeys(found)]
    names += [k for k in _leaf_keys(CLCAEConfig) if k.rsplit(".", 1)[-1] == key and k not in names]
    if names:
        return "did you mean " + " or ".join(repr(n) for n in names[:3]) + "?"
    return "valid keys here: " + ", ".join(valid)


def _leaf_keys(tp: Any, prefix: str = "") -> list[str]:
    keys = []
    for name, hint in typing.get_type_hints(tp).items():
        keys += _leaf_keys(hint, f"{prefix}{name}.") if dataclasses.is_dataclass(hint) else [prefix + name]
    return keys


def _from_omegaconf(e: OmegaConfBaseException, source: str) -> ConfigError:
    key = e.full_key or "config"
    value = e.value._value() if isinstance(e.value, Node) else e.value  # a scalar can arrive wrapped
    if isinstance(e, MissingMandatoryValue):
        return ConfigError(f"{key} is required but not set", [key])
    expected = _expected_type(key)
    if isinstance(e, ValidationError) and expected:
        got = "null" if value is None else type(value).__name__
        return ConfigError(f"{key} = {_show(value)} ({source}): expected {expected}, got {got}", [key])
    detail = (e.msg or str(e)).splitlines()[0]
    return ConfigError(f"{key} = {_show(value)} ({source}): {detail}", [key])


def _expected_type(full_key: str) -> str:
    """train.max_steps -> 'int', encoder.input_size[0] -> 'int', generator.crop -> 'a list of int or null'."""
    tp: Any = CLCAEConfig
    for part in re.split(r"\.|(?=\[)", full_key):
        inner = _strip_optional(tp)
        if part.startswith("[") and typing.get_origin(inner) is list:
            tp = typing.get_args(inner)[0]
        elif dataclasses.is_dataclass(inner):
            tp = typing.get_type_hints(inner).get(part)
        elif typing.get_origin(inner) is dict:
            tp = typing.get_args(inner)[1]
        else:
            return ""
        if tp is None:
            return ""
    return "" if dataclasses.is_dataclass(tp) else _type_name(tp)


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _type_name(tp: Any) -> str:
    inner = _strip_optional(tp)
    suffix = " or null" if inner is not tp else ""
    if typing.get_origin(inner) is list:
        return f"a list of {typing.get_args(inner)[0].__name__}{suffix}"
    return f"{getattr(inner, '__name__', str(inner))}{suffix}"


# ---------------------------------------------------------------------------------------------------
# Small helpers


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _log2(n: int) -> int:
    if not _is_pow2(n):
        raise ConfigError(f"generator.size = {n}: must be a power of two", ["generator.size"])
    return n.bit_length() - 1


def _get(cfg: CLCAEConfig, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
    return node


def _show(value: Any, limit: int = 80) -> str:
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
