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
import ctypes
import ctypes.util
import logging
import os
import platform
from typing import Any

import torch

# One list of names, in config.py (which must not import torch).
from clcae.config import PRECISIONS

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

log = logging.getLogger(__name__)

# glibc mallopt(3) parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_allocator_tuned: bool | None = None  # None: not tried yet in this process
ALLOCATOR_ENV = "CLCAE_KEEP_FREED_MEMORY"  # "0" turns keep_freed_memory off


def keep_freed_memory() -> bool:
    """Make this process's malloc keep the memory a model call frees, for the next call, instead of handing it
    back to the kernel: glibc serves every block over 32 MiB (a 1024 generator's activations are up to 256 MiB)
    with a fresh mmap, whose pages fault in, zeroed, on every call -- 160-200k minor page faults per 1024 image,
    about a sixth of its CPU time (bench/generator.py reports them).  Peak memory is unchanged; the process holds
    on to it between calls, as a serving process or an actor would anyway.

    Written by hand because PyTorch has no CPU caching allocator; its tuning guide's remedy, preloading jemalloc
    or tcmalloc, has to be in place before the process starts (Ray workers, Serve replicas, notebooks), while
    mallopt does the same for glibc from inside.  Once per process; a no-op (False) off glibc or with
    ``CLCAE_KEEP_FREED_MEMORY=0``.
    """
    global _allocator_tuned
    if _allocator_tuned is None:
        _allocator_tuned = False
        if os.environ.get(ALLOCATOR_ENV, "1") != "0" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                # no mmap'ed blocks: large ones come from the heap; and free memory at the heap's top is never
                # trimmed (-1, mallopt(3)).  A 2 GiB threshold (mallopt's int limit) was not enough: a batch-8 1024
                # pass frees more than that at once and re-faulted 656k pages (2.5 GiB) on every call.
                _allocator_tuned = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))
            except (OSError, AttributeError) as exc:
                log.debug("malloc tuning unavailable: %s", exc)
    return _allocator_tuned


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
