"""The CLCAE inversion network: encoder (w, W+ and F cross-attention) + frozen StyleGAN2 generator.

Outputs for an input image x: w (B, D), w+ (B, N, D), f (B, C, 16, 16) and the reconstructions G(w),
G(w+), G(w+, f), pooled to the input resolution.  With a baseline encoder (pSp, e4e: no F branch) f is None
and there is no G(w+, f).  The three reconstructions share the generator prefix up to
``convs.3``: it runs once for w and w+ together, and the suffix runs once on the stacked features.

State-dict layout equals the authors' ``AFPSP`` (``encoder.*`` + ``decoder.*``) plus our ``latent_avg``
buffer, which their checkpoints lack (they re-read it from the generator file on every load).

Input centring: the encoder sees ``x - x_avg``, where ``x_avg`` = G(latent_avg) at the input size (or the
authors' ``image_avg.png``), exactly as the authors' ``AFPSP.forward`` does (``self.encoder(x - x_avg)``) and as
the contrastive image encoder does.  ``center_input=False`` is the convention of checkpoints trained before this
was matched; they keep it so their outputs do not change.  ``x_avg`` is a function of the generator and
``latent_avg`` (or of a file), so it is not part of the state_dict: loaders call :meth:`CLCAE.set_average_image`
once the weights are in place.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from clcae.models.encoder import CLCAEEncoder, EncoderOutput, PSPEncoder
from clcae.models.stylegan2 import Generator, blend_feature

OUTPUTS = ("w", "w_plus", "f")


@dataclass
class InversionOutput:
    w: torch.Tensor                       # (B, D) absolute latent (latent_avg + offset)
    w_plus: torch.Tensor                  # (B, N, D)
    f: torch.Tensor | None                # (B, C, 16, 16)
    g5: torch.Tensor | None = None        # (B, C, 16, 16) = G5(w+), for the feature regulariser
    image_w: torch.Tensor | None = None   # G(w), at the input resolution
    image_w_plus: torch.Tensor | None = None   # G(w+)
    image_f: torch.Tensor | None = None        # G(w+, f)
    deltas: torch.Tensor | None = None    # (B, N, D) encoder residuals, reused by w-space edits


@dataclass(frozen=True)
class Rendered:
    """What :meth:`CLCAE.render` returns: the requested reconstructions at the input resolution, by output name
    ("w", "w_plus", "f"), and G5(w+) (the feature entering ``convs.4``), which the prefix pass computed anyway:
    the feature regulariser and Eq. 6 edits reuse it."""

    images: dict[str, torch.Tensor]
    g5: torch.Tensor                      # (B, C, 16, 16) = G5(w+)


def crop_and_pool(images: torch.Tensor, crop: tuple[int, int, int, int] | None, size: tuple[int, int]
                  ) -> torch.Tensor:
    """Crop (cars: the car rows of the 512 output) and average-pool generator output to the encoder's input
    size (pSp's face_pool)."""
    if crop is not None:
        top, bottom, left, right = crop
        images = images[:, :, top:bottom, left:right]
    if tuple(images.shape[-2:]) != tuple(size):
        images = F.adaptive_avg_pool2d(images, tuple(size))
    return images


class CLCAE(nn.Module):
    def __init__(self, encoder: CLCAEEncoder | PSPEncoder, decoder: Generator, latent_avg: torch.Tensor | None = None,
                 crop: tuple[int, int, int, int] | None = None, center_input: bool = True):
        super().__init__()
        if encoder.n_latent != decoder.n_latent or encoder.style_dim != decoder.style_dim:
            raise ValueError(f"encoder predicts {encoder.n_latent}x{encoder.style_dim} latents but the generator "
                             f"takes {decoder.n_latent}x{decoder.style_dim}")
        self.encoder = encoder
        self.decoder = decoder
        self.decoder.requires_grad_(False)
        if latent_avg is None:
            latent_avg = torch.zeros(decoder.style_dim)
        self.register_buffer("latent_avg", latent_avg.detach().reshape(decoder.style_dim).clone())
        self.crop = tuple(crop) if crop is not None else None
        self.center_input = center_input
        h, w = encoder.input_size
        # Not persistent: derived from the generator and latent_avg (or read from a file) by set_average_image.
        self.register_buffer("x_avg", torch.zeros(1, 3, h, w), persistent=False)
        # what forward() renders by default: every reconstruction this encoder has
        self.outputs = OUTPUTS if encoder.has_feature else ("w", "w_plus")
        self.input_format = torch.contiguous_format  # see channels_last()

    def channels_last(self) -> CLCAE:
        """Run the encoder on channels-last activations and weights (the generator always does, internally).

        Measured on a 2-core AVX-512 CPU, IR-SE50 at 256x256, batch 1: 0.91x the time in float32 and 0.40x
        (against 0.64x in NCHW) under bf16 autocast, whose oneDNN kernels want NHWC.  Same state_dict keys
        and values; outputs equal to float32 rounding (1e-6 here).  The Inverter turns it on.
        """
        self.encoder.to(memory_format=torch.channels_last)
        self.input_format = torch.channels_last
        return self

    def train(self, mode: bool = True) -> CLCAE:
        super().train(mode)
        self.decoder.eval()  # frozen: never in training mode
        return self

    # ----------------------------------------------------------------------------------------- helpers
    def to_input_resolution(self, images: torch.Tensor) -> torch.Tensor:
        return crop_and_pool(images, self.crop, self.encoder.input_size)

    @torch.no_grad()
    def average_image(self) -> torch.Tensor:
        """G(latent_avg) at the encoder's input resolution, (1, 3, H, W) (the authors' ``image_avg.png``)."""
        g = self.decoder
        return self.to_input_resolution(g.synthesis(g.broadcast(self.latent_avg[None])))

    @torch.no_grad()
    def set_average_image(self, image: torch.Tensor | None = None) -> None:
        """Set x_avg: ``image`` (e.g. the authors' average-image file at the input size), else G(latent_avg)."""
        image = self.average_image() if image is None else image
        if tuple(image.shape[-3:]) != tuple(self.x_avg.shape[-3:]):
            raise ValueError(f"average image has shape {tuple(image.shape)}; the encoder input needs "
                             f"(1, 3, {self.x_avg.shape[-2]}, {self.x_avg.shape[-1]})")
        self.x_avg.copy_(image.reshape(self.x_avg.shape))

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the encoder sees: ``x - x_avg`` (the authors' convention), or ``x`` for older checkpoints."""
        self.encoder.check_input(x)
        x = x - self.x_avg if self.center_input else x
        return x.contiguous(memory_format=self.input_format)

    def latents(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, EncoderOutput]:
        """Absolute w (B, D), w+ (B, N, D), f (None without an F branch) and the encoder intermediates."""
        w_off, w_plus_off, f, feats = self.encoder(self.encoder_input(x))
        return self.latent_avg + w_off, self.latent_avg + w_plus_off, f, feats

    def heads(self, w_offset: torch.Tensor, deltas: torch.Tensor, t3: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Re-run the cross-attention blocks for a (possibly edited) w offset: absolute (w, w+, f or None).

        Editing in W happens here, before the blocks, so w+ and f follow the edit, and the edited w is also
        block 0's key/value (the authors' ``_forward_to_latent`` with ``edit_offset``).
        """
        w_plus = self.latent_avg + self.encoder.w_plus_offset(w_offset, deltas)
        f = self.encoder.feature(t3, w_offset) if t3 is not None else None
        return self.latent_avg + w_offset, w_plus, f

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, outputs: Collection[str] | None = None, f_blend: float = 1.0
                ) -> InversionOutput:
        """Encode x and render the requested reconstructions: any of "w", "w_plus", "f" (= G(w+, f));
        None = all that this model has (``self.outputs``)."""
        outputs = self.outputs if outputs is None else outputs
        unknown = set(outputs) - set(OUTPUTS)
        if unknown:
            raise ValueError(f"unknown outputs {sorted(unknown)}; choose from {OUTPUTS}")
        w, w_plus, f, feats = self.latents(x)
        rendered = self.render(w, w_plus, f, outputs, f_blend)
        images = rendered.images
        return InversionOutput(w=w, w_plus=w_plus, f=f, g5=rendered.g5, image_w=images.get("w"),
                               image_w_plus=images.get("w_plus"), image_f=images.get("f"), deltas=feats.deltas)

    def render(self, w: torch.Tensor, w_plus: torch.Tensor, f: torch.Tensor | None,
               outputs: Collection[str] = OUTPUTS, f_blend: float = 1.0) -> Rendered:
        """Reconstructions with one prefix pass (w and w+ stacked) and one suffix pass (features stacked), and
        G5(w+) from that prefix pass."""
        g = self.decoder
        b = w_plus.shape[0]
        prefix_lat = [w_plus] if "w" not in outputs else [g.broadcast(w), w_plus]
        lat = torch.cat(prefix_lat)
        g5_all, skip_all = g.synthesis_prefix(lat)
        g5_wp, skip_wp = g5_all[-b:], skip_all[-b:]
        parts = []  # (name, feature entering convs.4, 16x16 rgb skip, latents)
        if "w" in outputs:
            parts.append(("w", g5_all[:b], skip_all[:b], prefix_lat[0]))
        if "w_plus" in outputs:
            parts.append(("w_plus", g5_wp, skip_wp, w_plus))
        if "f" in outputs:
            if f is None:
                raise ValueError("output 'f' (G(w+, f)) requested without a feature f: this model has no F branch "
                                 "(model.variant psp/e4e); ask for 'w' or 'w_plus'")
            parts.append(("f", blend_feature(g5_wp, f, f_blend), skip_wp, w_plus))
        names = [p[0] for p in parts]
        if not names:
            return Rendered({}, g5_wp)
        images = g.synthesis_suffix(*(torch.cat([p[i] for p in parts]) for i in (1, 2, 3)))
        images = self.to_input_resolution(images)
        return Rendered(dict(zip(names, images.split(b))), g5_wp)

    # ----------------------------------------------------------------------------------------- editing
    def edited_images(self, w_plus: torch.Tensor, f: torch.Tensor, w_plus_edit: torch.Tensor,
                      f_edit: torch.Tensor | None = None, g5: torch.Tensor | None = None) -> torch.Tensor:
        """G(w^+, f^) with f^ = f_edit + G5(w^+) - G5(w+) (Eq. 6); f_edit defaults to f.

        ``g5`` = G5(w+) when the caller already has it (``InversionOutput.g5``, ``Rendered.g5``).  The edited
        prefix runs at the same batch size as the reconstruction's, so an edit of strength 0 reproduces
        ``render(..., outputs=("f",))`` bit for bit (batched CPU kernels are not bit-stable across batch
        compositions).
        """
        g = self.decoder
        if g5 is None:
            g5 = g.synthesis_prefix(w_plus)[0]
        g5_edit, skip = g.synthesis_prefix(w_plus_edit)
        base = f if f_edit is None else f_edit
        f_hat = base + (g5_edit - g5)
        return self.to_input_resolution(g.synthesis_suffix(f_hat, skip, w_plus_edit))
