"""Latent editing: InterFaceGAN directions on w, GANSpace components on w+, and the feature edit (Eq. 6).

How CLCAE edits (paper Sec. 3.2, "Image Editing"; the authors' ``scripts/inference_edit*.py``):

* **InterFaceGAN** directions (e4e's ``age.pt``/``smile.pt`` (1, 512), ``pose.pt`` (1, 18, 512)) are added
  to the single code w *before* the cross-attention blocks, so w+ and f are recomputed from the edited w.
  Only one vector can be added there, so per-layer files contribute their layer 0 (the authors take
  ``edit_offset[:, 0, :]``; in the published ``pose.pt`` every layer is identical, so nothing is lost).
* **GANSpace** components (``{mean, comp, std}`` PCA files) move layers ``[start, end)`` of w+.
* The feature edit: ``f_hat = f + G5(w_hat+) - G5(w+)``.

Strength units. InterFaceGAN: ``w + strength * d``; e4e's directions are unit norm, so strength is a
distance in W. GANSpace: ``strength`` is in units of the component's standard deviation ``std[k]``.

GANSpace semantics, and how our numbers relate to the authors' tuples ``(pca_idx, start, end, strength)``.
With ``c = <w+[:, 0] - mean, comp[k]> / std[k]`` the layer-0 coordinate of a sample (in std units):

* ``mode="offset"`` (our default): ``w+[:, start:end] += strength * std[k] * comp[k]``. Strength 0 returns
  the input bit for bit, and strength 2 moves twice as far as strength 1.
* ``mode="target"`` (the authors' ``get_delta``): ``w+[:, start:end] += (strength - c) * std[k] * comp[k]``,
  i.e. the edited layers move by the amount that would put layer 0's coordinate at ``strength``. Every
  image ends at the same value along the component; strength 0 is *not* the identity (it moves the
  coordinate to the PCA mean). Their script edits one image at a time; here ``c`` is computed per sample.

The two moves differ by ``c`` std units. ``std`` is the spread of the coordinate over generated codes, so
for images near the generator's distribution ``c`` is of order 1: the published presets other than the
cars' viewpoint (|strength| 8-25) give edits of similar size in both modes, while for a small strength such
as the viewpoint's 2 the modes differ in kind: "target" turns every car to the same pose, "offset" turns
each car from its own pose. The presets below keep the authors' numbers; pass ``mode="target"`` to
reproduce their outputs (images far from the distribution, with large ``c``, differ more).

Latents here are absolute W codes (``latent_avg`` already added), as the PCA ``mean`` is.
Files are read through fsspec (local paths, ``file://``, ``s3://``...) with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, ClassVar, Literal

import fsspec
import torch

from clcae.errors import CLCAEError

logger = logging.getLogger(__name__)

Strength = float | torch.Tensor
Edits = Sequence[tuple[str, Strength]] | Mapping[str, Strength]
GANSpaceMode = Literal["offset", "target"]
_MODES = ("offset", "target")


class DirectionFileError(CLCAEError, ValueError):
    """A direction or PCA file cannot be read or does not have the expected format."""


class MissingDirectionFileError(DirectionFileError, FileNotFoundError):
    """A direction file the config names is not there (still a ``FileNotFoundError`` for callers that catch it)."""


class EditError(CLCAEError, ValueError):
    """An edit request is invalid: unknown direction, strength out of range, wrong latent shape."""


# ----------------------------------------------------------------------------------------------------
# File I/O


def _load(path: str) -> Any:
    try:
        with fsspec.open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise MissingDirectionFileError(f"direction file not found: {path}") from e
    except OSError:
        raise  # storage trouble (permissions, network) is not a format problem
    except Exception as e:  # unpickling / zip errors have many types; all mean "not a torch file we accept"
        raise DirectionFileError(
            f"{path}: cannot be read as a torch.save file with weights_only=True "
            f"({type(e).__name__}: {e}); expected a tensor or a dict of tensors"
        ) from e


def _save(obj: Any, path: str) -> None:
    with fsspec.open(path, "wb") as f:
        torch.save(obj, f)


def _check_float_finite(t: torch.Tensor, what: str, path: str) -> torch.Tensor:
    if not t.is_floating_point():
        raise DirectionFileError(f"{path}: {what} has dtype {t.dtype}; expected a floating point tensor")
    if not torch.isfinite(t).all():
        raise DirectionFileError(f"{path}: {what} contains NaN or infinite values")
    return t.detach().to(torch.float32).contiguous()


# ----------------------------------------------------------------------------------------------------
# InterFaceGAN


@dataclass(frozen=True, eq=False)
class InterFaceGANDirection:
    """A direction in W. ``vector`` is (D,) float32; ``source_shape`` is the shape stored in the file."""

    name: str
    vector: torch.Tensor
    source: str = ""
    source_shape: tuple[int, ...] = ()


def load_interfacegan(
    path: str | os.PathLike, name: str | None = None, style_dim: int = 512
) -> InterFaceGANDirection:
    """Load an InterFaceGAN direction: a tensor of shape (1, D), (D,), or per layer (1, N, D) / (N, D).

    Per-layer files give their layer 0: the edit is applied to w before the cross-attention blocks, where
    only one vector fits (the authors do the same). A warning is logged when the layers differ.
    """
    path = str(path)
    obj = _load(path)
    expected = f"(1, {style_dim}), ({style_dim},) or per layer (1, N, {style_dim})"
    if not isinstance(obj, torch.Tensor):
        raise DirectionFileError(f"{path}: expected a tensor of shape {expected}, found {type(obj).__name__}")
    shape = tuple(obj.shape)
    if not (obj.dim() in (1, 2) or (obj.dim() == 3 and shape[0] == 1)) or shape[-1] != style_dim:
        raise DirectionFileError(f"{path}: direction has shape {shape}; expected {expected}")
    layers = _check_float_finite(obj, "direction", path).reshape(-1, style_dim)
    if layers.shape[0] > 1:
        if torch.equal(layers, layers[:1].expand_as(layers)):
            logger.info("%s: per-layer direction %s with identical layers; using layer 0", path, shape)
        else:
            logger.warning(
                "%s: per-layer direction %s has different layers; only layer 0 is used because the edit "
                "is applied to w before the cross-attention blocks",
                path,
                shape,
            )
    name = name if name is not None else PurePosixPath(path).stem
    return InterFaceGANDirection(name=name, vector=layers[0].clone(), source=path, source_shape=shape)


def save_interfacegan(direction: InterFaceGANDirection | torch.Tensor, path: str | os.PathLike) -> None:
    """Write a direction in e4e's format: a (1, D) float32 tensor."""
    vector = direction.vector if isinstance(direction, InterFaceGANDirection) else direction
    _save(vector.detach().reshape(1, -1).to(torch.float32).cpu().clone(), str(path))


# ----------------------------------------------------------------------------------------------------
# GANSpace


@dataclass(frozen=True, eq=False)
class GANSpacePCA:
    """PCA of W: ``mean`` (D,), unit-norm components ``comp`` (K, D), per-component ``std`` (K,)."""

    mean: torch.Tensor
    comp: torch.Tensor
    std: torch.Tensor
    source: str = ""

    def __post_init__(self) -> None:
        c = self.comp
        if not (
            c.dim() == 2
            and tuple(self.mean.shape) == (c.shape[1],)
            and tuple(self.std.shape) == (c.shape[0],)
        ):
            raise ValueError(
                f"{self.source or 'GANSpacePCA'}: expected mean (D,), comp (K, D), std (K,); got mean "
                f"{tuple(self.mean.shape)}, comp {tuple(c.shape)}, std {tuple(self.std.shape)}"
            )

    @property
    def num_components(self) -> int:
        return self.comp.shape[0]

    @property
    def style_dim(self) -> int:
        return self.comp.shape[1]


def load_ganspace(path: str | os.PathLike, style_dim: int = 512) -> GANSpacePCA:
    """Load a GANSpace PCA file: ``{'mean': (1, D) or (D,), 'comp': (K, 1, D) or (K, D), 'std': (K,)}``."""
    path = str(path)
    obj = _load(path)
    keys = ("mean", "comp", "std")
    if not isinstance(obj, Mapping):
        raise DirectionFileError(f"{path}: expected a dict with keys {keys}, found {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DirectionFileError(f"{path}: missing key(s) {missing}; found {sorted(map(str, obj))}")
    for k in keys:
        if not isinstance(obj[k], torch.Tensor):
            raise DirectionFileError(f"{path}: '{k}' is a {type(obj[k]).__name__}; expected a tensor")
    mean, comp, std = (_check_float_finite(obj[k], f"'{k}'", path) for k in keys)
    d = style_dim
    k = comp.shape[0] if comp.dim() else 0
    shapes_ok = (
        tuple(mean.shape) in ((1, d), (d,))
        and tuple(comp.shape) in ((k, 1, d), (k, d))
        and tuple(std.shape) == (k,)
        and k > 0
    )
    if not shapes_ok:
        raise DirectionFileError(
            f"{path}: expected mean (1, {d}), comp (K, 1, {d}), std (K,); got mean {tuple(mean.shape)}, "
            f"comp {tuple(comp.shape)}, std {tuple(std.shape)}"
        )
    if not (std > 0).all():
        raise DirectionFileError(f"{path}: 'std' must be positive (it scales the edit strength)")
    comp = comp.reshape(k, d)
    norms = comp.norm(dim=1)
    if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
        # Strength is in std units only for unit-norm components.
        logger.warning(
            "%s: GANSpace components are not unit norm (%.4g..%.4g)", path, norms.min(), norms.max()
        )
    return GANSpacePCA(mean=mean.reshape(d), comp=comp, std=std, source=path)


def save_ganspace(pca: GANSpacePCA, path: str | os.PathLike) -> None:
    """Write a PCA in e4e's format: ``{'mean': (1, D), 'comp': (K, 1, D), 'std': (K,)}``."""
    k, d = pca.comp.shape
    obj = {
        "mean": pca.mean.detach().reshape(1, d).float().cpu().clone(),
        "comp": pca.comp.detach().reshape(k, 1, d).float().cpu().clone(),
        "std": pca.std.detach().reshape(k).float().cpu().clone(),
    }
    _save(obj, str(path))


@dataclass(frozen=True)
class GANSpaceEdit:
    """Component ``component`` applied to w+ layers ``[start, end)`` (end exclusive, as in the authors'
    tuples); ``strength`` is the authors' default strength for this edit."""

    name: str
    component: int
    start: int
    end: int
    strength: float = 0.0

    def __post_init__(self) -> None:
        if self.component < 0:
            raise EditError(f"GANSpace edit '{self.name}': component must be >= 0, got {self.component}")
        if not 0 <= self.start < self.end:
            raise EditError(
                f"GANSpace edit '{self.name}': layer range [{self.start}, {self.end}) is empty or negative; "
                "need 0 <= start < end (end exclusive)"
            )

    @classmethod
    def from_tuple(cls, name: str, spec: tuple[int, int, int, float]) -> GANSpaceEdit:
        """Build from the authors' ``(pca_idx, start, end, strength)``."""
        component, start, end, strength = spec
        return cls(name, int(component), int(start), int(end), float(strength))


def _presets(specs: Mapping[str, tuple[int, int, int, float]]) -> dict[str, GANSpaceEdit]:
    return {name: GANSpaceEdit.from_tuple(name, spec) for name, spec in specs.items()}


# The authors' tuples (scripts/inference_edit_not_interface.py); strengths are their "target" values.
FFHQ_GANSPACE_EDITS = _presets(
    {
        "eyes": (54, 7, 8, 20),
        "beard": (58, 7, 9, -20),
        "lip": (34, 10, 11, 20),
        "white_hair": (57, 7, 10, -24),
    }
)
CARS_GANSPACE_EDITS = _presets(
    {"viewpoint": (0, 0, 5, 2), "cube": (16, 3, 6, 25), "color": (22, 9, 11, -8), "grass": (41, 9, 11, -18)}
)


# ----------------------------------------------------------------------------------------------------
# Edits on batched latents


def _strength_vector(strength: Strength, batch: int, like: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(strength, dtype=like.dtype, device=like.device)
    if s.dim() == 0:
        s = s.expand(batch)
    elif tuple(s.shape) != (batch,):
        raise EditError(
            f"strength must be a number or a ({batch},) tensor, one per sample; got shape {tuple(s.shape)}"
        )
    if not torch.isfinite(s).all():
        raise EditError("strength contains NaN or infinite values")
    return s


def _keep_where_zero(s: torch.Tensor, edited: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    # w + 0 * d turns -0.0 into +0.0; selecting the input makes strength 0 exact bit for bit.
    mask = (s != 0).reshape(-1, *[1] * (original.dim() - 1))
    return torch.where(mask, edited, original)


def interfacegan_edit(
    w: torch.Tensor, direction: InterFaceGANDirection | torch.Tensor, strength: Strength
) -> torch.Tensor:
    """``w + strength * d`` per sample. ``w`` is (B, D) (or (B, N, D): the same offset on every layer);
    ``strength`` is a number or a (B,) tensor."""
    d = direction.vector if isinstance(direction, InterFaceGANDirection) else direction
    if w.dim() not in (2, 3) or w.shape[-1] != d.shape[-1] or d.dim() != 1:
        raise EditError(
            f"InterFaceGAN edit needs w of shape (B, {d.shape[-1]}) or (B, N, {d.shape[-1]}) and a (D,) "
            f"direction; got w {tuple(w.shape)}, direction {tuple(d.shape)}"
        )
    s = _strength_vector(strength, w.shape[0], w)
    d = d.to(device=w.device, dtype=w.dtype)
    edited = w + s.reshape(-1, *[1] * (w.dim() - 1)) * d
    return _keep_where_zero(s, edited, w)


def ganspace_coordinate(w_plus: torch.Tensor, pca: GANSpacePCA, component: int) -> torch.Tensor:
    """Layer 0's coordinate along ``comp[component]`` in std units, per sample: (B,)."""
    like = {"device": w_plus.device, "dtype": w_plus.dtype}
    mean, comp, std = pca.mean.to(**like), pca.comp[component].to(**like), pca.std[component].to(**like)
    return ((w_plus[:, 0] - mean) @ comp) / std


def ganspace_edit(
    w_plus: torch.Tensor,
    pca: GANSpacePCA,
    edit: GANSpaceEdit,
    strength: Strength | None = None,
    mode: GANSpaceMode = "offset",
) -> torch.Tensor:
    """Move layers ``[edit.start, edit.end)`` of ``w_plus`` (B, N, D) along ``pca.comp[edit.component]``.

    ``mode="offset"``: ``delta = strength * std[k] * comp[k]`` (strength 0 is the identity).
    ``mode="target"`` (the authors'): ``delta = (strength - c) * std[k] * comp[k]`` with ``c`` the sample's
    layer-0 coordinate in std units. ``strength`` is a number or a (B,) tensor; None uses ``edit.strength``.
    """
    if mode not in _MODES:
        raise EditError(f"GANSpace mode must be one of {_MODES}, got {mode!r}")
    if w_plus.dim() != 3 or w_plus.shape[-1] != pca.style_dim:
        raise EditError(f"GANSpace edit needs w+ of shape (B, N, {pca.style_dim}); got {tuple(w_plus.shape)}")
    n = w_plus.shape[1]
    if edit.end > n:
        raise EditError(
            f"GANSpace edit '{edit.name}': layers [{edit.start}, {edit.end}) do not fit a w+ with {n} layers"
        )
    if edit.component >= pca.num_components:
        raise EditError(
            f"GANSpace edit '{edit.name}': component {edit.component} does not exist; "
            f"{pca.source or 'the PCA'} has {pca.num_components} components"
        )
    s = _strength_vector(edit.strength if strength is None else strength, w_plus.shape[0], w_plus)
    k = edit.component
    amount = s - ganspace_coordinate(w_plus, pca, k) if mode == "target" else s
    step = (pca.comp[k] * pca.std[k]).to(device=w_plus.device, dtype=w_plus.dtype)
    delta = amount[:, None] * step  # (B, D)
    edited = w_plus.clone()
    edited[:, edit.start : edit.end] += delta[:, None, :]
    return _keep_where_zero(s, edited, w_plus) if mode == "offset" else edited


# ----------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True, eq=False)
class InterFaceGANEntry:
    direction: InterFaceGANDirection
    max_strength: float
    kind: ClassVar[str] = "interfacegan"
    acts_on: ClassVar[str] = "w"

    def apply(self, w: torch.Tensor, strength: Strength) -> torch.Tensor:
        return interfacegan_edit(w, self.direction, strength)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "acts_on": self.acts_on, "max_strength": self.max_strength}


@dataclass(frozen=True, eq=False)
class GANSpaceEntry:
    pca: GANSpacePCA
    edit: GANSpaceEdit
    max_strength: float
    mode: GANSpaceMode = "offset"
    kind: ClassVar[str] = "ganspace"
    acts_on: ClassVar[str] = "w_plus"

    def apply(self, w_plus: torch.Tensor, strength: Strength) -> torch.Tensor:
        return ganspace_edit(w_plus, self.pca, self.edit, strength, mode=self.mode)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "acts_on": self.acts_on,
            "max_strength": self.max_strength,
            "component": self.edit.component,
            "layers": [self.edit.start, self.edit.end],
            "mode": self.mode,
        }


Entry = InterFaceGANEntry | GANSpaceEntry

_REQUIRED_KEYS = {
    "interfacegan": {"kind", "path", "max_strength"},
    "ganspace": {"kind", "path", "max_strength", "component", "layers"},
}
_ALLOWED_KEYS = {
    "interfacegan": _REQUIRED_KEYS["interfacegan"],
    "ganspace": _REQUIRED_KEYS["ganspace"] | {"mode", "strength"},
}


def _max_strength(name: str, value: Any) -> float:
    try:
        m = float(value)
    except (TypeError, ValueError):
        m = math.nan
    if not (math.isfinite(m) and m > 0):
        raise EditError(f"direction '{name}': max_strength must be a positive number, got {value!r}")
    return m


def _entry_from_spec(
    name: str, spec: Mapping[str, Any], style_dim: int, pcas: dict[str, GANSpacePCA]
) -> Entry:
    if not isinstance(spec, Mapping):
        raise EditError(f"direction '{name}': expected a mapping with kind/path/max_strength, got {spec!r}")
    kind = spec.get("kind")
    if kind not in _ALLOWED_KEYS:
        raise EditError(f"direction '{name}': kind must be one of {sorted(_ALLOWED_KEYS)}, got {kind!r}")
    unknown = set(map(str, spec)) - _ALLOWED_KEYS[kind]
    missing = _REQUIRED_KEYS[kind] - set(map(str, spec))
    if unknown or missing:
        raise EditError(
            f"direction '{name}' ({kind}): unknown key(s) {sorted(unknown)}, "
            f"missing key(s) {sorted(missing)}; allowed keys are {sorted(_ALLOWED_KEYS[kind])}"
        )
    max_strength = _max_strength(name, spec["max_strength"])
    path = str(spec["path"])
    if kind == "interfacegan":
        return InterFaceGANEntry(load_interfacegan(path, name=name, style_dim=style_dim), max_strength)

    layers = list(spec["layers"])
    if len(layers) != 2:
        raise EditError(f"direction '{name}': layers must be [start, end] (end exclusive), got {layers}")
    mode = spec.get("mode", "offset")
    if mode not in _MODES:
        raise EditError(f"direction '{name}': mode must be one of {_MODES}, got {mode!r}")
    edit = GANSpaceEdit(
        name, int(spec["component"]), int(layers[0]), int(layers[1]), float(spec.get("strength", 0.0))
    )
    if path not in pcas:
        pcas[path] = load_ganspace(path, style_dim=style_dim)
    if edit.component >= pcas[path].num_components:
        raise EditError(
            f"direction '{name}': component {edit.component} does not exist; {path} has "
            f"{pcas[path].num_components} components"
        )
    return GANSpaceEntry(pcas[path], edit, max_strength, mode)


def _named_entry(name: str, spec: Mapping[str, Any], style_dim: int, pcas: dict[str, GANSpacePCA]) -> Entry:
    try:
        return _entry_from_spec(name, spec, style_dim, pcas)
    except MissingDirectionFileError as e:
        raise MissingDirectionFileError(
            f"direction '{name}': {e}; get it (`clcae weights list` names the official files), point "
            f"directions.{name}.path at your copy, or leave it out with the override directions.{name}=null "
            "(every direction: directions={})") from e


class DirectionRegistry:
    """Named edit directions with strength limits; what the inference code and the Serve app expose.

    Built from a mapping such as::

        {"smile": {"kind": "interfacegan", "path": "dirs/smile.pt", "max_strength": 5.0},
         "eyes": {"kind": "ganspace", "path": "dirs/ffhq_pca.pt", "component": 54, "layers": [7, 8],
                  "max_strength": 30.0, "mode": "offset"}}

    ``layers`` is ``[start, end)``, end exclusive. GANSpace files shared by several entries are read once.
    """

    def __init__(self, entries: Mapping[str, Entry]):
        self._entries = dict(entries)

    @classmethod
    def from_config(cls, config: Mapping[str, Mapping[str, Any]], style_dim: int = 512) -> DirectionRegistry:
        pcas: dict[str, GANSpacePCA] = {}  # path -> PCA, so entries sharing a file read it once
        return cls({str(name): _named_entry(str(name), spec, style_dim, pcas) for name, spec in config.items()})

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise EditError(f"unknown direction '{name}'; known directions: {self.names()}") from None

    def describe(self) -> dict[str, dict[str, Any]]:
        """JSON-ready summary per direction (for a listing endpoint)."""
        return {name: self._entries[name].describe() for name in self.names()}

    def check_strength(self, name: str, strength: Strength) -> None:
        entry = self.get(name)
        s = torch.as_tensor(strength, dtype=torch.float64)
        if not torch.isfinite(s).all():
            raise EditError(f"strength for '{name}' must be finite, got {strength!r}")
        worst = s.abs().max().item() if s.numel() else 0.0
        if worst > entry.max_strength:
            raise EditError(
                f"strength {worst:g} for '{name}' is out of range; "
                f"|strength| must be <= {entry.max_strength:g}"
            )

    def resolve(self, edits: Edits, check: bool = True) -> list[tuple[Entry, Strength]]:
        """``edits`` as (entry, strength) pairs, in order.  ``check``: every strength is checked first, so a bad
        request fails before any work; ``check=False`` is for edits already checked against this registry's
        directions (Serve's ingress checks a request once, before the model call).  Unknown names fail either
        way."""
        pairs = list(edits.items()) if isinstance(edits, Mapping) else list(edits)
        if check:
            for name, strength in pairs:
                self.check_strength(name, strength)
        return [(self.get(name), strength) for name, strength in pairs]

    def _validated(self, edits: Edits) -> list[tuple[Entry, Strength]]:
        return self.resolve(edits)

    @staticmethod
    def apply_resolved(latent: torch.Tensor, pairs: Sequence[tuple[Entry, Strength]], acts_on: str) -> torch.Tensor:
        """Apply the resolved edits that act on ``acts_on`` ("w" or "w_plus"), one after another."""
        for entry, strength in pairs:
            if entry.acts_on == acts_on:
                latent = entry.apply(latent, strength)
        return latent

    def _apply(self, latent: torch.Tensor, edits: Edits, acts_on: str) -> torch.Tensor:
        return self.apply_resolved(latent, self.resolve(edits), acts_on)

    def apply_to_w(self, w: torch.Tensor, edits: Edits) -> torch.Tensor:
        """Apply the InterFaceGAN edits of ``edits`` to w (B, D). GANSpace edits are skipped (they act on
        w+, see :meth:`apply_to_w_plus`), but every edit is validated, so a bad request fails before work."""
        return self._apply(w, edits, "w")

    def apply_to_w_plus(self, w_plus: torch.Tensor, edits: Edits) -> torch.Tensor:
        """Apply the GANSpace edits of ``edits`` to w+ (B, N, D), one after another; InterFaceGAN edits are
        skipped (they were applied to w)."""
        return self._apply(w_plus, edits, "w_plus")
