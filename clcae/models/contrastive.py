"""The contrastive alignment module (stage 1, paper Sec. 3.1): image and latent encoders, projection heads,
symmetric InfoNCE with a learnable temperature.  Frozen, it is the L_align loss of stage 2.

* Image branch: pSp IR-SE CNN + one map2style block on T1 -> 512 -> projection head, on ``x - x_avg``
  where ``x_avg = G(latent_avg)``.
* Latent branch: three DETR encoder layers on ``w - w_avg`` (one token) -> projection head.
* Both embeddings are L2-normalised; logits = exp(logit_scale) * img @ lat.T with exp(logit_scale)
  clamped at 100 (open_clip) — the authors' code leaves it unclamped.

Our names vs the authors' checkpoints (``best_model_image.pt`` / ``best_model_latent.pt``) are mapped in
``clcae.weights``: ``encoder.*`` and ``image_projection.*`` live under ``image_encoder``, the latent
encoder's ``coarse/medium/fine`` are ``latent_encoder.layers.0/1/2``, and ``logit_scale`` sits here.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from clcae.models.attention import TransformerEncoderLayer
from clcae.models.encoder import WEncoder


class Projection(nn.Module):
    """Linear - BN - ReLU - Linear (no biases), as the authors' ``Projection``."""

    def __init__(self, n_in: int, n_hidden: int, n_out: int):
        super().__init__()
        self.lin1 = nn.Linear(n_in, n_hidden, bias=False)
        self.bn = nn.BatchNorm1d(n_hidden)
        self.lin2 = nn.Linear(n_hidden, n_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.relu(self.bn(self.lin1(x))))


class ImageEncoder(nn.Module):
    def __init__(self, backbone: str = "ir_se50", input_size: tuple[int, int] = (256, 256), style_dim: int = 512,
                 projection_dim: int = 512):
        super().__init__()
        self.encoder = WEncoder(backbone, input_size, style_dim)
        # The FPN laterals exist in the authors' checkpoint but the image branch only uses T1.
        self.encoder.latlayer1.requires_grad_(False)
        self.encoder.latlayer2.requires_grad_(False)
        self.image_projection = Projection(style_dim, projection_dim, projection_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_projection(self.encoder.w_offset(x)), dim=-1)


class LatentEncoder(nn.Module):
    def __init__(self, style_dim: int = 512, layers: int = 3, heads: int = 4, ffn: int = 1024, dropout: float = 0.1,
                 projection_dim: int = 512):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.zeros(1, 1, style_dim))
        self.layers = nn.ModuleList(TransformerEncoderLayer(style_dim, heads, ffn, dropout) for _ in range(layers))
        self.latent_projection = Projection(style_dim, projection_dim, projection_dim)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        x = w[:, None, :]                       # one token per latent
        for layer in self.layers:
            x = layer(x, self.pos_embedding)
        return F.normalize(self.latent_projection(x[:, 0]), dim=-1)


def info_nce(img: torch.Tensor, lat: torch.Tensor, scale: torch.Tensor, lambda_image: float = 0.5,
             all_img: torch.Tensor | None = None, all_lat: torch.Tensor | None = None, offset: int = 0
             ) -> torch.Tensor:
    """Symmetric InfoNCE (Eq. 1-3): lambda * L(I->w) + (1 - lambda) * L(w->I), averaged over the batch.

    With ``all_img``/``all_lat`` (features gathered from every worker, this worker's rows at ``offset``) the
    local rows are contrasted against the global batch: more negatives at the same per-worker batch size.
    """
    all_img = img if all_img is None else all_img
    all_lat = lat if all_lat is None else all_lat
    logits_i = scale * img @ all_lat.t()
    logits_w = scale * lat @ all_img.t()
    target = torch.arange(img.shape[0], device=img.device) + offset
    return lambda_image * F.cross_entropy(logits_i, target) + (1 - lambda_image) * F.cross_entropy(logits_w, target)


class ContrastiveAligner(nn.Module):
    """Both encoders, the temperature, and the averages the inputs are centred on."""

    def __init__(self, image_encoder: ImageEncoder, latent_encoder: LatentEncoder,
                 image_avg: torch.Tensor | None = None, latent_avg: torch.Tensor | None = None,
                 init_temperature: float = 0.07, max_logit_scale: float = 100.0, lambda_image: float = 0.5):
        super().__init__()
        self.image_encoder = image_encoder
        self.latent_encoder = latent_encoder
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_logit_scale = max_logit_scale
        self.lambda_image = lambda_image
        h, w = image_encoder.encoder.input_size
        d = latent_encoder.pos_embedding.shape[-1]
        image_avg = torch.zeros(1, 3, h, w) if image_avg is None else image_avg.detach().clone()
        latent_avg = torch.zeros(d) if latent_avg is None else latent_avg.detach().reshape(d).clone()
        self.register_buffer("image_avg", image_avg)
        self.register_buffer("latent_avg", latent_avg)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)

    def embed(self, images: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised embeddings of (images - x_avg) and (w - w_avg); images in [-1, 1] at the input size."""
        return self.image_encoder(images - self.image_avg), self.latent_encoder(w - self.latent_avg)

    def forward(self, images: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed(images, w)

    def loss(self, images: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """InfoNCE over the local batch (L_align when frozen)."""
        img, lat = self.embed(images, w)
        return info_nce(img, lat, self.scale(), self.lambda_image)

    def freeze(self) -> ContrastiveAligner:
        """For use as L_align: eval mode (BN running stats, no dropout), no parameter gradients."""
        self.eval()
        self.requires_grad_(False)
        return self
