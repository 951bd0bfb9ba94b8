"""Training losses of CLCAE's inversion stage (paper Eq. 7-10).

Every loss here takes images in [-1, 1], NCHW, RGB. The perceptual and identity networks are fixed
measuring instruments: their parameters never train and they stay in eval mode whatever mode the
surrounding module is put in, while gradients still flow through them to the images.

Where the authors' code (``training/inversion_coach.py``) differs from the paper, the paper wins:
* L_align compares the *input* image with w (Eq. 3/10); the authors feed G(w) instead.
* LPIPS is single-scale (see :class:`LPIPSLoss`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lpips
import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F

from clcae.models.irse import IRSEBackbone
from clcae.weights import load_into, read_state

log = logging.getLogger(__name__)

ARCFACE_SOURCE = (
    "TreB1eN's IR-SE50 ArcFace 'model_ir_se50.pth' (InsightFace_Pytorch), as distributed by pSp "
    "(eladrich/pixel2style2pixel README, 'IR-SE50 Model')"
)
MOCO_SOURCE = (
    "facebookresearch/moco 'moco_v2_800ep_pretrain.pth.tar' (https://dl.fbaipublicfiles.com/moco/"
    "moco_checkpoints/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar), which pSp/e4e rename to "
    "'moco_v2_800ep_pretrain.pt'"
)
MOCO_PREFIX = "module.encoder_q."

# Smallest side each LPIPS trunk accepts (measured: below it a pooling layer's output is empty).
LPIPS_MIN_SIZE = {"alex": 31, "vgg": 16, "squeeze": 17}

# pSp's ArcFace crop of a 256x256 aligned face: rows 35:223, columns 32:220.
ARCFACE_CROP_256 = (35, 223, 32, 220)


def check_images(x: Tensor, name: str = "images") -> None:
    """Raise a ValueError unless ``x`` is a (B, 3, H, W) floating-point batch."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, 3, H, W), got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} must have shape (B, 3, H, W) (RGB in [-1, 1]), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor in [-1, 1], got dtype {x.dtype}")


class FrozenModule(nn.Module):
    """A fixed network used as a measuring instrument."""

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenModule:
        # A trainer calls model.train() on everything it owns; BatchNorm statistics and dropout of a loss
        # network must not follow, or the loss would change meaning (and BN1d fails on a batch of one).
        return super().train(False)


class LPIPSLoss(FrozenModule):
    """LPIPS distance (Zhang et al. 2018, v0.1 linear calibration) between images in [-1, 1].

    ``pretrained_backbone=False`` keeps the shipped calibration layers but leaves the trunk random, which
    makes the number meaningless; it exists so tests run offline. With ``True`` torchvision needs its
    ImageNet trunk weights in ``$TORCH_HOME/hub/checkpoints`` (downloaded once where a network exists).

    The authors' "multi-scale" LPIPS is a for/else loop whose ``else`` overwrites the accumulated sum,
    so what they actually train with is single-scale LPIPS at the input resolution; we do that directly.
    """

    def __init__(self, net: str = "alex", pretrained_backbone: bool = True):
        super().__init__()
        if net not in LPIPS_MIN_SIZE:
            raise ValueError(f"unknown LPIPS net {net!r}; choose one of {sorted(LPIPS_MIN_SIZE)}")
        self.net_name = net
        try:
            with warnings.catch_warnings():
                # lpips 0.1.4 still calls torchvision's deprecated ``pretrained=`` argument.
                warnings.filterwarnings("ignore", message=".*(pretrained|weights).*", category=UserWarning)
                self.net = lpips.LPIPS(net=net, pnet_rand=not pretrained_backbone, verbose=False)
        except OSError as e:
            raise RuntimeError(
                f"LPIPS({net!r}) needs torchvision's ImageNet {net} weights and could not get them ({e}). "
                "Put the file in $TORCH_HOME/hub/checkpoints on a machine with a network, or pass "
                "pretrained_backbone=False (random trunk: for tests only)."
            ) from e
        self.freeze()

    def per_image(self, x: Tensor, y: Tensor) -> Tensor:
        """LPIPS of each pair, shape (B,)."""
        check_images(x, "LPIPS input")
        check_images(y, "LPIPS target")
        if x.shape != y.shape:
            raise ValueError(f"LPIPS needs images of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        if min(x.shape[-2:]) < LPIPS_MIN_SIZE[self.net_name]:
            raise ValueError(
                f"LPIPS({self.net_name!r}) needs images of at least {LPIPS_MIN_SIZE[self.net_name]} pixels a "
                f"side, got {tuple(x.shape[-2:])}; upsample them first"
            )
        return self.net(x, y).flatten()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.per_image(x, y).mean()


def moco_resnet50() -> nn.Module:
    """torchvision ResNet-50 without its classifier: the MoCo-v2 query encoder up to the 2048-d pool."""
    net = torchvision.models.resnet50(weights=None)
    net.fc = nn.Identity()
    return net


def moco_encoder_state_dict(checkpoint: Any, name: str = "checkpoint") -> dict[str, Tensor]:
    """ResNet-50 keys from an official MoCo checkpoint (``{'state_dict': {'module.encoder_q.<key>': ...}}``).

    The momentum encoder (``encoder_k``), the queue and the MLP projection head (``encoder_q.fc.*``) are
    training-time parts of MoCo and are dropped, as pSp/e4e do.
    """
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        keys = list(checkpoint)[:8] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ValueError(
            f"{name} is not a MoCo checkpoint: expected a dict with 'state_dict' holding "
            f"'{MOCO_PREFIX}*' keys, found {keys}. Expected {MOCO_SOURCE}."
        )
    state = {
        k[len(MOCO_PREFIX):]: v
        for k, v in checkpoint["state_dict"].items()
        if k.startswith(MOCO_PREFIX) and not k[len(MOCO_PREFIX):].startswith("fc.")
    }
    if not state:
        keys = list(checkpoint["state_dict"])[:8]
        raise ValueError(
            f"{name} has no '{MOCO_PREFIX}*' keys (first keys: {keys}). Expected {MOCO_SOURCE}."
        )
    return state


def arcface_crop(x: Tensor, size: int = 112) -> Tensor:
    """pSp's crop of an aligned face (``[35:223, 32:220]`` at 256, same fractions at other sizes), pooled."""
    h, w = x.shape[-2:]
    top, bottom, left, right = ARCFACE_CROP_256
    x = x[:, :, round(top * h / 256):round(bottom * h / 256), round(left * w / 256):round(right * w / 256)]
    return F.adaptive_avg_pool2d(x, size)


class IDLoss(FrozenModule):
    """Identity loss ``1 - cos(R(x), R(y))`` averaged over the batch (paper Eq. 8, one reconstruction).

    ``network="arcface"``: IR-SE ArcFace (``backbone``, TreB1eN ``model_ir_se50.pth`` layout) on pSp's face
    crop pooled to 112. ``network="moco"``: MoCo-v2 ResNet-50 on ``F.interpolate(x, 224)`` (nearest, no
    ImageNet normalisation, as pSp/e4e do), for cars. ``weights=None`` leaves the network random, which
    makes the loss meaningless (tests, or no weights at hand).
    """

    def __init__(self, network: str = "arcface", weights: str | Path | None = None,
                 backbone: str = "ir_se50"):
        super().__init__()
        if network not in ("arcface", "moco"):
            raise ValueError(f"unknown ID network {network!r}; choose 'arcface' (faces) or 'moco' (cars)")
        self.network = network
        source = ARCFACE_SOURCE if network == "arcface" else MOCO_SOURCE
        # Read the file before building the network, so a wrong path fails at once.
        checkpoint = None if weights is None else read_state(weights, source=source)
        if network == "arcface":
            self.net: nn.Module = IRSEBackbone(backbone, input_size=112)
        else:
            self.net = moco_resnet50()
        if checkpoint is None:
            log.warning("IDLoss(%r) has random weights: the ID loss/similarity is meaningless. Pass the "
                        "official file: %s", network, source)
        else:
            if network == "moco":
                checkpoint = moco_encoder_state_dict(checkpoint, str(weights))
            elif not isinstance(checkpoint, Mapping):
                raise ValueError(f"{weights} holds a {type(checkpoint).__name__}, not a state_dict. "
                                 f"Expected {source}.")
            load_into(self.net, checkpoint, str(weights), f"{network} network", source=source)
        self.freeze()

    def embed(self, x: Tensor) -> Tensor:
        """L2-normalised identity embeddings (B, D) of images in [-1, 1]."""
        check_images(x, "ID input")
        x = arcface_crop(x, self.net.input_size) if self.network == "arcface" else F.interpolate(x, size=224)
        return F.normalize(self.net(x), dim=1)

    def similarity(self, x: Tensor, y: Tensor) -> Tensor:
        """Cosine similarity (B,) between the identities of targets ``x`` and images ``y``.

        The target side is computed without a graph: it is the data, not something being optimised.
        """
        with torch.no_grad():
            target = self.embed(x)
        return (self.embed(y) * target).sum(dim=1)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return (1 - self.similarity(x, y)).mean()


def feature_reg_loss(f: Tensor, g5: Tensor) -> Tensor:
    """Eq. 9, ||f - G5(w+)||^2 as a mean (as the authors), with G5 detached: only f is pulled."""
    if f.shape != g5.shape:
        raise ValueError(f"f {tuple(f.shape)} and G5 {tuple(g5.shape)} must have the same shape")
    return F.mse_loss(f, g5.detach())


def delta_reg_loss(w_plus: Tensor) -> Tensor:
    """e4e's delta regulariser: sum over layers i >= 1 of ||w+_i - w+_0||_2, averaged over the batch (e4e's
    ``delta_norm=2``). For e4e w+_0 is w, so this is the norm of its per-layer deltas."""
    if w_plus.ndim != 3:
        raise ValueError(f"w+ must have shape (B, N, D), got {tuple(w_plus.shape)}")
    return (w_plus[:, 1:] - w_plus[:, :1]).norm(dim=-1).sum(dim=1).mean()


# (log-name suffix, attribute of the model output)
RECONSTRUCTIONS = (("w", "image_w"), ("w_plus", "image_w_plus"), ("f", "image_f"))
WEIGHT_NAMES = ("l2", "lpips", "id", "feature_reg", "align", "delta_reg")
OPTIONAL_WEIGHTS = {"delta_reg": 0.0}  # a config without the field gets this weight


def _cfg(cfg: Any, name: str) -> Any:
    if name in OPTIONAL_WEIGHTS:
        return getattr(cfg, name, OPTIONAL_WEIGHTS[name])
    if not hasattr(cfg, name):
        raise ValueError(f"loss config {type(cfg).__name__} has no field {name!r}")
    return getattr(cfg, name)


def match_size(rec: Tensor, x: Tensor, name: str) -> Tensor:
    """Bring a reconstruction to the input's size.

    The generator renders at its own resolution (1024 for FFHQ) while the input and the calibrated crops
    of the losses are at 256; like pSp's ``face_pool`` we average-pool, an anti-aliased downsample that
    nearest or bilinear interpolation is not. A different aspect ratio would squash the image, so it is
    an error: crop first (pSp cars: pool 512 -> 256, then keep rows 32:224 for 192x256).
    """
    check_images(rec, name)
    if rec.shape[0] != x.shape[0]:
        raise ValueError(f"{name} has batch {rec.shape[0]} but the input has {x.shape[0]}")
    (rh, rw), (h, w) = rec.shape[-2:], x.shape[-2:]
    if (rh, rw) == (h, w):
        return rec
    if rh * w != rw * h:
        raise ValueError(f"{name} is {rh}x{rw} but the input is {h}x{w}: the aspect ratios differ, crop the "
                         "reconstruction to the input's framing first")
    if rh < h:
        raise ValueError(f"{name} is {rh}x{rw}, smaller than the {h}x{w} input: render at least at the "
                         "input's resolution (the losses only downsample)")
    return F.adaptive_avg_pool2d(rec, (h, w))


class InversionCriterion(nn.Module):
    """The weighted total of paper Eq. 7-10 for one batch.

    ``cfg`` is duck-typed: weights ``l2, lpips, id, feature_reg, align`` (optional ``delta_reg``) and ``lpips_net``,
    ``lpips_pretrained``, ``id_network`` ("arcface" | "moco" | "none"), ``id_weights``, optional
    ``id_backbone``. Terms with weight 0 (or ``id_network="none"``) are not built or computed.
    ``align(images, w) -> scalar`` is the frozen contrastive module (required when ``cfg.align > 0``);
    the criterion keeps it in eval mode, it must not carry trainable state.
    """

    def __init__(self, cfg: Any, align: Callable[[Tensor, Tensor], Tensor] | None = None):
        super().__init__()
        weights = {name: float(_cfg(cfg, name)) for name in WEIGHT_NAMES}
        bad = {k: v for k, v in weights.items() if not (v >= 0 and v < float("inf"))}
        if bad:
            raise ValueError(f"loss weights must be finite and >= 0, got {bad}")
        id_network = _cfg(cfg, "id_network")
        if id_network not in ("arcface", "moco", "none"):
            raise ValueError(f"id_network must be 'arcface', 'moco' or 'none', got {id_network!r}")
        if id_network == "none":
            weights["id"] = 0.0
        if weights["align"] > 0 and align is None:
            raise ValueError(f"align weight is {weights['align']} but no contrastive module was given: pass "
                             "align=... or set the align weight to 0")
        self.weights = weights

        self.lpips = None
        if weights["lpips"] > 0:
            self.lpips = LPIPSLoss(_cfg(cfg, "lpips_net"), bool(_cfg(cfg, "lpips_pretrained")))
        self.id_loss = None
        if weights["id"] > 0:
            self.id_loss = IDLoss(id_network, _cfg(cfg, "id_weights"), getattr(cfg, "id_backbone", "ir_se50"))
        self.align = align if weights["align"] > 0 else None
        self.train(False)

    def train(self, mode: bool = True) -> InversionCriterion:
        # Everything inside is a frozen instrument (LPIPS, ID, the contrastive module with its BatchNorm).
        return super().train(False)

    def weight(self, term: str) -> float:
        """The weight of a logged term, e.g. ``lpips/w_plus`` -> ``cfg.lpips``."""
        return self.weights[term.split("/")[0]]

    def forward(self, x: Tensor, out: Any, f_blend: float = 1.0) -> tuple[Tensor, dict[str, float]]:
        """Total loss and every unweighted term (plus ``total``) as floats for logging.

        ``f_blend`` is the feature blend the model used for ``image_f``; at 0 that image equals
        ``image_w_plus`` exactly and carries no gradient to f, so its terms are skipped.
        """
        check_images(x, "input x")
        if not 0.0 <= f_blend <= 1.0:
            raise ValueError(f"f_blend must be in [0, 1], got {f_blend}")
        w = self.weights
        terms: dict[str, Tensor] = {}

        recs = {}
        for suffix, attr in RECONSTRUCTIONS:
            rec = getattr(out, attr, None)
            if rec is None or (suffix == "f" and f_blend == 0.0):
                continue
            recs[suffix] = match_size(rec, x, attr)

        id_target = None
        if self.id_loss is not None and recs:
            with torch.no_grad():
                id_target = self.id_loss.embed(x)
        for suffix, rec in recs.items():
            if w["l2"] > 0:
                terms[f"l2/{suffix}"] = F.mse_loss(rec, x)
            if self.lpips is not None:
                terms[f"lpips/{suffix}"] = self.lpips(rec, x)
            if self.id_loss is not None:
                terms[f"id/{suffix}"] = (1 - (self.id_loss.embed(rec) * id_target).sum(dim=1)).mean()

        f = getattr(out, "f", None)
        if w["feature_reg"] > 0 and f is not None:
            g5 = getattr(out, "g5", None)
            if g5 is None:
                raise ValueError("the model output has f but no g5: the feature regulariser needs G5(w+)")
            terms["feature_reg"] = feature_reg_loss(f, g5)

        if w["delta_reg"] > 0 and getattr(out, "w_plus", None) is not None:
            terms["delta_reg"] = delta_reg_loss(out.w_plus)

        if self.align is not None:
            value = self.align(x, out.w)
            if not isinstance(value, Tensor) or value.ndim != 0:
                raise ValueError(f"align(x, w) must return a scalar tensor, got {value!r:.80}")
            terms["align"] = value

        if not terms:
            raise ValueError("nothing to compute: the model output has no reconstruction, f or w that an "
                             "enabled loss term uses")
        total = sum(self.weight(name) * value for name, value in terms.items())
        # One device->host copy for all the logged numbers instead of one sync per term.
        values = torch.stack([v.detach().float() for v in (*terms.values(), total)]).cpu().tolist()
        logs = dict(zip([*terms, "total"], values))
        return total, logs
