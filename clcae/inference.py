"""Inverter: images -> w, w+, f, reconstructions and edits.  The one inference object behind both the batch
job and Serve (one piece of code, two front doors).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from clcae.config import CLCAEConfig, from_dict
from clcae.data.images import InputError, decode_image, pil_to_tensor
from clcae.editing import DirectionRegistry, Edits
from clcae.factory import build_clcae
from clcae.models.clcae import CLCAE

log = logging.getLogger(__name__)

def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class Inversion:
    """Latents and reconstruction of a batch.  ``deltas`` (the encoder's residuals) and ``t3`` are what an edit
    in W needs to re-run the cross-attention blocks; ``g5`` = G5(w+) saves a generator prefix per edit."""

    w: torch.Tensor                        # (B, D)
    w_plus: torch.Tensor                   # (B, N, D)
    f: torch.Tensor                        # (B, C, 16, 16)
    image: torch.Tensor                    # G(w+, f), (B, 3, H, W) in [-1, 1] (unclamped)
    deltas: torch.Tensor | None = None     # (B, N, D)
    t3: torch.Tensor | None = None
    g5: torch.Tensor | None = None
    extra_images: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def cpu(self) -> Inversion:
        moved = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        moved["extra_images"] = {k: v.cpu() for k, v in self.extra_images.items()}
        return Inversion(**moved)


class Inverter:
    def __init__(self, model: CLCAE, directions: DirectionRegistry | None = None, device: str = "auto",
                 model_id: str = "unnamed"):
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.model.requires_grad_(False)
        self.directions = directions or DirectionRegistry({})
        self.model_id = model_id
        self.input_size: tuple[int, int] = tuple(model.encoder.input_size)

    # ------------------------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: CLCAEConfig, checkpoint: str | None = None, device: str | None = None) -> Inverter:
        """A model from config (real or seeded generator); ``checkpoint`` = our stage-2 checkpoint."""
        model = build_clcae(cfg, load_pretrained=checkpoint is None)
        model_id = f"{cfg.name}:random-init"
        if checkpoint is not None:
            from clcae.weights import load_into, read_checkpoint

            ckpt = read_checkpoint(checkpoint, kind="inversion")
            load_into(model, ckpt["state_dict"], checkpoint, "CLCAE inversion network")
            model_id = str(ckpt.get("model_id") or f"{cfg.name}:{checkpoint}")
        return cls(model, directions_from_config(cfg), device or cfg.device, model_id)

    @classmethod
    def from_checkpoint(cls, checkpoint: str, overrides: Sequence[str] = (), device: str | None = None) -> Inverter:
        """Everything from our checkpoint: the config stored in it (plus overrides) and the weights."""
        from clcae.weights import read_checkpoint

        stored = read_checkpoint(checkpoint, kind="inversion")["config"]
        cfg = from_dict(merge_overrides(stored, overrides))
        return cls.from_config(cfg, checkpoint, device)

    # ------------------------------------------------------------------------------------ pre/post
    def preprocess(self, images: Sequence[Image.Image | np.ndarray | bytes] | torch.Tensor) -> torch.Tensor:
        """PIL images / HxWx3 uint8 arrays / encoded bytes -> (B, 3, H, W) in [-1, 1] at the input size."""
        if isinstance(images, torch.Tensor):
            return self._check_tensor(images)
        tensors = [pil_to_tensor(decode_image(im) if isinstance(im, bytes) else im, self.input_size)
                   for im in images]
        if not tensors:
            raise InputError("no images given")
        return torch.stack(tensors)

    def _check_tensor(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputError(f"expected a (B, 3, H, W) tensor in [-1, 1], got shape {tuple(x.shape)}")
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x.float(), size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
        return x.float()

    # ------------------------------------------------------------------------------------ inversion
    @torch.inference_mode()
    def invert(self, images: Any, extra_outputs: Sequence[str] = ()) -> Inversion:
        """Invert a batch.  ``extra_outputs`` may ask for "w" (G(w)) and "w_plus" (G(w+)) as well."""
        x = self.preprocess(images).to(self.device)
        m = self.model
        feats = m.encoder.features(x)
        w, w_plus, f = m.heads(feats.w_offset, feats.deltas, feats.t3)
        outputs = ("f", *[o for o in extra_outputs if o != "f"])
        holder = _G5Holder()
        images_out = m.render(w, w_plus, f, outputs, out=holder)
        extra = {k: v for k, v in images_out.items() if k != "f"}
        return Inversion(w, w_plus, f, images_out["f"], feats.deltas, feats.t3, holder.g5, extra)

    @torch.inference_mode()
    def edit(self, inversion: Inversion, edits: Edits) -> torch.Tensor:
        """G(w^+, f^) for the named edits.  InterFaceGAN moves w before the cross-attention blocks (so w+ and f
        follow, as the authors do); GANSpace moves w+; then f^ = f(w^) + G5(w^+) - G5(w+) (Eq. 6).

        Without ``deltas``/``t3`` (latents that came back from a client) w-space edits are applied to every
        layer of w+ and f is kept: the FS-style edit.
        """
        m = self.model
        self.directions._validated(edits)  # fail before any model work
        # deltas[:, 0] is the encoder's own w offset: recomputing it as w - latent_avg would not be bit-exact.
        w_off = inversion.deltas[:, 0] if inversion.deltas is not None else inversion.w - m.latent_avg
        w_off_edit = self.directions.apply_to_w(w_off, edits)
        f_edit = None
        if inversion.deltas is not None:
            _, w_plus_edit, f_edit = m.heads(w_off_edit, inversion.deltas, inversion.t3)
            if f_edit is None:
                f_edit = inversion.f
        else:
            w_plus_edit = inversion.w_plus + (w_off_edit - w_off)[:, None]
        w_plus_edit = self.directions.apply_to_w_plus(w_plus_edit, edits)
        return m.edited_images(inversion.w_plus, inversion.f, w_plus_edit, f_edit, g5=inversion.g5)

    def latents_to_inversion(self, w: torch.Tensor, w_plus: torch.Tensor, f: torch.Tensor,
                             deltas: torch.Tensor | None = None) -> Inversion:
        """Wrap client-supplied latents, validating their shapes, for :meth:`edit`.  With the encoder's
        residuals (``deltas``), w-space edits re-run the W+ attention; without, they shift every layer of w+."""
        g = self.model.decoder
        d, n = g.style_dim, g.n_latent
        c = g.feature_channels
        checks = [("w", w, (d,)), ("w_plus", w_plus, (n, d)), ("f", f, (c, 16, 16))]
        if deltas is not None:
            checks.append(("deltas", deltas, (n, d)))
        for name, t, shape in checks:
            if t.ndim != len(shape) + 1 or tuple(t.shape[1:]) != shape:
                raise InputError(f"{name} must have shape (B, {', '.join(map(str, shape))}), got {tuple(t.shape)}")
            if not torch.isfinite(t).all():
                raise InputError(f"{name} contains NaN or infinite values")
        dev = self.device
        w, w_plus, f = w.to(dev).float(), w_plus.to(dev).float(), f.to(dev).float()
        deltas = deltas.to(dev).float() if deltas is not None else None
        holder = _G5Holder()
        with torch.inference_mode():
            image = self.model.render(w, w_plus, f, ("f",), out=holder)["f"]
        return Inversion(w, w_plus, f, image, deltas=deltas, g5=holder.g5)


class _G5Holder:
    g5: torch.Tensor | None = None


def directions_from_config(cfg: CLCAEConfig) -> DirectionRegistry:
    spec = {name: {k: v for k, v in dataclasses.asdict(d).items() if v is not None}
            for name, d in cfg.directions.items()}
    return DirectionRegistry.from_config(spec, style_dim=cfg.generator.style_dim)


def merge_overrides(stored: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A stored config dict with ``key=value`` overrides applied (validated by ``from_dict``)."""
    from omegaconf import OmegaConf

    if not overrides:
        return dict(stored)
    merged = OmegaConf.merge(OmegaConf.create(dict(stored)), OmegaConf.from_dotlist(list(overrides)))
    return OmegaConf.to_container(merged)
