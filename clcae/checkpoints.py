"""Our checkpoint format (``clcae-platform/1``): weights incl. latent_avg and x_avg, the resolved config, and
whatever training state the caller adds (optimiser, step, RNG).  Exports without training state are
``clcae.pretrained.export``."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any

import fsspec
import torch
from torch import nn

from clcae.weights import WeightsError, read_state

CHECKPOINT_FORMAT = "clcae-platform/1"


def save_checkpoint(path: str | os.PathLike, kind: str, model: nn.Module, config: Mapping[str, Any],
                    **extra: Any) -> None:
    """Our self-contained checkpoint: weights incl. latent_avg, the resolved config, and ``extra`` state."""
    payload = {"format": CHECKPOINT_FORMAT, "kind": kind, "state_dict": model.state_dict(), "config": dict(config),
               **extra}
    if isinstance(getattr(model, "x_avg", None), torch.Tensor):
        # the average image the encoder was trained against, so inference needs no file from the training run
        payload["x_avg"] = model.x_avg.detach().cpu()
    buf = io.BytesIO()
    torch.save(payload, buf)
    with fsspec.open(str(path), "wb") as fh:
        fh.write(buf.getvalue())


def read_checkpoint(path: str, kind: str | None = None) -> dict[str, Any]:
    ckpt = read_state(path)
    if not isinstance(ckpt, Mapping) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(f"{path} is not a clcae-platform checkpoint (format {CHECKPOINT_FORMAT!r}). For any model "
                           "(the authors' files, exports, registry names) use clcae.pretrained.load / "
                           "Inverter.from_pretrained.")
    if kind is not None and ckpt.get("kind") != kind:
        raise WeightsError(f"{path} holds a {ckpt.get('kind')!r} checkpoint, expected {kind!r}")
    return dict(ckpt)
