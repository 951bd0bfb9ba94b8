"""Bulk inversion on Ray Data: image shards or folders -> a Parquet latent table + an errors table.

    read (shards: key + image bytes; folders: file bytes)
      -> decode + validate          a bad image becomes a row with an ``error``, never an exception; Ray Data CPU
                                    tasks of their own (torch-free), overlapping the model; uint8 pixels out
      -> invert                     actor pool, the library's Inverter loaded once per actor (GPU when set);
                                    uint8 -> [-1, 1] on the actor's device
      -> LatentTableSink            one write per ~``infer.rows_per_file`` rows: latents/part-*.parquet and
                                    errors/part-*.parquet, each file written atomically

Layout of ``OUT``: ``latents/`` (key, source, w, w_plus[, f][, psnr], model_id) with fixed-size list columns any
Parquet reader understands, zstd; ``errors/`` (key, source, error).  Every input row ends in exactly one of
them: inputs == latents + errors.  Keys are unique across the inputs (one input: paths relative to it; several:
prefixed by each input's path from their common folder, :func:`key_prefixes`).  A re-run reads the keys already
written and skips them, so it resumes an interrupted run and never duplicates a key; part files are named by a
hash of their keys, so a retried write task replaces its own file instead of adding a second copy.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import math
import os
import posixpath
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import split_protocol

# torch, the model and the aligner are imported inside the functions that run in the inversion actors: the
# read/decode tasks import this module too, and must start without torch (seconds per worker process).
from clcae.config import CLCAEConfig, InferConfig, StorageConfig, from_dict, n_latent, to_dict
from clcae.data import storage as st
from clcae.data.images import (
    IMAGE_SUFFIXES,
    MIN_IMAGE_SIZE,
    InputError,
    check_min_size,
    decode_input_image,
    encode_png,
    tensor_to_pil,
    to_pixels,
    uint8_to_unit,
)
from clcae.data.shards import ALIGN_COLUMNS, FACE_KEY, read_shards, validate_shards
from clcae.errors import CLCAEError
from clcae.train.runtime import fixed_size_cluster, require_resources

log = logging.getLogger(__name__)

MAX_EXAMPLES = 3  # error rows quoted in the job's summary
DECODED_BLOCK_BYTES = 16 * 2**20  # Ray Data blocks of decoded pixels: at least this, or two batches
ERRORS_SCHEMA = pa.schema([("key", pa.string()), ("source", pa.string()), ("error", pa.string())])


# Columns of a latent table made from raw photos (``infer.align``): where each face lies in its photo, so an edit
# can be pasted back. The shard format's alignment columns (clcae.data.shards.ALIGN_COLUMNS) plus the number of
# faces of the photo, which tells a re-run whether a photo is complete.
FACE_COLUMNS = ("source_key", "face_index", "face_count", "score", "quad", "landmarks")


def latent_schema(style_dim: int, n_latent: int, feature_size: int | None = None, psnr: bool = True,
                  aligned: bool = False) -> pa.Schema:
    fields = [("key", pa.string()), ("source", pa.string()),
              ("w", pa.list_(pa.float32(), style_dim)),
              ("w_plus", pa.list_(pa.float32(), n_latent * style_dim))]
    if aligned:
        fields += [(name, ALIGN_COLUMNS.get(name, pa.int32())) for name in FACE_COLUMNS]
    if feature_size:
        fields.append(("f", pa.list_(pa.float16(), feature_size)))
    if psnr:
        fields.append(("psnr", pa.float32()))
    fields.append(("model_id", pa.string()))
    meta = {b"w_plus_shape": f"{n_latent},{style_dim}".encode(), b"clcae": b"latent-table/1"}
    return pa.schema(fields, metadata=meta)


# --------------------------------------------------------------------------------------------- inputs
class BatchInputError(CLCAEError, ValueError):
    """Inputs the job refuses before anything starts (overlapping inputs, a folder of both images and Parquet
    files, an input inside the output, a key twice); the message names what was found and how to fix it."""


@dataclass
class Inputs:
    shard_files: list[str]
    image_files: list[tuple[str, str]]  # (uri, key)
    partial: dict[str, list[str]]       # shard file -> keys already done in it (only partly done files)
    total: int                          # rows in the input (done ones included)
    skipped: int                        # rows already in the output
    shard_prefix: dict[str, str] = dataclass_field(default_factory=dict)  # shard file -> prefix of its keys ('' = none)
    skipped_errors: int = 0             # of the skipped rows, those in the errors table
    skip_faces: list[str] = dataclass_field(default_factory=list)  # faces written of photos not yet complete


def table_keys(out_uri: str, cfg: CLCAEConfig, sub: str) -> set[str]:
    """Keys already in the ``sub`` ("latents" or "errors") table (only the key column is read)."""
    keys: set[str] = set()
    for uri in st.list_files(st.join(out_uri, sub), cfg.storage):
        fs, path = st.filesystem(uri, cfg.storage)
        with fs.open(path, "rb") as fh:
            keys.update(pq.read_table(fh, columns=["key"]).column("key").to_pylist())
    return keys


def complete_photos(out_uri: str, cfg: CLCAEConfig) -> set[str]:
    """Photo keys whose every face is in the latent table (``face_count`` rows with their ``source_key``)."""
    seen: dict[str, int] = {}
    count: dict[str, int] = {}
    for uri in st.list_files(st.join(out_uri, "latents"), cfg.storage):
        fs, path = st.filesystem(uri, cfg.storage)
        with fs.open(path, "rb") as fh:
            names = pq.read_schema(fh).names
            if "face_count" not in names:
                raise BatchInputError(f"{out_uri} holds a latent table of aligned crops, not of photos (no face_count "
                                      "column): write photos aligned with infer.align into another output")
            fh.seek(0)
            t = pq.read_table(fh, columns=["source_key", "face_count"])
        for k, n in zip(t.column("source_key").to_pylist(), t.column("face_count").to_pylist()):
            seen[k] = seen.get(k, 0) + 1
            count[k] = n
    return {k for k, n in seen.items() if n >= count[k]}


def done_keys(out_uri: str, cfg: CLCAEConfig) -> set[str]:
    """Keys already in the latent or errors table (only the key column is read)."""
    return table_keys(out_uri, cfg, "latents") | table_keys(out_uri, cfg, "errors")


def _location(uri: str, storage: StorageConfig | None) -> tuple[str, str]:
    """(protocol, path without protocol or trailing slash): what decides whether two URIs overlap."""
    return st.protocol(uri), st.filesystem(uri, storage)[1].rstrip("/") or "/"


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def key_prefixes(uris: list[str], storage: StorageConfig | None = None) -> dict[str, str]:
    """Input URI -> the prefix of its rows' keys.

    One input: no prefix, so its keys are the files' paths relative to it (or its shards' keys), as they always
    were, and existing tables resume. Several inputs: each input's path relative to the inputs' common parent
    folder (``--input data/a data/b`` -> ``a/...`` and ``b/...``), so equal file names or shard keys in two inputs
    stay two keys, and the keys do not depend on the order of ``--input``. Overlapping inputs (one inside
    another, or one given twice) would make the same file two rows: refused.
    """
    if len(uris) == 1:
        return {uris[0]: ""}
    locations = [_location(u, storage) for u in uris]
    for i, (proto_a, a) in enumerate(locations):
        for j, (proto_b, b) in enumerate(locations[i + 1:], i + 1):
            if proto_a == proto_b and (_inside(a, b) or _inside(b, a)):
                inner, outer = (uris[i], uris[j]) if _inside(a, b) else (uris[j], uris[i])
                raise BatchInputError(f"inputs overlap: {inner} is {'the same as' if a == b else 'inside'} {outer}, "
                                      "so its files would be inverted twice; give each folder once")
    if len({proto for proto, _ in locations}) > 1:  # no common folder across storages: the whole location
        return {u: f"{proto}/{path.lstrip('/')}" for u, (proto, path) in zip(uris, locations)}
    common = posixpath.commonpath([path for _, path in locations])
    return {u: path[len(common):].lstrip("/") for u, (_, path) in zip(uris, locations)}


def plan_inputs(uris: Iterable[str], out_uri: str, cfg: CLCAEConfig) -> Inputs:
    """Expand input URIs into shard files and image files, minus what the output already holds.

    Keys are unique across all inputs (see :func:`key_prefixes`); a folder holding both images and Parquet
    files, an input inside the output, or a key found twice is a BatchInputError before anything runs. Files
    under the output folder are never inputs, so the output may live inside an input folder.
    """
    uris = list(uris)
    prefixes = key_prefixes(uris, cfg.storage)
    out_proto, out_path = _location(out_uri, cfg.storage)
    failed = table_keys(out_uri, cfg, "errors")
    # Aligned photos: rows are faces keyed <photo key>#face<i>; a photo is done when it is an error row or all its
    # faces are in the table.
    written = complete_photos(out_uri, cfg) if cfg.infer.align else table_keys(out_uri, cfg, "latents")
    done = written | failed
    shard_files, images, partial, shard_prefix, total, skipped, skipped_errors = [], [], {}, {}, 0, 0, 0
    seen: dict[str, str] = {}  # key -> where it came from: a key twice is refused, never written twice

    def add(key: str, source: str) -> bool:
        """Count one input row; True when it still has to be done."""
        nonlocal total, skipped, skipped_errors
        if key in seen:
            raise BatchInputError(f"key {key!r} is in {seen[key]} and in {source}: keys must be unique across "
                                  "the job's inputs (rewrite one shard set with other keys, or invert them into "
                                  "separate outputs)")
        seen[key] = source
        total += 1
        if key in done:
            skipped += 1
            skipped_errors += key in failed
            return False
        return True

    for uri in uris:
        proto, path = _location(uri, cfg.storage)
        if proto == out_proto and _inside(path, out_path):
            raise BatchInputError(f"input {uri} is inside the output folder {out_uri}: the job would read its own "
                                  "output; write the output somewhere else")
        found = st.list_files(uri, cfg.storage, suffix="")
        is_dir = found != [uri]
        if proto == out_proto and _inside(out_path, path):
            # The output inside this input (e.g. --input data --output data/latents): its Parquet files are the
            # job's own output, not shards, and must not be read back on a re-run.
            kept = [u for u in found if not _inside(split_protocol(u)[1], out_path)]
            if len(kept) < len(found):
                log.info("%s: not reading the %d file(s) of the output folder %s", uri, len(found) - len(kept),
                         out_uri)
            found = kept
        parquet = [u for u in found if u.lower().endswith(".parquet")]
        image_uris = [u for u in found if u.lower().endswith(IMAGE_SUFFIXES)]
        if parquet and image_uris:
            raise BatchInputError(
                f"{uri} holds {len(image_uris)} image file(s) (e.g. {image_uris[0]}) and {len(parquet)} Parquet "
                f"file(s) (e.g. {parquet[0]}): an input is either image shards or images, never both. Move the "
                "Parquet file(s) out of the folder, or give the shards and the images as separate --input URIs "
                "(a shard folder or file, and an image folder or the image files)")
        if len(parquet) + len(image_uris) < len(found):
            log.info("%s: skipping %d file(s) that are neither images %s nor Parquet shards", uri,
                     len(found) - len(parquet) - len(image_uris), IMAGE_SUFFIXES)
        prefix = prefixes[uri]
        if parquet:
            for f in validate_shards(parquet, cfg.storage):
                fs, fpath = st.filesystem(f, cfg.storage)
                with fs.open(fpath, "rb") as fh:
                    keys = pq.read_table(fh, columns=["key"]).column("key").to_pylist()
                keys = [f"{prefix}/{k}" if prefix else k for k in keys]
                todo = [add(k, f) for k in keys]
                if any(todo):
                    shard_files.append(f)
                    shard_prefix[f] = prefix
                    if not all(todo):
                        partial[f] = [k for k, t in zip(keys, todo) if not t]
            continue
        if not image_uris:
            raise st.StorageError(f"no Parquet shards or images found at {uri}")
        for u in image_uris:
            if is_dir:
                rel = split_protocol(u)[1][len(path) + 1:]
                key = f"{prefix}/{rel}" if prefix else rel
            else:  # a file given as the input: its name, or its path from the inputs' common folder
                key = prefix or posixpath.basename(split_protocol(u)[1])
            if add(key, u):
                images.append((u, key))
    skip_faces: list[str] = []
    if cfg.infer.align:
        written = table_keys(out_uri, cfg, "latents")
        skip_faces = sorted(k for k in written if k.rsplit("#face", 1)[0] not in done)
    return Inputs(shard_files, images, partial, total, skipped, shard_prefix, skipped_errors, skip_faces)


# --------------------------------------------------------------------------------------------- failures
class TransientError(RuntimeError):
    """A failure that is not the input's fault (out of memory, a storage timeout): Ray Data retries the task
    (``infer.max_retries`` times, with backoff) and the job fails if it persists. Never an errors-table row, since
    a re-run skips those and the image would never be inverted."""


# Ray Data retries a map task whose exception text matches one of these (``DataContext.retried_map_errors``,
# matched against "ClassName: message" of the exception and its cause).
RETRIED_ERRORS = [TransientError.__name__]
# A file that cannot be read because of the file itself: its own error row. Any other read failure (timeouts,
# connection resets, throttling, 5xx) is the storage's, and transient.
INPUT_READ_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


# --------------------------------------------------------------------------------------------- timing
# Where the job's time goes, counted where it is spent and carried to the sink as columns of the rows themselves
# (a stage's seconds for a batch on the batch's first row, 0 on the others), so the totals are exact across
# processes and cost no extra messages. Neither table stores them.  Seconds are summed over batches: stages that
# overlap (decode tasks beside the inversion actor) can add up to more than the job's wall time.
#   t_read    reading image files (folder inputs; Parquet shards are read by Ray's own read tasks)
#   t_decode  decoding, validating and resizing to uint8 pixels (or aligning faces)
#   t_load    an actor's construction: imports and building/loading the model (one value per actor start)
#   t_invert  the actor's work on a batch: uint8 -> [-1, 1] on the device, the model, PSNR, the output arrays
#   t_invert_cpu  the CPU time the actor's process got for that work (all its threads): below t_invert when the
#             machine's other processes take the cores
#   t_ready   wall clock (time.time()) at which an actor finished loading its model (first batch's first row)
#   t_first   wall clock at which an actor received its first batch
#   t_done    wall clock at which an actor finished a batch (the sink keeps the latest)
TIMING_COLUMNS = ("t_read", "t_decode", "t_load", "t_invert", "t_invert_cpu", "t_ready", "t_first", "t_done")
EARLIEST, LATEST = ("t_ready", "t_first"), ("t_done",)


# CPUs Ray Data reserves per read/decode task (the actors' share must differ, see invert_to_table), and the model
# batches a read task of image files takes on.
DECODE_CPUS = 0.5
IMAGE_BATCHES_PER_TASK = 4


def _on_first_row(n: int, value: float) -> np.ndarray:
    col = np.zeros(n, np.float64)
    if n:
        col[0] = value
    return col


def _seconds(batch: dict[str, np.ndarray], name: str) -> float:
    """The total of a timing column over a batch (0 when the batch does not carry it)."""
    return float(np.sum(batch[name])) if name in batch else 0.0


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA/MPS out of memory, or a host allocation failure (torch raises a RuntimeError for those)."""
    import torch

    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


# --------------------------------------------------------------------------------------------- faults
@dataclass
class BatchFaults:
    """Fault injection for tests and drills, each at most once per job (the marker file records that it happened,
    across processes and retries): a storage timeout on the first file read, an out-of-memory error on the first
    inversion call, and the first inversion actor killing itself (SIGKILL) mid-batch.

    ``hold_marker``: every inversion actor touches ``{hold_marker}.init.{pid}`` when it starts and, at its
    ``hold_call``-th batch, touches ``{hold_marker}.held.{pid}`` and waits (at most ``hold_s`` seconds) until the
    file ``hold_marker`` exists: a drill kills a node while both actors hold a batch, then creates the file."""

    read_timeout_marker: str | None = None
    oom_marker: str | None = None
    die_marker: str | None = None
    hold_marker: str | None = None
    hold_call: int = 2
    hold_s: float = 300.0


def _fault_due(marker: str | None) -> bool:
    """True once per marker file: the first caller creates it."""
    if not marker:
        return False
    try:
        with open(marker, "x"):
            return True
    except FileExistsError:
        return False


# --------------------------------------------------------------------------------------------- stages
def decode_rows(batch: dict[str, np.ndarray], size: tuple[int, int], skip: dict[str, list[str]] | None = None,
                min_size: int = MIN_IMAGE_SIZE) -> dict[str, np.ndarray]:
    """key/source/image bytes -> key/source/pixels (B, H, W, 3) uint8 at the input size, error ('' if fine)."""
    start = time.perf_counter()
    keys, sources, images = batch["key"], batch["source"], batch["image"]
    read_errors = batch["error"] if "error" in batch else [""] * len(keys)
    skip_sets = {k: set(v) for k, v in (skip or {}).items()}
    out_keys, out_sources, errors, pixels = [], [], [], []
    h, w = size
    for key, source, data, read_error in zip(keys, sources, images, read_errors):
        if source in skip_sets and key in skip_sets[source]:
            continue
        arr, error = np.zeros((h, w, 3), np.uint8), str(read_error)
        try:
            if error:
                raise InputError(error)
            im = decode_input_image(bytes(data), min_size)
            arr = to_pixels(im, size)
        except InputError as exc:
            error = str(exc)
        except MemoryError as exc:  # the worker's memory, not the image (bombs are refused by size first)
            raise TransientError(f"out of memory while decoding {key}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - one bad image must never stop the job
            error = f"{type(exc).__name__}: {exc}"
        out_keys.append(str(key))
        out_sources.append(str(source))
        errors.append(error)
        pixels.append(arr)
    n = len(out_keys)
    return {"key": np.asarray(out_keys, dtype=object), "source": np.asarray(out_sources, dtype=object),
            "error": np.asarray(errors, dtype=object),
            "pixels": np.stack(pixels) if pixels else np.zeros((0, h, w, 3), np.uint8),
            "t_read": _on_first_row(n, _seconds(batch, "t_read")),
            "t_decode": _on_first_row(n, time.perf_counter() - start)}


@functools.lru_cache(maxsize=2)
def _aligner(domain: str, size: tuple[int, int], largest_only: bool):
    """One detector per worker process (Ray reuses processes across tasks): MTCNN is built once, not per batch."""
    from clcae.align import Aligner

    return Aligner(domain, size, largest_only=largest_only)  # type: ignore[arg-type]


def align_rows(batch: dict[str, np.ndarray], domain: str, size: tuple[int, int], largest_only: bool = False,
               skip: Iterable[str] = (), min_size: int = MIN_IMAGE_SIZE) -> dict[str, np.ndarray]:
    """key/source/image bytes of raw photos -> one row per face: key ``<photo key>#face<i>`` (0 = largest), the
    aligned crop as pixels (B, H, W, 3) and where it lies in the photo (quad, landmarks, score, face index and
    count). A photo that cannot be used (unreadable, too small, no face) is one error row under its own key."""
    start = time.perf_counter()
    keys, sources, images = batch["key"], batch["source"], batch["image"]
    read_errors = batch["error"] if "error" in batch else [""] * len(keys)
    skip = set(skip)
    h, w = size
    rows: dict[str, list] = {k: [] for k in ("key", "source", "error", "pixels", *FACE_COLUMNS)}

    def emit(key, source, error, pixels=None, photo_key="", index=-1, count=0, score=np.nan, quad=None, lm=None):
        rows["key"].append(key)
        rows["source"].append(source)
        rows["error"].append(error)
        rows["pixels"].append(np.zeros((h, w, 3), np.uint8) if pixels is None else pixels)
        rows["source_key"].append(photo_key)
        rows["face_index"].append(index)
        rows["face_count"].append(count)
        rows["score"].append(np.nan if score is None else score)
        rows["quad"].append(np.full(8, np.nan) if quad is None else np.asarray(quad, np.float64).reshape(8))
        rows["landmarks"].append(np.full(10, np.nan) if lm is None else np.asarray(lm, np.float64).reshape(10))

    photos, names, where = [], [], []
    for key, source, data, read_error in zip(keys, sources, images, read_errors):
        key, source = str(key), str(source)
        try:
            if read_error:
                raise InputError(str(read_error))
            im = decode_input_image(bytes(data), min_size)  # EXIF-oriented: quads are in the photo as viewed
            photos.append(im)
            names.append(key)
            where.append(source)
        except InputError as exc:
            emit(key, source, str(exc), photo_key=key)
        except MemoryError as exc:
            raise TransientError(f"out of memory while decoding {key}: {exc}") from exc
    if photos:
        for key, source, result in zip(names, where, _aligner(domain, size, largest_only).align_batch(photos, names)):
            if isinstance(result, Exception):  # NoFaceError and friends: the photo's own error row
                emit(key, source, str(result), photo_key=key)
                continue
            for crop in result:
                face_key = FACE_KEY.format(key=key, index=crop.index)
                if face_key in skip:  # written by an earlier, interrupted run
                    continue
                check_min_size(crop.image, min_size)
                emit(face_key, source, "", np.asarray(crop.image, np.uint8), key, crop.index, len(result),
                     crop.score, crop.quad, crop.landmarks)
    n = len(rows["key"])
    out = {k: np.asarray(v, dtype=object) for k, v in rows.items() if k in ("key", "source", "error", "source_key")}
    out["pixels"] = np.stack(rows["pixels"]) if n else np.zeros((0, h, w, 3), np.uint8)
    out["face_index"] = np.asarray(rows["face_index"], np.int32)
    out["face_count"] = np.asarray(rows["face_count"], np.int32)
    out["score"] = np.asarray(rows["score"], np.float32)
    out["quad"] = np.stack(rows["quad"]) if n else np.zeros((0, 8))
    out["landmarks"] = np.stack(rows["landmarks"]) if n else np.zeros((0, 10))
    out["t_read"] = _on_first_row(n, _seconds(batch, "t_read"))
    out["t_decode"] = _on_first_row(n, time.perf_counter() - start)
    return out


def check_actor_capacity(i: InferConfig, available: dict[str, float], decode_cpus: float) -> None:
    """Refuse a job a Ray cluster that cannot grow could never run: the actors, and beside them at least one decode
    task, must fit its CPUs, and with infer.use_gpu each actor needs a GPU.  Ray Data would otherwise wait for them
    forever (measured: infer.use_gpu=true without a GPU, or 2 actors of 2 CPUs on a 4-CPU local Ray)."""
    gpu = "a GPU each (infer.use_gpu), " if i.use_gpu else ""
    require_resources(
        {"CPU": i.actors * i.cpus_per_actor + decode_cpus, "GPU": i.actors if i.use_gpu else 0}, available,
        f"the job cannot run on this Ray cluster: infer.actors={i.actors} actors of infer.cpus_per_actor="
        f"{i.cpus_per_actor:g} CPUs, {gpu}with {decode_cpus:g} CPUs for decoding beside them,",
        "Lower infer.actors or infer.cpus_per_actor"
        + (", drop infer.use_gpu where torch sees no CUDA device" if i.use_gpu else "")
        + ", or run on a cluster that has them (RAY_ADDRESS)")


def concurrent_batches(infer: InferConfig) -> int:
    """Batches an inversion actor runs at once (``infer.concurrent_batches``; null: one per whole CPU of a CPU
    actor, one on a GPU)."""
    if infer.concurrent_batches is not None:
        return int(infer.concurrent_batches)
    return 1 if infer.use_gpu else max(1, int(infer.cpus_per_actor))


class InvertActor:
    """Ray Data actor: the Inverter, built once per actor. It may run several batches at once on threads of its
    own (``concurrent_batches``): the model is read-only at inference, so they share it."""

    def __init__(self, config: dict[str, Any], source: Any, device: str, with_f: bool, psnr: bool,
                 faults: BatchFaults | None = None, edits: list[tuple[str, float]] | None = None,
                 edited_uri: str | None = None):
        start = time.perf_counter()
        import torch

        from clcae.factory import latent_shapes
        from clcae.inference import Inverter

        cfg = from_dict(config)
        self.edits, self.edited_uri, self.storage = list(edits or []), edited_uri, cfg.storage
        # Several batches at once share the actor's CPUs between them: on this project's CPU, 2 batches of 16
        # tiny-config images on one thread each ran 1.3-1.6x the images/s of one batch on 2 threads.
        concurrent = concurrent_batches(cfg.infer)
        torch.set_num_threads(max(1, int(cfg.infer.cpus_per_actor) // concurrent))
        # process_time counts torch's intra-op threads; with concurrent calls each on one thread, thread_time counts
        # the call's own work and not the others'
        self.cpu_clock = time.process_time if concurrent == 1 else time.thread_time
        self.lock = threading.Lock()  # the call count and the first batch's report, across concurrent calls
        # ``source``: the ModelSource the driver resolved (each actor reads the weights once), or None
        self.inverter = (Inverter.load(source, cfg, device=device) if source is not None
                         else Inverter.from_config(cfg, device=device))
        self.with_f, self.psnr = with_f, psnr
        self.f_size = math.prod(latent_shapes(cfg)["f"])
        self.faults = faults or BatchFaults()
        self.calls = 0
        self.load_s, self.ready_at = time.perf_counter() - start, time.time()  # reported with the first batch
        if self.faults.hold_marker:
            open(f"{self.faults.hold_marker}.init.{os.getpid()}", "w").close()

    def _hold(self, call: int) -> None:
        marker = self.faults.hold_marker
        if not marker or call != self.faults.hold_call or os.path.exists(marker):
            return
        open(f"{marker}.held.{os.getpid()}", "w").close()
        deadline = time.monotonic() + self.faults.hold_s
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.05)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.lock:
            self.calls += 1
            call, ready_at, load_s = self.calls, self.ready_at, self.load_s
            self.ready_at = None  # reported once, with the actor's first batch
        self._hold(call)
        arrived, start, cpu = time.time(), time.perf_counter(), self.cpu_clock()
        if _fault_due(self.faults.die_marker):
            os.kill(os.getpid(), signal.SIGKILL)

        g = self.inverter.model.decoder
        b, d, n = len(batch["key"]), g.style_dim, g.n_latent
        ok = np.array([e == "" for e in batch["error"]], bool)
        out = {"key": batch["key"], "source": batch["source"], "error": batch["error"].copy(),
               "w": np.full((b, d), np.nan, np.float32), "w_plus": np.full((b, n * d), np.nan, np.float32),
               "psnr": np.full(b, np.nan, np.float32)}
        out.update({k: batch[k] for k in FACE_COLUMNS if k in batch})
        if self.with_f:
            out["f"] = np.zeros((b, self.f_size), np.float16)
        if ok.any():
            x = uint8_to_unit(batch["pixels"][ok], self.inverter.device)
            # The pixels were validated by decode_rows: nothing the model raises is the input's fault, so no
            # exception here becomes an error row. Out of memory is retried on halves of the batch, then by Ray;
            # anything else (a broken model) fails the job, which a re-run resumes.
            self._invert_in_parts(x, np.flatnonzero(ok), out, batch)
        out["model_id"] = np.asarray([self.inverter.model_id] * b, dtype=object)
        out["t_read"] = _on_first_row(b, _seconds(batch, "t_read"))
        out["t_decode"] = _on_first_row(b, _seconds(batch, "t_decode"))
        first = ready_at is not None
        out["t_load"] = _on_first_row(b, load_s if first else 0.0)
        out["t_ready"] = _on_first_row(b, ready_at if first else 0.0)
        out["t_first"] = _on_first_row(b, arrived if first else 0.0)
        out["t_invert"] = _on_first_row(b, time.perf_counter() - start)
        out["t_invert_cpu"] = _on_first_row(b, self.cpu_clock() - cpu)
        out["t_done"] = _on_first_row(b, time.time())
        return out

    def _invert_in_parts(self, x, rows: np.ndarray, out: dict[str, np.ndarray],
                         batch: dict[str, np.ndarray] | None = None) -> None:
        """Invert ``x`` into ``out[...][rows]``; on out-of-memory, each half in turn (down to one image)."""
        import torch

        try:
            if _fault_due(self.faults.oom_marker):
                raise torch.OutOfMemoryError("injected: CUDA out of memory. Tried to allocate 2.00 GiB")
            res = self.inverter.invert(x)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(x) == 1:
                raise TransientError(f"out of memory inverting a single image ({type(exc).__name__}: {exc}); "
                                     "lower infer.batch_size or use a larger device") from exc
            half = len(x) // 2
            log.warning("out of memory on %d images; inverting them as %d + %d", len(x), half, len(x) - half)
            self._invert_in_parts(x[:half], rows[:half], out, batch)
            self._invert_in_parts(x[half:], rows[half:], out, batch)
            return
        out["w"][rows] = res.w.float().cpu().numpy()
        out["w_plus"][rows] = res.w_plus.float().cpu().numpy().reshape(len(rows), -1)
        if self.with_f:
            out["f"][rows] = res.f.float().cpu().numpy().reshape(len(rows), -1).astype(np.float16)
        if self.psnr:
            from clcae.metrics import psnr

            out["psnr"][rows] = psnr(res.image.float(), x).cpu().numpy()
        if self.edits and batch is not None:
            self._write_edits(res, rows, batch)

    def _write_edits(self, res, rows: np.ndarray, batch: dict[str, np.ndarray]) -> None:
        """The named edits of each image: the whole photo with the edited face pasted back (aligned input), or
        the edited crop, as ``edited/<key>.png`` (``#`` in a face key becomes ``.``)."""
        edited = tensor_to_pil(self.inverter.edit(res, self.edits))
        for im, row in zip(edited, rows):
            key = str(batch["key"][row])
            if "quad" in batch:
                from clcae.align import paste_back

                fs, path = st.filesystem(str(batch["source"][row]), self.storage)
                with fs.open(path, "rb") as fh:
                    photo = fh.read()
                im = paste_back(photo, im.resize(_crop_size(batch["pixels"][row])), batch["quad"][row].reshape(4, 2))
            st.write_bytes(st.join(self.edited_uri, key.replace("#", ".") + ".png"), encode_png(im), self.storage)


def _crop_size(pixels: np.ndarray) -> tuple[int, int]:
    """PIL (w, h) of an (H, W, 3) crop."""
    return int(pixels.shape[1]), int(pixels.shape[0])


# --------------------------------------------------------------------------------------------- sink
def _fixed(values: np.ndarray, width: int, dtype: pa.DataType) -> pa.FixedSizeListArray:
    flat = np.ascontiguousarray(np.stack(list(values)) if values.dtype == object else values).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, dtype), width)


def _part_name(keys: list[str]) -> str:
    return "part-" + hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:20] + ".parquet"


def _write_table(table: pa.Table, uri: str, storage) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    try:
        st.write_bytes(uri, buf.getvalue(), storage)
    except Exception as exc:
        # Retrying is safe: the part's name comes from its keys, so a second attempt replaces the first.
        raise TransientError(f"cannot write {uri}: {exc}") from exc


def make_sink(out_uri: str, cfg: CLCAEConfig, schema: pa.Schema):
    """A Ray Data Datasink writing latents and errors from the same rows, ~rows_per_file rows per write."""
    from ray.data import Datasink

    class LatentTableSink(Datasink):
        def __init__(self):
            self.out, self.storage, self.schema = out_uri, cfg.storage, schema
            self.rows = cfg.infer.rows_per_file
            self.counts = {"written": 0, "errors": 0, "files": 0}
            self.timing = {name: 0.0 for name in (*TIMING_COLUMNS, "t_write")}
            self.timing["model_loads"] = 0
            self.timing.update({name: float("inf") for name in EARLIEST})  # the earliest actor's
            self.photos: set[str] = set()  # aligned photos that gave at least one face
            self.examples: list[dict[str, str]] = []  # a few error rows, for the job's summary

        @property
        def min_rows_per_write(self) -> int:
            return self.rows

        def write(self, blocks, ctx) -> dict[str, int]:
            tables = [pa.Table.from_batches([b]) if isinstance(b, pa.RecordBatch) else b for b in blocks]
            tables = [t if isinstance(t, pa.Table) else pa.Table.from_pandas(t) for t in tables]
            table = pa.concat_tables(tables, promote_options="default") if tables else None
            began = time.perf_counter()
            counts: dict[str, Any] = {"written": 0, "errors": 0, "files": 0, "examples": [], "timing": {}}
            if table is None or table.num_rows == 0:
                return counts
            timing = counts["timing"]
            for name in TIMING_COLUMNS:
                if name in table.column_names:
                    col = table.column(name).to_numpy()
                    timing[name] = float(col.sum()) if name not in EARLIEST + LATEST else \
                        float(col.max()) if name in LATEST else \
                        float(col[col > 0].min()) if (col > 0).any() else float("inf")
            if "t_load" in table.column_names:
                timing["model_loads"] = int((table.column("t_load").to_numpy() > 0).sum())
            errors = np.asarray(table.column("error").to_pylist(), dtype=object)
            bad = errors != ""
            if bad.any():
                idx = np.flatnonzero(bad)
                err = pa.table({"key": table.column("key").take(idx).cast(pa.string()),
                                "source": table.column("source").take(idx).cast(pa.string()),
                                "error": pa.array(errors[idx].tolist(), pa.string())}, schema=ERRORS_SCHEMA)
                _write_table(err, st.join(self.out, "errors", _part_name(err.column("key").to_pylist())), self.storage)
                counts["errors"] = len(idx)
                counts["examples"] = err.slice(0, MAX_EXAMPLES).select(["key", "error"]).to_pylist()
            good = np.flatnonzero(~bad)
            # at most rows_per_file rows per file: a write may receive more (blocks are bundled, not split)
            for start in range(0, len(good), self.rows):
                t = table.take(good[start:start + self.rows])
                cols: dict[str, Any] = {}
                for field in self.schema:
                    name = field.name
                    if pa.types.is_fixed_size_list(field.type):
                        cols[name] = _fixed(t.column(name).to_numpy(zero_copy_only=False), field.type.list_size,
                                            field.type.value_type)
                    else:
                        cols[name] = t.column(name).cast(field.type)
                lat = pa.table(cols, schema=self.schema)
                _write_table(lat, st.join(self.out, "latents", _part_name(lat.column("key").to_pylist())),
                             self.storage)
                counts["files"] += 1
            counts["written"] = len(good)
            counts["files"] += int(bool(bad.any()))
            if "source_key" in table.column_names:  # aligned photos: the photos that gave faces, once each
                counts["photos"] = sorted(set(table.column("source_key").take(good).to_pylist()))
            timing["t_write"] = time.perf_counter() - began
            return counts

        def on_write_complete(self, write_result) -> None:
            for r in write_result.write_returns:
                for k in self.counts:
                    self.counts[k] += r[k]
                self.photos.update(r.get("photos", []))
                self.examples += r["examples"][:MAX_EXAMPLES - len(self.examples)]
                for name, value in r["timing"].items():
                    self.timing[name] = min(self.timing[name], value) if name in EARLIEST else \
                        max(self.timing[name], value) if name in LATEST else self.timing[name] + value

    return LatentTableSink()


# --------------------------------------------------------------------------------------------- job
def invert_to_table(cfg: CLCAEConfig, inputs: list[str], out_uri: str, source: Any = None,
                    faults: BatchFaults | None = None, edits: list[tuple[str, float]] | None = None
                    ) -> dict[str, Any]:
    """Run the bulk job; returns {"inputs", "skipped", "written", "errors", "skipped_errors", "error_examples",
    ...} with inputs == skipped + written + errors (``skipped_errors``: skipped rows that are error rows).

    ``source``: a ``clcae.pretrained.ModelSource`` resolved with ``prepare`` (whose config ``cfg`` is), or None for
    the config's own model.  Input errors (undecodable, too small, unreadable files) become error rows. Transient
    failures (out of memory, storage timeouts) are retried ``infer.max_retries`` times per task, and a dead actor
    is restarted with its task; if a failure persists the job raises, and a re-run resumes. ``faults`` injects
    failures (tests, drills).

    ``cfg.infer.align`` ("faces" | "cars"): inputs are raw photos, aligned in Ray Data tasks; rows are faces
    (``<key>#face<i>``, with the quad etc.), a photo without a face is an error row, and the accounting is per
    photo: inputs == skipped + photos (that gave faces) + errors; ``written`` counts face rows.
    ``edits`` [(direction, strength)]: also write each image edited to ``OUT/edited/`` (the whole photo with the
    edit pasted back when aligned). Directions are loaded only when edits are asked for.
    """
    import ray

    t0, started = time.perf_counter(), time.time()
    st.check_access(out_uri, cfg.storage, write=True)
    plan = plan_inputs(inputs, out_uri, cfg)
    planned = time.perf_counter() - t0
    summary: dict[str, Any] = {"inputs": plan.total, "skipped": plan.skipped, "written": 0, "errors": 0,
                               "skipped_errors": plan.skipped_errors, "error_examples": [], "output": out_uri}
    if not plan.shard_files and not plan.image_files:
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        return summary
    i = cfg.infer
    # Everything before the actors runs as Ray Data CPU tasks of its own (reading, decoding, resizing to uint8), so
    # it overlaps with the model, and with the actors' start-up, instead of running in the actor in turn. Ray Data
    # would fuse these tasks into the actors when both ask for the same resources: asking for another CPU share
    # keeps them apart. The pixels cross the object store as uint8, a quarter of float32.
    # At most as many of those tasks at once as the cluster has CPUs beside the actors: fractional CPU requests
    # alone would let Ray start a worker process per fraction (16 on a 4-CPU machine) that only compete.
    decode_cpus = DECODE_CPUS if i.cpus_per_actor != DECODE_CPUS else DECODE_CPUS / 2
    resources = ray.cluster_resources() if ray.is_initialized() else {"CPU": os.cpu_count() or 1}
    if fixed_size_cluster():
        check_actor_capacity(i, resources, decode_cpus)
    cpus = resources.get("CPU", 1)
    spare = int(cpus - i.actors * i.cpus_per_actor)
    cpu_stage = {"batch_format": "numpy", "num_cpus": decode_cpus,
                 "compute": ray.data.TaskPoolStrategy(size=max(1, spare))}
    datasets = []
    if plan.shard_files:
        ds = read_shards(plan.shard_files, cfg.storage, columns=["key", "image"], include_paths=True)
        # Ray Data reports the protocol-less path of each row's file: map it back to the URI and the key prefix
        files = {st.filesystem(f, cfg.storage)[1]: (f, plan.shard_prefix.get(f, "")) for f in plan.shard_files}
        datasets.append(ds.map_batches(_shard_rows, fn_kwargs={"files": files}, **cpu_stage))
    if plan.image_files:
        # Files are read inside the pipeline, one by one, so an unreadable file is one error row, not a
        # failed read task. A read task takes a few batches: fewer, larger tasks cost less scheduling.
        items = [{"key": k, "source": u} for u, k in plan.image_files]
        blocks = max(1, min(len(items) // (i.batch_size * IMAGE_BATCHES_PER_TASK), 1000))
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        datasets.append(ds.map_batches(_read_files, fn_kwargs={"storage": cfg.storage, "faults": faults},
                                       **cpu_stage))
    ds = datasets[0] if len(datasets) == 1 else datasets[0].union(*datasets[1:])
    size = tuple(cfg.encoder.input_size)
    if i.align:
        ds = ds.map_batches(align_rows, fn_kwargs={"domain": i.align, "size": size, "largest_only": i.largest_face_only,
                                                   "skip": plan.skip_faces}, batch_size=i.batch_size, **cpu_stage)
    else:
        ds = ds.map_batches(decode_rows, fn_kwargs={"size": size, "skip": plan.partial or None},
                            batch_size=i.batch_size, **cpu_stage)
    use_gpu, concurrent = i.use_gpu, concurrent_batches(i)
    job_cfg = to_dict(cfg)
    if not edits:
        job_cfg["directions"] = {}  # inverting needs no direction files
    ds = ds.map_batches(
        InvertActor, fn_constructor_kwargs={"config": job_cfg, "source": source,
                                            "device": "cuda" if use_gpu else "cpu", "with_f": i.with_f,
                                            "psnr": i.psnr, "faults": faults, "edits": edits,
                                            "edited_uri": st.join(out_uri, "edited")},
        batch_size=i.batch_size, batch_format="numpy", num_gpus=1 if use_gpu else 0, num_cpus=i.cpus_per_actor,
        compute=ray.data.ActorPoolStrategy(size=i.actors, max_concurrent_calls_per_actor=concurrent,
                                           enable_true_multi_threading=concurrent > 1))
    from clcae.factory import latent_shapes  # the driver has torch already; decode tasks must not import it

    g = cfg.generator
    n = n_latent(cfg)
    feature = math.prod(latent_shapes(cfg)["f"]) if i.with_f else None
    sink = make_sink(out_uri, cfg, latent_schema(g.style_dim, n, feature, i.psnr, aligned=bool(i.align)))
    # Retries of transient failures, set on this dataset's own DataContext (a copy taken when it was created), so
    # other datasets of the process are unaffected. Ray Data's own defaults already restart a dead actor and
    # resubmit its task (max_restarts / max_task_retries = -1), and retry reads of Parquet on S3 errors.
    ctx = ds.context
    ctx.retried_map_errors = list(RETRIED_ERRORS)
    ctx.max_map_retries = i.max_retries
    # Decoded pixels go from the decode tasks to the actors in blocks of a few batches, not Ray's default of up to
    # 128 MiB (over half of a small object store, one actor's work for minutes, the whole of a small shard set):
    # blocks stream through the object store and spread over the actors.
    ctx.target_max_block_size = min(ctx.target_max_block_size or DECODED_BLOCK_BYTES,
                                    max(DECODED_BLOCK_BYTES, 2 * i.batch_size * size[0] * size[1] * 3))
    ds.write_datasink(sink)
    summary.update(written=sink.counts["written"], errors=sink.counts["errors"], error_examples=sink.examples,
                   seconds=round(time.perf_counter() - t0, 2))
    summary["stages"] = stage_seconds(sink.timing, planned, started)
    if i.align:
        summary["photos"] = len(sink.photos)  # inputs == skipped + photos + errors
    summary["images_per_s"] = round((summary["written"] + summary["errors"]) / max(summary["seconds"], 1e-9), 2)
    return summary


def stage_seconds(timing: dict[str, float], planned: float, started: float) -> dict[str, Any]:
    """The job's time by stage (see TIMING_COLUMNS): ``plan_s`` (listing inputs and the keys already done),
    ``actor_ready_s`` / ``first_batch_s`` / ``last_batch_s`` (from the job's start until the first actor had loaded
    its model / got its first batch / the last batch was inverted), ``model_load_s`` summed over ``model_loads``
    actor starts, and read, decode, invert (wall and the actors' CPU) and write seconds summed over batches."""
    def since(at: float) -> float | None:
        return round(at - started, 2) if 0 < at < float("inf") else None

    return {"plan_s": round(planned, 2), "actor_ready_s": since(timing["t_ready"]),
            "first_batch_s": since(timing["t_first"]), "last_batch_s": since(timing["t_done"]),
            "model_loads": int(timing["model_loads"]),
            "model_load_s": round(timing["t_load"], 2), "read_s": round(timing["t_read"], 2),
            "decode_s": round(timing["t_decode"], 2), "invert_s": round(timing["t_invert"], 2),
            "invert_cpu_s": round(timing["t_invert_cpu"], 2),
            "write_s": round(timing["t_write"], 2)}


def _shard_rows(batch: dict[str, np.ndarray], files: dict[str, tuple[str, str]]) -> dict[str, np.ndarray]:
    found = [files.get(str(p), (str(p), "")) for p in batch["path"]]
    keys = np.asarray([f"{prefix}/{k}" if prefix else str(k) for k, (_, prefix) in zip(batch["key"], found)],
                      dtype=object)
    return {"key": keys, "source": np.asarray([uri for uri, _ in found], dtype=object), "image": batch["image"]}


def _read_files(batch: dict[str, np.ndarray], storage, faults: BatchFaults | None = None) -> dict[str, np.ndarray]:
    start = time.perf_counter()
    data, errors = [], []
    for uri in batch["source"]:
        try:
            if faults is not None and _fault_due(faults.read_timeout_marker):
                raise TimeoutError(f"injected: read timeout on {uri}")
            fs, path = st.filesystem(str(uri), storage)
            with fs.open(path, "rb") as fh:
                data.append(fh.read())
            errors.append("")
        except INPUT_READ_ERRORS as exc:  # missing, a folder, a dangling link, no permission: the file's own row
            data.append(b"")
            errors.append(f"cannot read file: {type(exc).__name__}: {exc}")
        except Exception as exc:
            raise TransientError(f"cannot read {uri}: {type(exc).__name__}: {exc}") from exc
    return {"key": batch["key"], "source": batch["source"], "image": np.asarray(data, dtype=object),
            "error": np.asarray(errors, dtype=object), "t_read": _on_first_row(len(data), time.perf_counter() - start)}
