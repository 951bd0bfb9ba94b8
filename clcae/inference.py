"""Inverter: images -> w, w+, f, reconstructions and edits.  The one inference object behind both the batch
job and Serve (one piece of code, two front doors).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from clcae import pretrained
from clcae.config import CLCAEConfig
from clcae.data.images import InputError, decode_image, pil_to_tensor
from clcae.device import DTYPES, autocast_context, keep_freed_memory, pick_device
from clcae.editing import DirectionRegistry, EditError, Edits
from clcae.factory import build_clcae, build_directions
from clcae.models.clcae import CLCAE
from clcae.models.stylegan2 import FEATURE_RES
from clcae.pretrained import ModelSource

log = logging.getLogger(__name__)


@dataclass
class Inversion:
    """Latents and reconstruction of a batch.  ``deltas`` (the encoder's residuals) and ``t3`` are what an edit
    in W needs to re-run the cross-attention blocks; ``g5`` = G5(w+) saves a generator prefix per edit."""

    w: torch.Tensor                        # (B, D)
    w_plus: torch.Tensor                   # (B, N, D)
    f: torch.Tensor | None                 # (B, C, 16, 16); None for a model without an F branch
    image: torch.Tensor                    # G(w+, f) (G(w+) without f), (B, 3, H, W) in [-1, 1] (unclamped)
    deltas: torch.Tensor | None = None     # (B, N, D)
    t3: torch.Tensor | None = None
    g5: torch.Tensor | None = None
    extra_images: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def select(self, rows: Sequence[int]) -> Inversion:
        """The inversion of some of the batch's images (``rows``, in that order)."""
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.w.device)

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, index)

        return Inversion(pick(self.w), pick(self.w_plus), pick(self.f), pick(self.image), pick(self.deltas),
                         pick(self.t3), pick(self.g5), {k: pick(v) for k, v in self.extra_images.items()})


# One batch's edits after DirectionRegistry.resolve: one list of (entry, strength) for the whole batch, or one per row
_Plan = list[tuple[Any, Any]]


class Inverter:
    """``precision`` (``infer.precision``): fp32 (exact), bf16 or fp16 under ``torch.autocast``; every tensor the
    Inverter returns is float32 whatever the mode.  ``compile`` (``infer.compile``): ``torch.compile`` the
    encoder and the generator's synthesis (the first call of each batch shape compiles)."""

    def __init__(self, model: CLCAE, directions: DirectionRegistry | None = None, device: str = "auto",
                 model_id: str = "unnamed", precision: str = "fp32", compile: bool = False):
        self.device = pick_device(device)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.model = model.to(self.device).eval().channels_last()
        self.model.requires_grad_(False)
        autocast_context(precision, self.device)  # refuse an unknown mode here, not on the first request
        self.precision = precision
        if precision != "fp32":
            lower_encoder_weights(self.model, DTYPES[precision])
        self.compiled = compile
        if compile:
            compile_model(self.model)
        self.directions = directions or DirectionRegistry({})
        self.model_id = model_id
        self.input_size: tuple[int, int] = tuple(model.encoder.input_size)
        # the image every inversion returns: G(w+, f), or G(w+) for a model without an F branch
        self.main_output = "f" if model.encoder.has_feature else "w_plus"

    # ------------------------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: CLCAEConfig, device: str | None = None) -> Inverter:
        """The config's own model: its generator (real or seeded) and a randomly initialised encoder."""
        return cls(build_clcae(cfg), build_directions(cfg), device or cfg.device, f"{cfg.name}:random-init",
                   cfg.infer.precision, cfg.infer.compile)

    @classmethod
    def from_pretrained(cls, model: str | ModelSource, config: CLCAEConfig | None = None,
                        overrides: Sequence[str] = (), device: str | None = None) -> Inverter:
        """Any model a user brings (``clcae.pretrained``): a registry name (``clcae-ffhq``), the authors' file, our
        checkpoint or run directory, an exported model.  ``config`` supplies the job's settings (directions,
        device, ...); the architecture always comes from the model."""
        source, cfg = pretrained.prepare(model, config, overrides)
        return cls.load(source, cfg, device)

    @classmethod
    def load(cls, source: ModelSource, cfg: CLCAEConfig, device: str | None = None) -> Inverter:
        """A source already resolved with :func:`clcae.pretrained.prepare` (actors and replicas get it so)."""
        return cls(pretrained.load(source, cfg), build_directions(cfg), device or cfg.device, source.model_id,
                   cfg.infer.precision, cfg.infer.compile)

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
    def arithmetic(self) -> contextlib.AbstractContextManager[Any]:
        """The one place ``infer.precision`` takes effect: every model call of the Inverter runs inside it."""
        return autocast_context(self.precision, self.device)

    @torch.inference_mode()
    def invert(self, images: Any, extra_outputs: Sequence[str] = ()) -> Inversion:
        """Invert a batch.  ``extra_outputs`` may ask for "w" (G(w)) and "w_plus" (G(w+)) as well."""
        x = self.preprocess(images).to(self.device)
        m = self.model
        outputs = (self.main_output, *[o for o in extra_outputs if o != self.main_output])
        with self.arithmetic():
            w, w_plus, f, feats = m.latents(x)
            rendered = m.render(w, w_plus, f, outputs)
        images_out = rendered.images
        extra = {k: _f32(v) for k, v in images_out.items() if k != self.main_output}
        return Inversion(_f32(w), _f32(w_plus), _f32(f), _f32(images_out[self.main_output]), _f32(feats.deltas),
                         _f32(feats.t3), _f32(rendered.g5), extra)

    @torch.inference_mode()
    def edit(self, inversion: Inversion, edits: Edits | None = None, *, per_image: Sequence[Edits] | None = None,
             checked: bool = False) -> torch.Tensor:
        """G(w^+, f^) for the named edits.  InterFaceGAN moves w before the cross-attention blocks (so w+ and f
        follow, and the edited w is block 0's key/value, as the authors do); GANSpace moves w+; then
        f^ = f(w^) + G5(w^+) - G5(w+) (Eq. 6).  Without an F branch: G(w^+).  One generator pass (the
        inversion's G5(w+) is reused).

        ``edits`` applies to every image; ``per_image`` gives one Edits per image instead (Serve batches requests
        with different edits).  Every edit is checked before any model work unless ``checked`` (the caller
        already checked them against these directions, as Serve's ingress does).

        Without ``deltas``/``t3`` (latents that came back from a client) w-space edits are applied to every
        layer of w+ and f is kept: the FS-style edit.
        """
        return self._edit(inversion, self._plans(edits, per_image, inversion.w.shape[0], checked))

    @torch.inference_mode()
    def invert_and_edit(self, images: Any, edits: Edits | None = None, *,
                        per_image: Sequence[Edits | None] | None = None, checked: bool = False
                        ) -> tuple[Inversion, torch.Tensor | None]:
        """Invert a batch and edit it in one call: exactly :meth:`invert` then :meth:`edit`, two generator passes
        (the reconstruction's and the edit's), with the encoder's T3 and residuals at hand, so w+ and f follow
        a w-space edit.  Serve's upload edits run this in the inversion replica.

        ``per_image``: one Edits per image, or None for an image that is only inverted (a Serve batch mixes
        inversions and edits); the edited images are then those of the rows with edits, in order.  Returns
        (the inversion of every image, the edited images or None when no image is edited).
        """
        x = self.preprocess(images)
        batch = x.shape[0]
        if per_image is not None and len(per_image) != batch:
            raise EditError(f"per_image has {len(per_image)} entries for {batch} images: one per image")
        rows = range(batch) if per_image is None else [i for i, e in enumerate(per_image) if e is not None]
        plans = self._plans(edits, None if per_image is None else [per_image[i] for i in rows], len(rows), checked)
        inversion = self.invert(x)  # only after every edit was checked: a bad request costs no model work
        if not rows:
            return inversion, None
        part = inversion if len(rows) == batch else inversion.select(rows)
        return inversion, self._edit(part, plans)

    def _plans(self, edits: Edits | None, per_image: Sequence[Edits] | None, batch: int, checked: bool
               ) -> list[_Plan]:
        """Resolved edits: [one plan for the batch] or one plan per row; every one is checked first."""
        if (edits is None) == (per_image is None):
            raise EditError("give either edits (for every image) or per_image (one per image)")
        if per_image is None:
            return [self.directions.resolve(edits, check=not checked)]
        if len(per_image) != batch:
            raise EditError(f"per_image has {len(per_image)} entries for {batch} images: one per image")
        return [self.directions.resolve(e, check=not checked) for e in per_image]

    def _apply(self, latent: torch.Tensor, plans: list[_Plan], acts_on: str) -> torch.Tensor:
        if len(plans) == 1:
            return self.directions.apply_resolved(latent, plans[0], acts_on)
        # row by row: latent arithmetic only (elementwise, so each row is what a batch-wide edit would give)
        return torch.cat([self.directions.apply_resolved(latent[i:i + 1], p, acts_on) for i, p in enumerate(plans)])

    def _edit(self, inversion: Inversion, plans: list[_Plan]) -> torch.Tensor:
        m = self.model
        # deltas[:, 0] is the encoder's own w offset: recomputing it as w - latent_avg would not be bit-exact.
        w_off = inversion.deltas[:, 0] if inversion.deltas is not None else inversion.w - m.latent_avg
        w_off_edit = self._apply(w_off, plans, "w")
        f_edit = None
        if inversion.deltas is not None:
            with self.arithmetic():
                _, w_plus_edit, f_edit = m.heads(w_off_edit, inversion.deltas, inversion.t3)
        else:
            w_plus_edit = inversion.w_plus + (w_off_edit - w_off)[:, None]
        w_plus_edit = self._apply(w_plus_edit, plans, "w_plus")
        with self.arithmetic():
            if inversion.f is None:
                return _f32(m.render(w_plus_edit, w_plus_edit, None, ("w_plus",)).images["w_plus"])
            return _f32(m.edited_images(inversion.w_plus, inversion.f, w_plus_edit, f_edit, g5=inversion.g5))

    def latents_to_inversion(self, w: torch.Tensor, w_plus: torch.Tensor, f: torch.Tensor | None,
                             deltas: torch.Tensor | None = None) -> Inversion:
        """Wrap client-supplied latents, validating their shapes, for :meth:`edit`.  With the encoder's
        residuals (``deltas``), w-space edits re-run the W+ attention; without, they shift every layer of w+.
        ``f`` is required exactly when the model has an F branch."""
        g = self.model.decoder
        d, n = g.style_dim, g.n_latent
        c, r = g.feature_channels, FEATURE_RES
        has_f = self.model.encoder.has_feature
        if has_f and f is None:
            raise InputError(f"f is required: this model renders G(w+, f) (shape (B, {c}, {r}, {r}))")
        if not has_f and f is not None:
            raise InputError("this model has no F branch: send w and w_plus without f")
        checks = [("w", w, (d,)), ("w_plus", w_plus, (n, d))]
        if f is not None:
            checks.append(("f", f, (c, r, r)))
        if deltas is not None:
            checks.append(("deltas", deltas, (n, d)))
        for name, t, shape in checks:
            if t.ndim != len(shape) + 1 or tuple(t.shape[1:]) != shape:
                raise InputError(f"{name} must have shape (B, {', '.join(map(str, shape))}), got {tuple(t.shape)}")
            if t.shape[0] != w.shape[0]:
                raise InputError(f"{name} has {t.shape[0]} rows but w has {w.shape[0]}: one row per image")
            if not torch.isfinite(t).all():
                raise InputError(f"{name} contains NaN or infinite values")
        dev = self.device
        w, w_plus = w.to(dev).float(), w_plus.to(dev).float()
        f = f.to(dev).float() if f is not None else None
        deltas = deltas.to(dev).float() if deltas is not None else None
        with torch.inference_mode(), self.arithmetic():
            rendered = self.model.render(w, w_plus, f, (self.main_output,))
        return Inversion(w, w_plus, f, _f32(rendered.images[self.main_output]), deltas=deltas, g5=_f32(rendered.g5))


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    """Float32, standard layout, out of the Inverter whatever the precision mode and layout (a no-op in fp32
    NCHW)."""
    return t.float().contiguous() if t is not None and t.is_floating_point() else t


def lower_encoder_weights(model: CLCAE, dtype: torch.dtype) -> None:
    """Store the encoder's convolution and linear weights in ``dtype``, once.

    Autocast casts float32 weights on every call (its cache lives for one autocast region and only holds weights
    that require grad): for IR-SE50 + 17 map2style blocks that is about 1 GB copied per call, measured as 29% of
    a bf16 inversion.  Normalisation layers keep float32 parameters (their kernels take low-precision inputs with
    float32 statistics), and the generator is untouched (its style, demodulation and mapping stay float32).
    The model then needs the Inverter's autocast context: a float32 input would not match the weights.
    """
    for module in model.encoder.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.to(dtype)


def compile_model(model: CLCAE) -> None:
    """``torch.compile`` what the Inverter calls, in place: the encoder (``nn.Module.compile``, so the state_dict
    keeps its keys) and the generator's prefix and suffix.  Shapes are specialised per batch size at first and
    made dynamic by torch when a second size arrives (Serve's dynamic batching)."""
    model.encoder.compile()
    g = model.decoder
    g.synthesis_prefix = torch.compile(g.synthesis_prefix)
    g.synthesis_suffix = torch.compile(g.synthesis_suffix)
