"""One optimisation step per stage, in plain PyTorch.  The Ray Train loop (and the demo, and the fidelity
benchmark) drive these; nothing here knows about Ray.

Stage 1 (contrastive): the aligner on (image, w) pairs, symmetric InfoNCE, negatives gathered across workers.
Stage 2 (inversion): the CLCAE encoder with the generator and the stage-1 module frozen; Ranger (RAdam +
Lookahead) on the encoder only, the f blend ramping 0 -> 1 once over ``model.f_ramp_steps``.  The pSp and
e4e baselines (``model.variant``) train the same way on G(w+) alone, as pSp and e4e do.

``train.precision`` (both stages): ``fp32``, or ``bf16``/``fp16`` autocast of the forward pass and the losses
(weights, gradients and optimiser state stay float32); fp16 scales the loss with a GradScaler, whose state
:meth:`modules` exposes as ``grad_scaler``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from clcae.config import CLCAEConfig
from clcae.device import autocast_context
from clcae.losses import InversionCriterion
from clcae.models.clcae import CLCAE, OUTPUTS
from clcae.models.contrastive import ContrastiveAligner, info_nce

# The reconstructions each variant's losses are summed over: CLCAE's three (Eq. 7), the baselines' G(w+).
TRAIN_OUTPUTS = {"clcae": OUTPUTS, "psp": ("w_plus",), "e4e": ("w_plus",)}


def ranger(params: Iterable[nn.Parameter], cfg: CLCAEConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """Ranger as the authors use it: torch's RAdam under timm's Lookahead (k=6, alpha=0.5).

    The authors' vendored ranger.py also centralises gradients; timm's Lookahead over RAdam does not. Noted in
    the README's deviations.
    """
    from timm.optim import Lookahead

    o = cfg.optim
    base = torch.optim.RAdam(params, lr=lr or o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    return Lookahead(base, alpha=o.lookahead_alpha, k=o.lookahead_k)


def f_blend(step: int, ramp_steps: int) -> float:
    """The f blend: 0 at step 0, 1 from ``ramp_steps`` on (a one-time ramp, as FS does; the authors' code
    restarts the ramp every epoch)."""
    return 1.0 if ramp_steps <= 0 else min(1.0, step / ramp_steps)


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All workers' rows (this worker's keep their gradient) and this worker's row offset."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(x)  # differentiable: gradients flow back to every worker's own rows
    offset = sum(p.shape[0] for p in parts[: dist.get_rank()])
    return torch.cat(parts), offset


class MixedPrecision:
    """Autocast for the forward pass and, for fp16, a GradScaler around backward and the optimiser step."""

    def __init__(self, precision: str):
        autocast_context(precision, "cpu")  # refuse an unknown mode at construction
        self.precision = precision
        self.scaler: torch.amp.GradScaler | None = None

    def autocast(self, device: torch.device) -> Any:
        return autocast_context(self.precision, device)

    def state_dict(self) -> dict[str, Any]:
        """The GradScaler's scale and growth tracker (fp16 only): a resumed run continues with the scale it had
        instead of re-learning it from 2**16 over the first steps."""
        return {"grad_scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        if self.precision == "fp16" and state.get("grad_scaler"):
            self.scaler = torch.amp.GradScaler(device.type)
            self.scaler.load_state_dict(state["grad_scaler"])

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, clip: tuple[Iterable[nn.Parameter], float]
             | None = None) -> None:
        """backward + (clip) + step.  fp16 gradients underflow without loss scaling; bf16 has fp32's range."""
        if self.precision != "fp16":
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(*clip)
            optimizer.step()
            return
        if self.scaler is None:  # created on the first step, on the device the step runs on
            self.scaler = torch.amp.GradScaler(loss.device.type)
        self.scaler.scale(loss).backward()
        if clip:
            self.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(*clip)
        self.scaler.step(optimizer)  # skipped when the scaled gradients overflowed
        self.scaler.update()


class TrainStep:
    """What the Ray Train loop needs of a stage's step besides calling it: the trainable model, DDP wrapping,
    and the training state a checkpoint carries beside the weights (optimiser, loss scaler)."""

    model: nn.Module
    net: nn.Module  # what forward goes through: the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    amp: MixedPrecision

    def distribute(self, device: torch.device) -> None:
        """Wrap the model in DistributedDataParallel (call once the process group is up, world size > 1)."""
        from torch.nn.parallel import DistributedDataParallel

        self.net = DistributedDataParallel(self.model, broadcast_buffers=False,
                                           device_ids=[device.index] if device.type == "cuda" else None)

    def training_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), **self.amp.state_dict()}

    def load_training_state(self, state: dict[str, Any], device: torch.device) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.amp.load_state_dict(state, device)


class ContrastiveStep(TrainStep):
    def __init__(self, cfg: CLCAEConfig, aligner: ContrastiveAligner):
        self.cfg, self.aligner = cfg, aligner
        self.model = aligner
        self.net: nn.Module = aligner  # what forward goes through: the model, or its DDP wrapper
        c = cfg.contrastive
        params = [p for p in aligner.parameters() if p.requires_grad]
        if c.optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, lr=c.lr)
        else:
            self.optimizer = ranger(params, cfg, lr=c.lr)
        self.amp = MixedPrecision(cfg.train.precision)

    def to(self, device: torch.device) -> ContrastiveStep:
        self.aligner.to(device)
        return self

    def samples(self, images: torch.Tensor) -> list[torch.Tensor]:
        return []

    def __call__(self, images: torch.Tensor, w: torch.Tensor, step: int) -> dict[str, float]:
        self.aligner.train()
        with self.amp.autocast(images.device):
            img, lat = self.net(images, w)
        # The similarity logits and InfoNCE in float32: softmax over scaled cosines is where rounding shows.
        img, lat = img.float(), lat.float()
        all_img, offset = gather_with_grad(img)
        all_lat, _ = gather_with_grad(lat)
        scale = self.aligner.scale()
        loss = info_nce(img, lat, scale, self.aligner.lambda_image, all_img, all_lat, offset)
        self.optimizer.zero_grad(set_to_none=True)
        self.amp.step(loss, self.optimizer)
        with torch.no_grad():
            acc = (img @ all_lat.t()).argmax(1).eq(torch.arange(len(img), device=img.device) + offset).float().mean()
        return {"loss": loss.item(), "logit_scale": scale.item(), "accuracy": acc.item()}


class InversionStep(TrainStep):
    def __init__(self, cfg: CLCAEConfig, model: CLCAE, aligner: ContrastiveAligner | None = None):
        self.cfg, self.model = cfg, model
        self.net: nn.Module = model  # what forward goes through: the model, or its DDP wrapper
        use_align = cfg.model.use_align and cfg.loss.align > 0
        if use_align and aligner is None:
            raise ValueError("L_align is on (model.use_align, loss.align > 0) but no stage-1 module was given")
        self.aligner = aligner.freeze() if use_align else None
        loss_cfg = cfg.loss if use_align else dataclasses.replace(cfg.loss, align=0.0)
        self.criterion = InversionCriterion(loss_cfg, align=self._align if use_align else None)
        self.optimizer = ranger(model.encoder.parameters(), cfg)
        self.outputs = TRAIN_OUTPUTS[cfg.model.variant]
        self.amp = MixedPrecision(cfg.train.precision)

    def _align(self, images: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.aligner.loss(images, w)

    def to(self, device: torch.device) -> InversionStep:
        self.model.to(device)
        self.criterion.to(device)
        if self.aligner is not None:
            self.aligner.to(device)
        return self

    @torch.no_grad()
    def samples(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Columns of a sample grid: input | G(w) | G(w+) | G(w+, f) (the last only where the model has f)."""
        self.model.eval()
        out = self.model(images)
        self.model.train()
        return [images, *(c for c in (out.image_w, out.image_w_plus, out.image_f) if c is not None)]

    def __call__(self, images: torch.Tensor, step: int) -> dict[str, float]:
        self.model.train()
        blend = f_blend(step, self.cfg.model.f_ramp_steps)
        with self.amp.autocast(images.device):
            out = self.net(images, outputs=self.outputs, f_blend=blend)
            loss, terms = self.criterion(images, out, f_blend=blend)
        self.optimizer.zero_grad(set_to_none=True)
        clip = (self.model.encoder.parameters(), self.cfg.optim.grad_clip) if self.cfg.optim.grad_clip else None
        self.amp.step(loss.float(), self.optimizer, clip)
        return {**terms, "f_blend": blend}
