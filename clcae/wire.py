"""What crosses HTTP besides images: the latents' JSON wire form (``{dtype, shape, data}`` or nested lists) and
the checks a client's numbers pass before they reach a model, each failure an :class:`ApiError` with the 4xx
status and the reason the client gets."""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}
        self.extra = extra or {}  # more JSON fields beside "error" (e.g. the faces found, so a client can choose)


def to_wire(t, dtype: str = "float32") -> dict[str, Any]:
    """A tensor as {"dtype", "shape", "data": base64}: compact (JSON lists for w/w+ are for humans).  Latents
    stay float32 so an edit of strength 0 reproduces the reconstruction; f may go as float16 (it only enters
    additively, Eq. 6)."""
    arr = np.ascontiguousarray(t.detach().float().cpu().numpy() if hasattr(t, "detach") else t).astype(dtype)
    return {"dtype": str(arr.dtype), "shape": list(arr.shape), "data": base64.b64encode(arr.tobytes()).decode()}


def from_wire(obj: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A client's latent -> float32 array of ``shape``, or an ApiError: 400 for what is not numbers (strings,
    booleans, null, ragged nesting, a broken wire form), 422 for numbers of the wrong shape or not finite in
    float32 (NaN, inf, beyond +-3.4e38)."""
    want = list(shape)
    if isinstance(obj, list):
        try:
            arr = np.asarray(obj)
        except (ValueError, TypeError, OverflowError, RecursionError):  # ragged or absurdly deep nesting
            raise ApiError(400, f"latents.{name} must be a nested list of numbers of shape {want}") from None
        if arr.dtype.kind not in "iuf":  # 'U' strings, 'b' booleans, 'O' null/objects/ints beyond 64 bits
            raise ApiError(400, f"latents.{name} must contain only numbers (shape {want})")
    elif isinstance(obj, dict) and {"dtype", "shape", "data"} <= set(obj):
        arr = from_wire_dict(obj, name, want)
    else:
        raise ApiError(400, f"latents.{name} must be a list or {{dtype, shape, data}} as returned by /v1/invert")
    if list(arr.shape) != want:
        raise ApiError(422, f"latents.{name} has shape {list(arr.shape)}, expected {want}")
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, refused just below
        arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ApiError(422, f"latents.{name} contains NaN, infinite or out-of-range (beyond float32) values")
    return arr


def from_wire_dict(obj: dict[str, Any], name: str, want: list[int]) -> np.ndarray:
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if dtype not in ("float16", "float32") or not isinstance(dtype, str):
        raise ApiError(400, f"latents.{name}.dtype must be \"float16\" or \"float32\"")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                            for d in shape)):
        raise ApiError(400, f"latents.{name}.shape must be a list of sizes, e.g. {want}")
    if shape != want:  # before decoding: a lying shape must not size an allocation
        raise ApiError(422, f"latents.{name} has shape {shape}, expected {want}")
    if not isinstance(data, str):
        raise ApiError(400, f"latents.{name}.data must be a base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError:
        raise ApiError(400, f"latents.{name}.data is not valid base64") from None
    if len(raw) != math.prod(shape) * np.dtype(dtype).itemsize:
        raise ApiError(400, f"latents.{name}: {len(raw)} bytes of data do not make a {dtype} array of shape {shape}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def finite_number(x: Any) -> float | None:
    """x as a float if it is a finite JSON number (not a boolean, not an int too large for a float), else None."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    try:
        value = float(x)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def short(x: Any, limit: int = 60) -> str:
    """repr for an error message, cut short: clients may send megabytes."""
    text = repr(x) if not isinstance(x, int) or abs(x) < 10**50 else f"an integer of {len(str(abs(x)))} digits"
    return text if len(text) <= limit else text[:limit] + "..."
