"""The models users bring: one resolver and one loader behind every front door (Inverter, jobs, Serve, stage-2
``train.init_from``).

A model is named by any of:

* a registry name, ``clcae-ffhq`` or ``clcae-car``: the authors' released file and the StyleGAN2 file it needs
  (for ``latent_avg``), looked up in ``$CLCAE_HOME`` and then ``./pretrained``;
* the authors' file ``{'state_dict': encoder.*/decoder.*, 'opts': {...}}``: its ``opts`` decide the config
  (generator size, car or face, which outputs exist); an option we cannot honour fails, naming it;
* our training checkpoint (``checkpoint.pt``) or its run directory (the newest checkpoint in it);
* our exported model (``clcae export``): one ``.safetensors`` file, weights + the model-only config.

:func:`prepare` (in the driver) resolves the name, merges the model's own config sections with the job's
settings (:func:`clcae.config.inference_config`) and checks every file the load will need, so a missing file
fails before any actor or replica starts.  :func:`load` builds the model and reads the weights; a
:class:`ModelSource` is plain data that ships to actors and replicas, and a source resolved in this process
keeps what it already read, so every process reads a model file once.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from clcae.checkpoints import CHECKPOINT_FORMAT
from clcae.config import (
    CLCAEConfig,
    ConfigError,
    StorageConfig,
    inference_config,
    model_part,
    to_dict,
    upgrade_stored,
)
from clcae.data.storage import absolute, filesystem, write_bytes
from clcae.factory import build_clcae, set_average_image
from clcae.models.irse import BACKBONES
from clcae.models.stylegan2 import channel_table
from clcae.official import OFFICIAL
from clcae.weights import (
    MissingWeightsError,
    WeightsError,
    load_into,
    load_official_inversion,
    local_path,
    read_state,
)

log = logging.getLogger(__name__)

EXPORT_FORMAT = "clcae-export/1"
CHECKPOINT_FILE = "checkpoint.pt"
# registry name -> the generator file (an OFFICIAL entry) whose latent_avg the authors' file needs
RELEASES = {"clcae-ffhq": "stylegan2-ffhq", "clcae-car": "stylegan2-car"}
# The authors' options this loader understands: each either maps onto our config or must have its default.
_UNSUPPORTED_OPTS = {
    "no_feature_attention": "the authors' 'w/o F attention' ablation swaps in a BatchNorm/PReLU CNN we do not build",
    "no_res": "the authors' '--no_res' variant decodes w into a 64x64 key/value map we do not build",
    "not_for_ww": "a model that predicts only w (no W+ residuals) is not supported",
    "no_w_attention": "the authors' 'w/o W+ attention' switch adds w's own offset twice at layer 0 (w+_0 = "
                      "latent_avg + 2 w); our ablation follows the paper (w+_i = w + dw_i): outputs would differ",
}


class ModelSourceError(WeightsError):
    """A model name or file that cannot be used: unknown name, wrong kind of file, unsupported options."""


@dataclass
class ModelSource:
    """What a model name resolved to.  Plain data (it is shipped to Ray actors and Serve replicas)."""

    kind: str                   # "authors" | "checkpoint" | "export"
    uri: str                    # the weights file
    name: str                   # what the user gave
    model_id: str               # stored with every latent-table row and response
    config: dict[str, Any]      # the model's config dict (its own sections, plus job settings for checkpoints)
    # what resolving already read (not shipped: a remote process reads the file itself, once)
    payload: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "payload": None}


# ------------------------------------------------------------------------------------------------ resolving
def search_dirs() -> list[Path]:
    """Where registry names and the files they need are looked up: ``$CLCAE_HOME``, then ``./pretrained``."""
    dirs = [Path(os.environ["CLCAE_HOME"])] if os.environ.get("CLCAE_HOME") else []
    return [*dirs, Path("pretrained")]


def _find(filename: str, extra: Sequence[Path] = ()) -> Path | None:
    for d in (*extra, *search_dirs()):
        if (d / filename).is_file():
            return (d / filename).resolve()
    return None


def _where() -> str:
    env = os.environ.get("CLCAE_HOME")
    return (f"$CLCAE_HOME ({env}) and " if env else "") + f"{Path('pretrained').resolve()}"


def resolve(spec: str, storage: StorageConfig | None = None) -> ModelSource:
    """A registry name, a file or a run directory -> :class:`ModelSource` (its config; the weights are read
    here only where the config lives in the same file)."""
    spec = str(spec)
    if spec in RELEASES:
        release = OFFICIAL[spec]
        found = _find(release.filename)
        if found is None:
            raise MissingWeightsError(
                f"{spec}: {release.filename} not found in {_where()}. Download it with `clcae weights fetch {spec}` "
                f"(or by hand from {release.source}) into one of those folders, or give its path instead of the name.")
        source = resolve(str(found), storage)
        source.name = spec
        source.model_id = spec
        return source

    fs, path = filesystem(spec, storage or StorageConfig())
    if not fs.exists(path):
        hint = ""
        if "/" not in spec and "." not in spec:
            hint = f" (registry names: {', '.join(RELEASES)})"
        raise MissingWeightsError(f"model not found: {spec} is neither a file, a run directory nor a registry "
                                  f"name{hint}")
    # The source's uri travels to Ray actors and Serve replicas, which may run in another folder: a relative path
    # is made absolute here, where the user typed it. ``name`` keeps what was typed, for messages.
    uri = absolute(spec)
    if fs.isdir(path):
        source = resolve(newest_checkpoint(uri, storage), storage)
    elif spec.endswith(".safetensors"):
        source = _resolve_export(uri, storage)
    else:
        source = _resolve_torch_file(uri)
    source.name = spec
    return source


def newest_checkpoint(uri: str, storage: StorageConfig | None = None) -> str:
    """A run directory -> its newest ``checkpoint_*/checkpoint.pt`` (a file URI is returned as it is)."""
    fs, path = filesystem(uri, storage or StorageConfig())
    if fs.isfile(path):
        return uri
    base = path.rstrip("/")
    found = sorted(fs.glob(f"{base}/checkpoint_*/{CHECKPOINT_FILE}"))
    if not found:
        raise MissingWeightsError(f"no checkpoint_*/{CHECKPOINT_FILE} under {uri}: has the run written a checkpoint "
                                  "yet (train.checkpoint_every)?")
    return uri.rstrip("/") + "/" + found[-1][len(base) + 1:]


def _resolve_torch_file(uri: str) -> ModelSource:
    ckpt = read_state(uri)
    if not isinstance(ckpt, Mapping):
        raise ModelSourceError(f"{uri} holds a {type(ckpt).__name__}, not a model checkpoint")
    if ckpt.get("format") == CHECKPOINT_FORMAT:
        if ckpt.get("kind") != "inversion":
            raise ModelSourceError(f"{uri} is a stage-1 ({ckpt.get('kind')}) checkpoint; inversion needs a stage-2 "
                                   "(inversion) checkpoint or run directory")
        config = upgrade_stored(ckpt["config"])
        model_id = str(ckpt.get("model_id") or f"{config.get('name', 'clcae')}:{uri}")
        return ModelSource("checkpoint", uri, uri, model_id, config, ckpt)
    if "state_dict" in ckpt and "opts" in ckpt:
        opts = ckpt["opts"]
        opts = vars(opts) if not isinstance(opts, Mapping) else dict(opts)
        config = config_from_opts(opts, ckpt["state_dict"], uri)
        return ModelSource("authors", uri, uri, f"authors:{Path(uri).name}", config, ckpt)
    if "g_ema" in ckpt:
        raise ModelSourceError(f"{uri} is a StyleGAN2 generator, not an inversion model: give it as "
                               "generator.checkpoint, and an inversion model (clcae-ffhq, a checkpoint) as the model")
    raise ModelSourceError(f"{uri} is not an inversion model: expected our checkpoint (format {CHECKPOINT_FORMAT!r}), "
                           "the authors' {'state_dict', 'opts'} file or an exported .safetensors "
                           f"(found keys {sorted(map(str, ckpt))[:8]})")


def config_from_opts(opts: Mapping[str, Any], state: Mapping[str, torch.Tensor], uri: str) -> dict[str, Any]:
    """The authors' training ``opts`` + the shapes in their state_dict -> our model config sections.

    ``opts`` decide what the shapes cannot show (car or face, learn-in-w, the ablation switches); the shapes
    decide the widths (the authors' code fixes them at 512 / 8 / IR-SE50, but reading them keeps a file of any
    width loadable and lets a mismatch fail on the key that differs)."""
    problems = [f"opts.{k}={opts.get(k)!r}: {why}" for k, why in _UNSUPPORTED_OPTS.items() if opts.get(k)]
    if opts.get("encoder_type", "GradualStyleEncoder") != "GradualStyleEncoder":
        problems.append(f"opts.encoder_type={opts['encoder_type']!r}: only GradualStyleEncoder (AFPSP) is supported")
    if not opts.get("learn_in_w", False):
        problems.append("opts.learn_in_w=False: the authors' AFPSP only runs with --learn_in_w (a (512,) "
                        "latent_avg); this file was trained otherwise")
    if opts.get("idx_k") not in (None, 5):
        problems.append(f"opts.idx_k={opts['idx_k']!r}: f replaces the input of convs.4 (idx_k 5) only")
    if problems:
        raise ModelSourceError(f"{uri} was trained with options this platform cannot honour:\n  "
                               + "\n  ".join(problems))
    try:
        arch = _architecture(state)
    except (KeyError, IndexError, ValueError) as exc:
        raise ModelSourceError(f"{uri}: its state_dict is not the authors' AFPSP layout ({exc})") from None
    size = int(opts.get("output_size", arch["size"]))
    if size != arch["size"]:
        raise ModelSourceError(f"{uri}: opts.output_size={size} but the decoder weights are a {arch['size']} px "
                               "generator")
    car = "car" in str(opts.get("dataset_type", ""))
    side = arch["input_side"]
    generator: dict[str, Any] = {"size": size, "style_dim": arch["style_dim"], "n_mlp": arch["n_mlp"],
                                 "channel_multiplier": arch["channel_multiplier"], "channel_max": arch["channel_max"],
                                 "checkpoint": _generator_for(opts, uri), "crop": None}
    if car:
        # the authors pool to 256 and keep rows 32:224: rows size/8 .. 7 size/8 of the generator's output
        generator["crop"] = [size // 8, size * 7 // 8, 0, size]
    if not arch["w_attention"]:
        raise ModelSourceError(f"{uri}: its weights have no W+ cross-attention blocks "
                               f"({_UNSUPPORTED_OPTS['no_w_attention']})")
    model = {"variant": "clcae", "w_attention": True, "f_attention": True,
             "feature": not opts.get("not_for_feature", False), "center_input": True, "attention_heads": 4,
             "attention_ffn": arch["ffn"], "attention_dropout": 0.1, "attention_tokens": 1, "average_image": None}
    encoder = {"backbone": arch["backbone"], "input_size": [side * 3 // 4, side] if car else [side, side],
               "pretrained": None}
    return {"name": "clcae-car" if car else "clcae-ffhq", "generator": generator, "encoder": encoder, "model": model}


def _architecture(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Widths of an AFPSP state_dict, read from its tensor shapes."""
    def indices(pattern: str) -> set[int]:
        return {int(m.group(1)) for k in state if (m := re.fullmatch(pattern, k))}

    n_rgb = len(indices(r"decoder\.to_rgbs\.(\d+)\.conv\.weight"))
    size = 2 ** (n_rgb + 2)
    channel_max = int(state["decoder.conv1.conv.weight"].shape[1])
    full_res = int(state[f"decoder.convs.{2 * n_rgb - 1}.conv.weight"].shape[1])
    multiplier = 2
    for cm in (2, 1, 4, 3):  # 2 (config-f) first: when channel_max caps every layer, any multiplier fits
        if channel_table(cm, channel_max)[size] == full_res:
            multiplier = cm
            break
    units = len(indices(r"encoder\.body\.(\d+)\..*"))
    stem = int(state["encoder.input_layer.0.weight"].shape[0])
    se = any(".res_layer.5." in k for k in state if k.startswith("encoder.body."))
    backbone = next((name for name, spec in BACKBONES.items()
                     if sum(spec.units) == units and spec.depths[0] == stem and spec.se == se), None)
    if backbone is None:
        raise ValueError(f"an IR backbone of {units} units with a {stem}-channel stem matches none of "
                         f"{', '.join(BACKBONES)}")
    halvings = len(indices(r"encoder\.styles\.0\.convs\.(\d+)\.weight"))
    attn = "encoder.cross_attention.0.linear1.weight"
    ffn_key = attn if attn in state else "encoder.feature_cross_attention.linear1.weight"
    return {"size": size, "style_dim": int(state["encoder.styles.0.linear.weight"].shape[0]),
            "n_mlp": len(indices(r"decoder\.style\.(\d+)\.weight")), "channel_max": channel_max,
            "channel_multiplier": multiplier, "backbone": backbone, "input_side": 16 * 2 ** halvings,
            "w_attention": attn in state, "ffn": int(state[ffn_key].shape[0]) if ffn_key in state else 1024}


def _generator_for(opts: Mapping[str, Any], uri: str) -> str | None:
    """The generator file the authors' model was trained with (their files lack latent_avg): ``opts.stylegan_weights``
    by its file name beside the model, in the search folders, or at the path the options name."""
    named = str(opts.get("stylegan_weights") or "")
    car = "car" in str(opts.get("dataset_type", ""))
    names = [Path(named).name] if named else []
    names.append(OFFICIAL["stylegan2-car" if car else "stylegan2-ffhq"].filename)
    local = local_path(uri)
    beside = [Path(local).parent] if local else []
    for name in dict.fromkeys(names):
        found = _find(name, beside)
        if found is not None:
            return str(found)
    return os.path.abspath(named) if named and os.path.isfile(named) else None


# ------------------------------------------------------------------------------------------------ exports
def _read_safetensors_header(uri: str, storage: StorageConfig | None) -> dict[str, Any]:
    """The JSON header of a .safetensors file (8-byte length, then JSON): metadata without the weights."""
    fs, path = filesystem(uri, storage)
    try:
        with fs.open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 100_000_000:
                raise ValueError(f"header length {n}")
            return json.loads(fh.read(n))
    except FileNotFoundError:
        raise MissingWeightsError(f"model not found: {uri}") from None
    except (ValueError, struct.error) as exc:
        raise ModelSourceError(f"{uri} is not a readable .safetensors file ({exc})") from None


def _resolve_export(uri: str, storage: StorageConfig | None) -> ModelSource:
    meta = _read_safetensors_header(uri, storage).get("__metadata__") or {}
    if meta.get("format") != EXPORT_FORMAT:
        raise ModelSourceError(f"{uri} is a .safetensors file but not a clcae export (metadata format "
                               f"{meta.get('format')!r}, expected {EXPORT_FORMAT!r}); make one with `clcae export`")
    config = json.loads(meta["config"])
    return ModelSource("export", uri, uri, meta.get("model_id") or Path(uri).stem, config)


def _read_export(uri: str, storage: StorageConfig | None) -> dict[str, torch.Tensor]:

    local = local_path(uri)
    if local is not None:
        return safetensors.torch.load_file(local)

    fs, path = filesystem(uri, storage)
    with fs.open(path, "rb") as fh:
        return safetensors.torch.load(fh.read())


# ------------------------------------------------------------------------------------------------ the merge
def prepare(spec: str | ModelSource, job: CLCAEConfig | Mapping[str, Any] | None = None,
            overrides: Sequence[str] = (), storage: StorageConfig | None = None) -> tuple[ModelSource, CLCAEConfig]:
    """Resolve ``spec`` and build the config to run it with: the model's sections + the job's settings (``job``;
    None = our checkpoint's own settings, without its direction files, else the defaults) + overrides.
    Checks that every file the load needs exists, so a missing one fails here, once."""
    if storage is None and isinstance(job, CLCAEConfig):
        storage = job.storage
    source = spec if isinstance(spec, ModelSource) else resolve(spec, storage)
    if job is None:
        # Directions are given at inference; a training run's direction files need not exist here.
        job = {k: v for k, v in source.config.items() if k != "directions"} if source.kind == "checkpoint" else None
    cfg = inference_config(source.config, job, overrides, source=source.name)
    check_files(source, cfg)
    return source, cfg


def check_files(source: ModelSource, cfg: CLCAEConfig) -> None:
    """MissingWeightsError naming each file the load will read that is not there."""
    if source.kind == "authors":
        gen = cfg.generator.checkpoint
        if not gen:
            raise MissingWeightsError(
                f"{source.name}: the authors' model file has no latent_avg; it comes from its StyleGAN2 file "
                f"({OFFICIAL['stylegan2-car' if cfg.generator.crop else 'stylegan2-ffhq'].filename}), which was not "
                f"found beside the model or in {_where()}. Put it there (`clcae weights fetch "
                f"{'stylegan2-car' if cfg.generator.crop else 'stylegan2-ffhq'}`) or set generator.checkpoint=PATH.")
        _must_exist(gen, "generator.checkpoint", cfg.storage)
    if cfg.model.average_image and source.kind != "export":
        _must_exist(cfg.model.average_image, "model.average_image", cfg.storage)


def _must_exist(uri: str, key: str, storage: StorageConfig) -> None:
    fs, path = filesystem(uri, storage)
    if not fs.isfile(path):
        raise MissingWeightsError(f"{key} = {uri}: file not found")


# ------------------------------------------------------------------------------------------------ loading
def load(source: ModelSource, cfg: CLCAEConfig):
    """Build the CLCAE network of ``cfg`` and load ``source``'s weights into it (one read of the file)."""

    payload, source.payload = source.payload, None  # used once; do not keep a second copy alive
    if source.kind == "export":
        state = _read_export(source.uri, cfg.storage)
        x_avg = state.pop("x_avg", None)
        model = build_clcae(cfg, load_pretrained=False, average_image=False)
        load_into(model, {k: v.float() for k, v in state.items()}, source.uri, "CLCAE inversion network",
                  allow_missing=("decoder.noises.",))
        set_average_image(model, cfg, x_avg)
        return model
    if payload is None:
        payload = read_state(source.uri)
    if source.kind == "checkpoint":
        model = build_clcae(cfg, load_pretrained=False, average_image=False)
        load_into(model, payload["state_dict"], source.uri, "CLCAE inversion network")
        set_average_image(model, cfg, payload.get("x_avg"))
        return model
    # The authors' file: the generator's weights are in it; only latent_avg comes from the generator file.
    gen_file = read_state(cfg.generator.checkpoint)
    if not isinstance(gen_file, Mapping) or "g_ema" not in gen_file:
        raise ModelSourceError(f"generator.checkpoint = {cfg.generator.checkpoint} is not a rosinality StyleGAN2 "
                               "file ({'g_ema', 'latent_avg'}); the authors' model needs its latent_avg")
    latent_avg = gen_file.get("latent_avg")
    model = build_clcae(cfg, load_pretrained=False, average_image=False)
    if latent_avg is not None:
        latent_avg = latent_avg.float().reshape(-1)[: cfg.generator.style_dim]
    load_official_inversion(source.uri, model, latent_avg, state=payload["state_dict"])  # sets G(latent_avg)
    if latent_avg is None:
        log.warning("%s has no latent_avg; using the mean of the mapping network over %d samples",
                    cfg.generator.checkpoint, cfg.generator.mean_latent_samples)
        model.latent_avg.copy_(model.decoder.mean_latent(cfg.generator.mean_latent_samples,
                                                         seed=cfg.generator.init_seed)[0])
        model.set_average_image()
    if cfg.model.average_image:
        set_average_image(model, cfg)
    return model


# ------------------------------------------------------------------------------------------------ export
def export(spec: str | ModelSource, out: str, dtype: str = "fp32", storage: StorageConfig | None = None,
           overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Write ``spec``'s model as one .safetensors file: the weights (fp32, or fp16 on request), x_avg, and the
    model-only config (no optimiser, no training paths, no direction files) in its metadata."""

    if dtype not in ("fp32", "fp16"):
        raise ConfigError(f"export dtype {dtype!r}: choose fp32 or fp16")
    source, cfg = prepare(spec, None, overrides, storage)
    model = load(source, cfg)
    cast = torch.float16 if dtype == "fp16" else torch.float32
    tensors = {k: (v.to(cast) if v.is_floating_point() else v).contiguous().clone()
               for k, v in model.state_dict().items()}
    tensors["x_avg"] = model.x_avg.to(cast).contiguous().clone()
    config = model_part(_plain(cfg))
    config["generator"]["checkpoint"] = None   # the generator's weights and latent_avg are in the file
    config["encoder"]["pretrained"] = None
    config["model"]["average_image"] = None    # x_avg is in the file
    config["name"] = cfg.name
    meta = {"format": EXPORT_FORMAT, "config": json.dumps(config), "model_id": source.model_id, "dtype": dtype,
            "source": source.name}
    data = safetensors.torch.save(tensors, metadata=meta)

    write_bytes(out, data, storage)
    return {"out": out, "bytes": len(data), "model_id": source.model_id, "dtype": dtype, "tensors": len(tensors)}


def _plain(cfg: CLCAEConfig) -> dict[str, Any]:
    return to_dict(cfg)
