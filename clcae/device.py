"""Where a model runs (:func:`pick_device`) and its numeric precision: ``fp32`` (exact, the default), ``bf16``
or ``fp16`` through ``torch.autocast``.

One definition for inference (``infer.precision``: the Inverter, hence Serve and the batch job) and training
(``train.precision``: :mod:`clcae.train.steps`).  Under autocast, convolutions and matmuls run in the low
precision; the parts where rounding would show are kept in float32 by the models themselves: the generator's
style affines and demodulation norms (:meth:`clcae.models.stylegan2.ModulatedConv2d.styles`), its mapping
network, and the normalisation layers (autocast leaves them in float32 or they accumulate in float32).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

# One list of names, in config.py (which must not import torch).
from clcae.config import PRECISIONS

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; anything else is a torch device string."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_context(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for ``bf16``/``fp16`` on ``device``'s type; a no-op for ``fp32``."""
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=DTYPES[precision])


def full_precision(device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """Autocast switched off: the enclosed code runs in the dtype of its inputs (callers pass float32)."""
    return torch.autocast(torch.device(device).type, enabled=False)
