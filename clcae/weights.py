"""Reading weights files safely and loading them into our modules: the third-party formats (rosinality
StyleGAN2, TreB1eN IR-SE50, the authors' CLCAE releases) with the key mappings written down.  Where each
official file comes from is ``clcae.official``; our own checkpoint format is ``clcae.checkpoints``.

Key mapping, authors' files -> our modules
------------------------------------------
* ``stylegan2-*-config-f.pt`` ``{'g_ema': ..., 'latent_avg': (512,)}``: ``g_ema.*`` -> ``Generator.*``
  (identical keys, strict).  Missing ``latent_avg`` -> ``Generator.mean_latent(generator.mean_latent_samples)``.
  Missing ``noises.*`` (old rosinality checkpoints) -> our seeded noise buffers, with a warning.
* ``model_ir_se50.pth`` (TreB1eN): ``input_layer.*``, ``body.*`` -> ``CLCAE.encoder.*`` (non-strict, as pSp
  does: the recognition head ``output_layer.*`` has no counterpart); the whole file -> ``IRSEBackbone``
  (strict) for the ID loss.
* Authors' inversion checkpoint ``{'state_dict': AFPSP.state_dict(), 'opts', ...}``: ``encoder.*`` ->
  ``CLCAE.encoder.*`` and ``decoder.*`` -> ``CLCAE.decoder.*`` (identical keys); ``latent_avg`` is not in it
  and comes from the generator file, as in their code.
* Authors' ``best_model_image.pt`` ``{'state_dict', 'opts'}``: ``encoder.{input_layer,body,styles.0}.*`` ->
  ``image_encoder.encoder.*``; ``encoder.latlayer{1,2}.*`` -> same (unused by the image branch);
  ``image_projection.*`` -> ``image_encoder.image_projection.*``; ``logit_scale`` -> ``logit_scale``.
* Authors' ``best_model_latent.pt``: ``pos_embedding`` -> ``latent_encoder.pos_embedding``;
  ``coarse.*``/``medium.*``/``fine.*`` -> ``latent_encoder.layers.{0,1,2}.*``;
  ``latent_projection.*`` -> ``latent_encoder.latent_projection.*``.

Everything is read with ``torch.load(..., weights_only=True)``; rosinality training checkpoints carry an
``argparse.Namespace``, which is allow-listed explicitly rather than falling back to full unpickling.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import fsspec
import torch
from torch import nn

from clcae.errors import CLCAEError
from clcae.models.stylegan2 import Generator
from clcae.official import where_from

log = logging.getLogger(__name__)

class WeightsError(CLCAEError, ValueError):
    """A weights file is unreadable or does not match the module it is loaded into."""


class MissingWeightsError(WeightsError, FileNotFoundError):
    """A weights file does not exist."""


# ------------------------------------------------------------------------------------------ reading
def read_state(path: str | os.PathLike, extra_safe_globals: Iterable[Any] = (), source: str | None = None) -> Any:
    """torch.load(weights_only=True) from a local path or any fsspec URI, with errors that name the file
    and where the official one comes from (``source``, else guessed from the file name).

    Local files are memory-mapped: only the tensors a caller touches are read, so taking the model out of a
    training checkpoint does not read its optimiser state (several GB at the paper's size)."""
    path = str(path)
    local = local_path(path)
    try:
        if local is not None:
            if not os.path.isfile(local):
                raise FileNotFoundError(local)
            data: Any = None
        else:
            with fsspec.open(path, "rb") as fh:
                data = fh.read()
    except FileNotFoundError:
        raise MissingWeightsError(f"weights file not found: {path}.{where_from(path, source)}") from None
    except Exception as exc:  # noqa: BLE001 - storage errors come in many types; all get the path attached
        raise WeightsError(f"cannot read weights file {path}: {exc}") from exc
    try:
        with torch.serialization.safe_globals([argparse.Namespace, *extra_safe_globals]):
            if data is not None:
                return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            try:
                return torch.load(local, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                # files in torch's legacy (pre-1.6, non-zip) format cannot be memory-mapped
                return torch.load(local, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})."
                           f"{where_from(path, source)}") from exc


def local_path(uri: str) -> str | None:
    """The local file system path of a plain path or file:// URI; None for remote URIs (s3://, gs://, ...)."""
    if uri.startswith("file://"):
        return uri[len("file://"):]
    return None if "://" in uri else uri


def _summarise(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], path: str, what: str,
              strict: bool = True, allow_missing: Iterable[str] = (), source: str | None = None
              ) -> tuple[list[str], list[str]]:
    """load_state_dict with a WeightsError naming the file, missing/unexpected keys and shape mismatches."""
    own = module.state_dict()
    allow = tuple(allow_missing)
    absent = [k for k in own if k not in state]
    missing = [k for k in absent if not k.startswith(allow)]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if mismatched or (strict and (missing or unexpected)):
        parts = [f"{path} does not match the {what}:"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_summarise(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_summarise(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {_summarise(mismatched, 4)}")
        raise WeightsError("\n  ".join(parts) + "\n " + where_from(path, source))
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return absent, unexpected  # absent includes the allowed-missing keys, so callers can warn about them


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with fsspec.open(str(path), "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ generator
def save_rosinality(path: str | os.PathLike, generator: nn.Module, latent_avg: torch.Tensor | None) -> None:
    """Write a generator in the layout of rosinality's convert_weight.py: {'g_ema', 'latent_avg'}."""
    state = {"g_ema": generator.state_dict()}
    if latent_avg is not None:
        state["latent_avg"] = latent_avg.reshape(-1)
    with fsspec.open(str(path), "wb") as fh:
        torch.save(state, fh)


def load_generator(path: str, cfg: Any):
    """A rosinality ``.pt`` -> (Generator, latent_avg (D,)) for ``cfg.generator``'s architecture."""
    g = cfg.generator
    ckpt = read_state(path)
    if not isinstance(ckpt, Mapping) or "g_ema" not in ckpt:
        keys = list(ckpt)[:8] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise WeightsError(f"{path} is not a rosinality StyleGAN2 checkpoint (no 'g_ema'; found {keys})."
                           f"{where_from(path)}")
    gen = Generator(g.size, g.style_dim, g.n_mlp, g.channel_multiplier, lr_mlp=g.lr_mlp, channel_max=g.channel_max)
    state = ckpt["g_ema"]
    try:
        missing, _ = load_into(gen, state, path, f"StyleGAN2 generator (size {g.size}, channel_multiplier "
                               f"{g.channel_multiplier})", allow_missing=("noises.",))
    except WeightsError as exc:
        raise WeightsError(f"{exc}\n {_generator_hint(state, g)}") from None
    if missing:
        log.warning("%s has no noise buffers (old rosinality checkpoint); using seeded random noise maps", path)
    gen.requires_grad_(False).eval()
    if "latent_avg" in ckpt:
        latent_avg = ckpt["latent_avg"].float().reshape(-1)[: g.style_dim]
    else:
        log.warning("%s has no latent_avg; using the mean of the mapping network over %d samples",
                    path, g.mean_latent_samples)
        latent_avg = gen.mean_latent(g.mean_latent_samples, seed=g.init_seed)[0]
    return gen, latent_avg


def _generator_hint(state: Mapping[str, torch.Tensor], g: Any) -> str:
    """Guess the architecture a generator state_dict was saved with, to turn a key dump into advice."""
    n_rgb = len({k.split(".")[1] for k in state if k.startswith("to_rgbs.")})
    size = 2 ** (n_rgb + 2) if n_rgb else None
    hint = []
    if size and size != g.size:
        hint.append(f"generator.size={size}")
    last_conv = f"convs.{2 * n_rgb - 1}.conv.weight"
    if size and last_conv in state and size >= 64:
        ch = state[last_conv].shape[1]
        base = {64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}[size]
        if ch % base == 0 and ch // base != g.channel_multiplier:
            hint.append(f"generator.channel_multiplier={ch // base}")
    return f"The file looks like it needs: {' '.join(hint)}" if hint else "Check generator.size/channel_multiplier."


# ------------------------------------------------------------------------------------------ IR-SE
def load_irse_into_encoder(path: str, encoder: nn.Module) -> int:
    """Initialise ``input_layer``/``body`` from TreB1eN ``model_ir_se50.pth`` (non-strict, as pSp)."""
    state = read_state(path)
    own = encoder.state_dict()
    usable = {k: v for k, v in state.items() if k.startswith(("input_layer.", "body.")) and k in own}
    wrong = [k for k, v in usable.items() if tuple(v.shape) != tuple(own[k].shape)]
    if not usable or wrong:
        raise WeightsError(f"{path} does not fit the encoder backbone: {len(usable)} matching keys, shape "
                           f"mismatches: {_summarise(wrong, 4) or 'none'}. Expected an IR-SE file in TreB1eN layout "
                           f"for backbone of this depth.{where_from(path)}")
    encoder.load_state_dict(usable, strict=False)
    log.info("encoder: loaded %d backbone tensors from %s", len(usable), path)
    return len(usable)


def load_arcface(path: str, network: nn.Module) -> None:
    load_into(network, read_state(path), path, "ArcFace IR-SE backbone", strict=True)


# ------------------------------------------------------------------------------------------ authors' CLCAE
def _state_of(ckpt: Any, path: str) -> Mapping[str, torch.Tensor]:
    if isinstance(ckpt, Mapping) and "state_dict" in ckpt:
        return ckpt["state_dict"]
    raise WeightsError(f"{path} is not a CLCAE/pSp-style checkpoint (expected a dict with 'state_dict')."
                       f"{where_from(path)}")


def load_official_inversion(path: str, model: nn.Module, latent_avg: torch.Tensor | None = None,
                            state: Mapping[str, torch.Tensor] | None = None) -> None:
    """The authors' ``{'state_dict': encoder.*/decoder.*, 'opts'}`` onto a ``CLCAE`` (identical keys);
    ``state`` = its state_dict when the caller has already read the file."""
    state = dict(_state_of(read_state(path), path) if state is None else state)
    if latent_avg is not None:
        state["latent_avg"] = latent_avg.reshape(-1)
    else:
        state.setdefault("latent_avg", model.latent_avg)
    load_into(model, state, path, "CLCAE inversion network", strict=True, allow_missing=("decoder.noises.",))
    # x_avg = G(latent_avg) follows the weights just loaded (a file given as model.average_image replaces it)
    model.set_average_image()


CONTRASTIVE_LATENT_RENAMES = {"coarse.": "layers.0.", "medium.": "layers.1.", "fine.": "layers.2."}


def map_official_contrastive(image_state: Mapping[str, torch.Tensor],
                             latent_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The two authors' contrastive state_dicts -> one ``ContrastiveAligner`` state_dict (see module doc)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in image_state.items():
        out["logit_scale" if k == "logit_scale" else f"image_encoder.{k}"] = v
    for k, v in latent_state.items():
        for old, new in CONTRASTIVE_LATENT_RENAMES.items():
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[f"latent_encoder.{k}"] = v
    return out


def load_official_contrastive(image_path: str, latent_path: str, aligner: nn.Module) -> None:
    state = map_official_contrastive(_state_of(read_state(image_path), image_path),
                                     _state_of(read_state(latent_path), latent_path))
    # The averages are not in the authors' files: they come from the generator (x_avg = G(latent_avg)).
    load_into(aligner, state, f"{image_path} + {latent_path}", "contrastive module", strict=True,
              allow_missing=("image_avg", "latent_avg"))


def init_encoder_from_contrastive(aligner: nn.Module, model: nn.Module) -> int:
    """Stage-2 init: copy the stage-1 image encoder (input_layer, body, styles.0, latlayers) into the CLCAE
    encoder — what the authors' ``load_weights`` intends but, reading the wrapped file, never does."""
    src = aligner.image_encoder.encoder.state_dict()
    own = model.encoder.state_dict()
    shared = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
    model.encoder.load_state_dict(shared, strict=False)
    return len(shared)
