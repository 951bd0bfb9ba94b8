"""Evaluate an Inverter on a test set: the paper's Table 1 (PSNR, SSIM, LPIPS, ID, time, ID after edit) for
CLCAE_w = G(w), CLCAE_w+ = G(w+) and CLCAE = G(w+, f).

    inverter = Inverter.from_config(load_config("configs/ffhq.yaml"), checkpoint="runs/ffhq-s2/.../checkpoint.pt")
    result = evaluate(inverter, read_images("data/celebahq_test"), edit=[("smile", 2.0)],
                      id_network="arcface", id_weights="pretrained/model_ir_se50.pth")
    write_report(result, "eval/ffhq")           # metrics.json, metrics.md, per_image.csv

Conventions (see :mod:`clcae.metrics`): every reconstruction is compared with the preprocessed input (resized to
the encoder's input size, in [-1, 1]); PSNR/SSIM on [0, 1] with data range 1 and no 8-bit rounding; LPIPS alex
at 256x256; ID = cosine similarity of identity embeddings. "ID after edit" (the paper's editing metric) is the ID
similarity between G(w+, f) and the edited image G(w^+, f^).

Timing: per-image time = wall time of one ``Inverter.invert`` call (encoder + G(w+, f), what the batch job and
Serve run) divided by the batch size, with the device synchronised before and after (CUDA/MPS), after two untimed
warm-up calls; decoding and resizing are not timed, the host-to-device copy is. That timed call is separate from
the call that renders G(w), G(w+) and G(w+, f) for the metrics, whose time is reported too.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import platform
import posixpath
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from clcae.config import StorageConfig
from clcae.data import storage as st
from clcae.data.images import IMAGE_SUFFIXES, InputError, check_min_size, decode_input_image
from clcae.data.shards import validate_shards
from clcae.errors import CLCAEError
from clcae.inference import Inverter
from clcae.losses import IDLoss
from clcae.metrics import LPIPS_SIZE, MetricSuite, check_pair

log = logging.getLogger(__name__)

# column -> (Inversion image, what it is); the paper's names
COLUMNS: dict[str, tuple[str, str]] = {"CLCAE_w": ("w", "G(w)"), "CLCAE_w+": ("w_plus", "G(w+)"),
                                       "CLCAE": ("f", "G(w+, f)")}
METRICS = ("psnr", "ssim", "lpips", "id")
ROWS = (("psnr", "PSNR↑"), ("ssim", "SSIM↑"), ("lpips", "LPIPS↓"), ("id", "ID↑"), ("time_s", "Time (s)↓"),
        ("id_after_edit", "ID after edit↑"))
SSIM_DESCRIPTION = {"gaussian11": "Gaussian window 11, sigma 1.5 (Wang et al.)",
                    "uniform21": "uniform 21x21 window, sample covariance (the authors' measure.py)"}
WARMUP_CALLS = 2

ImageLike = bytes | Image.Image | np.ndarray


class EvaluationError(CLCAEError, ValueError):
    """An evaluation that cannot run: no images, an unknown edit, a bad setting."""


# ---------------------------------------------------------------------------------------------------
# Input


def read_images(uri: str, storage: StorageConfig | None = None) -> Iterator[tuple[str, bytes]]:
    """(key, encoded bytes) from image shards (Parquet with ``key`` and ``image``: a file or a folder of them) or
    from an image folder (files with an image suffix, recursively, in sorted order; others are skipped)."""
    fs, path = st.filesystem(uri, storage)
    with st.storage_errors(uri, storage):
        try:
            kind = fs.info(path)["type"]
        except FileNotFoundError:
            raise EvaluationError(f"input {uri}: no such file or folder") from None
    if kind != "directory":
        if path.lower().endswith(".parquet"):
            yield from _read_shards([uri], storage)
        else:
            yield posixpath.basename(path), fs.cat_file(path)
        return
    with st.storage_errors(uri, storage):
        found = sorted(fs.find(path))
    files = [p for p in found if not st.hidden(posixpath.relpath(p, path))]
    images = [p for p in files if p.lower().endswith(IMAGE_SUFFIXES)]
    shards = [p for p in files if p.lower().endswith(".parquet")]
    if shards and images:  # never guess which half the user meant, and never drop the other half silently
        raise EvaluationError(f"input {uri} holds {len(images)} image file(s) (e.g. {images[0]}) and {len(shards)} "
                              f"Parquet file(s) (e.g. {shards[0]}): an input is either image shards or images; "
                              "move the Parquet file(s) out, or point --input at the shards or the images alone")
    if shards:
        yield from _read_shards(validate_shards(uri, storage), storage)
        return
    if len(images) < len(files):
        log.info("%s: skipping %d file(s) without an image suffix %s", uri, len(files) - len(images), IMAGE_SUFFIXES)
    if not images:
        raise EvaluationError(f"input {uri}: no image files ({', '.join(IMAGE_SUFFIXES)}) and no .parquet shards")
    for p in images:
        with st.storage_errors(st.with_protocol(uri, p), storage):
            data = fs.cat_file(p)
        yield posixpath.relpath(p, path), data


def _read_shards(files: Sequence[str], storage: StorageConfig | None) -> Iterator[tuple[str, bytes]]:
    for uri in files:
        fs, path = st.filesystem(uri, storage)
        with st.storage_errors(uri, storage), fs.open(path, "rb") as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=64, columns=["key", "image"]):
                yield from zip(batch.column("key").to_pylist(), batch.column("image").to_pylist())


def _decoded_batches(images: Iterable[tuple[str, ImageLike]], batch_size: int, limit: int | None,
                     errors: list[dict[str, str]]) -> Iterator[tuple[list[str], list[Image.Image | np.ndarray]]]:
    keys: list[str] = []
    batch: list[Image.Image | np.ndarray] = []
    taken = 0
    for key, data in images:
        if limit is not None and taken >= limit:
            break
        try:
            # the same acceptance test as the batch job and Serve (decodable, not below the minimum size)
            if isinstance(data, bytes | bytearray | memoryview):
                image = decode_input_image(bytes(data))
            else:
                image = data
                check_min_size(data)
        except InputError as exc:
            errors.append({"key": str(key), "error": str(exc)})
            continue
        keys.append(str(key))
        batch.append(image)
        taken += 1
        if len(batch) == batch_size:
            yield keys, batch
            keys, batch = [], []
    if batch:
        yield keys, batch


# ---------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(inverter: Inverter, images: Iterable[tuple[str, ImageLike]],
             edit: Sequence[tuple[str, float]] | Mapping[str, float] | None = None, *,
             id_network: str = "arcface", id_weights: str | None = None, id_backbone: str = "ir_se50",
             lpips_pretrained_backbone: bool = True, ssim_window: str = "gaussian11", batch_size: int = 8,
             limit: int | None = None, timing: bool = True, source: str = "") -> dict[str, Any]:
    """Metrics of G(w), G(w+) and G(w+, f) against each input, ID after ``edit``, and time per image.

    ``images`` yields (key, encoded bytes / PIL image / HxWx3 uint8 array); bytes that do not decode and images
    smaller than :data:`~clcae.data.images.MIN_IMAGE_SIZE` are listed under ``undecodable``, not fatal.
    ``limit`` caps the images evaluated. ``id_network`` is "arcface", "moco" or "none" (no ID rows);
    ``id_weights=None`` leaves it random (flagged in ``setup``). Returns a JSON-ready dict (see
    :func:`write_report`); ``per_image`` holds every image's values.
    """
    _check_settings(batch_size, limit, id_network)
    edits = _edits(edit)
    for name, strength in edits:  # an unknown direction or a strength out of range fails before any work
        inverter.directions.check_strength(name, strength)
    device = inverter.device
    suite = MetricSuite(lpips_pretrained_backbone, id_network="none", ssim_window=ssim_window).to(device)
    id_net = IDLoss(id_network, id_weights, id_backbone).to(device) if id_network != "none" else None

    per_image: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    invert_times: list[float] = []  # per image, timed invert() = G(w+, f) only
    metric_times: list[float] = []  # per image, invert() with G(w) and G(w+) too
    for n_batch, (keys, batch) in enumerate(_decoded_batches(images, batch_size, limit, errors)):
        x = inverter.preprocess(batch)  # on the host: decoding and resizing are not timed
        if timing:
            if n_batch == 0:
                for _ in range(WARMUP_CALLS):
                    inverter.invert(x)
            invert_times.append(_timed(inverter, lambda x=x: inverter.invert(x)) / len(keys))
        start = _now(device)
        inv = inverter.invert(x, extra_outputs=("w", "w_plus"))
        metric_times.append((_now(device) - start) / len(keys))
        edited = inverter.edit(inv, edits) if edits and id_net is not None else None
        per_image += _rows(keys, x.to(device), inv, suite, id_net, edited)
        if (n_batch + 1) % 50 == 0:
            log.info("evaluated %d images", len(per_image))
    if not per_image:
        why = f"; all {len(errors)} failed to decode, e.g. {errors[0]}" if errors else ""
        raise EvaluationError(f"no images to evaluate in {source or 'the input'}{why}")

    columns = _columns(per_image, edits, id_net is not None, invert_times if timing else None)
    return {
        "model_id": inverter.model_id,
        "input": source,
        "images": len(per_image),
        "undecodable": {"count": len(errors), "items": errors},
        "columns": columns,
        "timing": _timing_summary(invert_times, metric_times, timing, device),
        "setup": _setup(inverter, batch_size, ssim_window, lpips_pretrained_backbone, id_network, id_weights,
                        id_backbone, edits),
        "per_image": per_image,
    }


def _check_settings(batch_size: int, limit: int | None, id_network: str) -> None:
    if batch_size < 1:
        raise EvaluationError(f"batch_size = {batch_size}: must be >= 1")
    if limit is not None and limit < 1:
        raise EvaluationError(f"limit = {limit}: must be >= 1 (or None for all images)")
    if id_network not in ("arcface", "moco", "none"):
        raise EvaluationError(f"id_network must be 'arcface', 'moco' or 'none', got {id_network!r}")


def _rows(keys: list[str], target: torch.Tensor, inv: Any, suite: MetricSuite, id_net: IDLoss | None,
          edited: torch.Tensor | None) -> list[dict[str, Any]]:
    """One batch's per-image values: every metric of each output column against the input, and the ID that
    the ``edited`` images keep (when an ID network is on)."""
    rows: list[dict[str, Any]] = [{"key": k} for k in keys]
    # identity embeddings are computed once per image and reused across comparisons (= id_similarity)
    embed = _Embeddings(id_net)
    for column, (output, _) in COLUMNS.items():
        image = inv.image if output == "f" else inv.extra_images[output]
        values = suite.per_image(image, target)
        if id_net is not None:
            values["id"] = embed.similarity(target, image, output)
        for name, v in values.items():
            for row, value in zip(rows, v.double().cpu().tolist()):
                row[f"{column}.{name}"] = value
    if edited is not None and id_net is not None:
        for row, value in zip(rows, embed.similarity(inv.image, edited, None, "f").double().cpu().tolist()):
            row["CLCAE.id_after_edit"] = value
    return rows


class _Embeddings:
    """Cosine similarities of identity embeddings (as :func:`clcae.metrics.id_similarity`), each image embedded
    once: the input and G(w+, f) are compared several times."""

    def __init__(self, net: IDLoss | None):
        self.net = net
        self.cache: dict[str, torch.Tensor] = {}

    def _embed(self, images: torch.Tensor, name: str | None) -> torch.Tensor:
        if name is None:
            return self.net.embed(images)
        if name not in self.cache:
            self.cache[name] = self.net.embed(images)
        return self.cache[name]

    @torch.no_grad()
    def similarity(self, target: torch.Tensor, pred: torch.Tensor, pred_name: str | None,
                   target_name: str = "input") -> torch.Tensor:
        check_pair(pred, target)
        return (self._embed(pred, pred_name) * self._embed(target, target_name)).sum(dim=1)


def _edits(edit: Sequence[tuple[str, float]] | Mapping[str, float] | None) -> list[tuple[str, float]]:
    if not edit:
        return []
    pairs = list(edit.items()) if isinstance(edit, Mapping) else list(edit)
    return [(str(name), float(strength)) for name, strength in pairs]


def parse_edit(spec: str) -> tuple[str, float]:
    """``"smile=2.0"`` -> ("smile", 2.0)."""
    name, sep, value = spec.partition("=")
    try:
        strength = float(value)
    except ValueError:
        strength = math.nan
    if not sep or not name.strip() or not math.isfinite(strength):
        raise EvaluationError(f"edit {spec!r}: expected NAME=STRENGTH with a finite number, e.g. smile=2.0")
    return name.strip(), strength


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    return time.perf_counter()


def _timed(inverter: Inverter, call) -> float:
    start = _now(inverter.device)
    call()
    return _now(inverter.device) - start


def _stats(values: Sequence[float]) -> dict[str, Any]:
    """mean, population std (as MetricSuite), n; infinite values (identical images' PSNR) are counted apart."""
    arr = np.asarray(values, np.float64)
    finite = arr[np.isfinite(arr)]
    out: dict[str, Any] = {"mean": float(finite.mean()) if len(finite) else None,
                           "std": float(finite.std()) if len(finite) else None, "n": int(len(arr))}
    if len(finite) < len(arr):
        out["n_infinite"] = int(np.isinf(arr).sum())
        out["note"] = "mean and std over the finite values; +inf PSNR = an exact reconstruction"
    return out


def _missing(note: str) -> dict[str, Any]:
    return {"mean": None, "std": None, "n": 0, "note": note}


def _columns(per_image: list[dict[str, Any]], edits: list[tuple[str, float]], has_id: bool,
             invert_times: list[float] | None) -> dict[str, dict[str, Any]]:
    columns: dict[str, dict[str, Any]] = {}
    for column, (_, what) in COLUMNS.items():
        entry: dict[str, Any] = {"output": what}
        for name in METRICS:
            if name == "id" and not has_id:
                entry[name] = _missing("no ID network (id_network='none')")
            else:
                entry[name] = _stats([row[f"{column}.{name}"] for row in per_image])
        if column != "CLCAE":
            entry["time_s"] = _missing("one inversion computes w, w+ and f: timed once, in the CLCAE column")
            entry["id_after_edit"] = _missing("measured for G(w+, f) only")
        else:
            if invert_times is None:
                entry["time_s"] = _missing("timing disabled")
            else:
                arr = np.asarray(invert_times)
                entry["time_s"] = {"median": float(np.median(arr)), "mean": float(arr.mean()),
                                   "std": float(arr.std()), "n_batches": int(len(arr))}
            if not edits:
                entry["id_after_edit"] = _missing("no edit requested")
            elif not has_id:
                entry["id_after_edit"] = _missing("no ID network (id_network='none')")
            else:
                entry["id_after_edit"] = _stats([row["CLCAE.id_after_edit"] for row in per_image])
        columns[column] = entry
    return columns


def _timing_summary(invert_times: list[float], metric_times: list[float], timing: bool,
                    device: torch.device) -> dict[str, Any]:
    sync = {"cuda": "torch.cuda.synchronize()", "mps": "torch.mps.synchronize()"}.get(device.type, "none needed (CPU)")
    return {
        "method": ("per-image time = wall time (time.perf_counter) of one Inverter.invert call (encoder + G(w+, f)) "
                   "/ batch size, median and mean over batches; decoding and resizing excluded, host-to-device "
                   "copy included"),
        "enabled": timing,
        "warmup_calls": WARMUP_CALLS if timing else 0,
        "synchronize": sync,
        "per_image_s": ({"median": float(np.median(invert_times)), "mean": float(np.mean(invert_times)),
                         "n_batches": len(invert_times)} if invert_times else None),
        "with_extra_outputs_per_image_s": {
            "median": float(np.median(metric_times)), "mean": float(np.mean(metric_times)),
            "n_batches": len(metric_times),
            "what": "the metrics' invert call rendering G(w), G(w+) and G(w+, f); the first batch is not warm "
                    "when timing is disabled"},
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs)"


def _setup(inverter: Inverter, batch_size: int, ssim_window: str, lpips_pretrained: bool, id_network: str,
           id_weights: str | None, id_backbone: str, edits: list[tuple[str, float]]) -> dict[str, Any]:
    if id_network == "none":
        id_info: dict[str, Any] = {"network": "none", "random": None}
    else:
        id_info = {"network": id_network, "backbone": id_backbone if id_network == "arcface" else "resnet50",
                   "weights": id_weights, "random": id_weights is None,
                   "input": "pSp's face crop pooled to 112" if id_network == "arcface" else "resized to 224"}
    return {
        "device": str(inverter.device),
        "device_name": _device_name(inverter.device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "input_size": list(inverter.input_size),
        "psnr": "images mapped to [0, 1] and clamped, data range 1, no 8-bit rounding",
        "ssim_window": ssim_window,
        "ssim": SSIM_DESCRIPTION[ssim_window],
        "lpips": {"net": "alex", "size": LPIPS_SIZE, "range": "[-1, 1]",
                  "backbone": "ImageNet-pretrained" if lpips_pretrained else "random (lpips_pretrained=false)",
                  "random": not lpips_pretrained},
        "id": id_info,
        "edit": [{"name": n, "strength": s} for n, s in edits],
        "id_after_edit": "ID similarity between G(w+, f) and the edited image G(w^+, f^)",
    }


# ---------------------------------------------------------------------------------------------------
# Report


def _cell(stat: Mapping[str, Any], digits: int) -> str:
    if stat.get("median") is not None:
        return f"{stat['median']:.4g} (mean {stat['mean']:.4g})"
    if stat.get("mean") is None:
        return "n/a"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def to_markdown(result: Mapping[str, Any]) -> str:
    """Table 1 layout (metric rows, CLCAE_w / CLCAE_w+ / CLCAE columns) with a header stating the setup."""
    s, t = result["setup"], result["timing"]
    lpips = s["lpips"]
    lpips_note = ("ImageNet-pretrained backbone" if not lpips["random"]
                  else "**RANDOM backbone** (lpips_pretrained=false): not comparable with published numbers")
    ident = s["id"]
    if ident["network"] == "none":
        id_note = "not computed (no ID network)"
    else:
        weights = f"weights `{ident['weights']}`" if ident["weights"] else "**RANDOM weights**: values are meaningless"
        id_note = f"{ident['network']} {ident['backbone']} ({ident['input']}), {weights}"
    edit = ", ".join(f"{e['name']}={e['strength']:g}" for e in s["edit"]) or "none"
    timing = (f"{t['method']}; {t['warmup_calls']} warm-up calls on the first batch, not timed; "
              f"synchronisation: {t['synchronize']}" if t["enabled"] else "disabled")
    undecodable = result["undecodable"]["count"]
    lines = [
        f"# CLCAE evaluation: {result['model_id']}",
        "",
        f"- input: `{result['input']}`: {result['images']} images evaluated, {undecodable} undecodable"
        + (" (listed in metrics.json)" if undecodable else ""),
        f"- device: {s['device']} ({s['device_name']}), torch {s['torch']}, {s['threads']} CPU threads",
        f"- batch size: {s['batch_size']}; input size {s['input_size'][0]}x{s['input_size'][1]}, "
        "every output compared with the resized input",
        f"- time: {timing}",
        f"- PSNR: {s['psnr']}; SSIM: {s['ssim']} (`{s['ssim_window']}`)",
        f"- LPIPS: {lpips['net']} at {lpips['size']}x{lpips['size']}, inputs in {lpips['range']}; {lpips_note}",
        f"- ID: {id_note}",
        f"- edit: {edit}; \"ID after edit\" = {s['id_after_edit']}",
        "- values: mean ± std over images (population std); time: median (mean) seconds per image",
        "",
        "| | " + " | ".join(f"{c} = {result['columns'][c]['output']}" for c in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    digits = {"psnr": 2}
    for key, label in ROWS:
        cells = [_cell(result["columns"][c][key], digits.get(key, 3)) for c in COLUMNS]
        if key == "time_s":
            cells = [cell if cell != "n/a" or c == "CLCAE" else "—" for c, cell in zip(COLUMNS, cells)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(result: Mapping[str, Any], out_dir: str, storage: StorageConfig | None = None) -> dict[str, str]:
    """``metrics.json`` (everything but the per-image rows), ``metrics.md`` and ``per_image.csv`` under
    ``out_dir`` (any URI). Returns the written URIs."""
    summary = {k: v for k, v in result.items() if k != "per_image"}
    paths = {name: st.join(out_dir, name) for name in ("metrics.json", "metrics.md", "per_image.csv")}
    st.write_bytes(paths["metrics.json"], json.dumps(summary, indent=2, allow_nan=False).encode(), storage)
    st.write_bytes(paths["metrics.md"], to_markdown(result).encode(), storage)
    rows = result.get("per_image", [])
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    st.write_bytes(paths["per_image.csv"], buf.getvalue().encode(), storage)
    return paths
