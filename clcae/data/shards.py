"""Image shards: Parquet files of encoded images, one row per image, read by Ray Data for training.

Schema (DESIGN.md, "Image shards"):

    key     string, unique            the image's relative path (make_shards) or an id (synthesize)
    image   binary                    encoded PNG or JPEG bytes, as given
    height  int32, width int32        of the decoded image
    w       fixed_size_list<float32>[D], optional   latent of a synthetic (image, w) pair
    seed    int64, optional           seed that produced a synthetic pair
    ...     optional label columns (int64 / float32 / string)

Rows of aligned photos (``make_shards(..., align="faces"|"cars")``, see clcae/align.py) hold the crop as
``image`` and add:

    source_key  string                the photo's key; ``key`` is ``<source_key>#face<i>`` for faces, so it
                                      stays unique when a photo holds several faces, and the photo's key for cars
    face_index  int32                 i: the face's rank in its photo, 0 = largest (always 0 for cars)
    score       float32, nullable     detector probability (null for cars)
    quad        fixed_size_list<float64>[8]    the crop's corners in the photo (x, y) x [top-left, bottom-left,
                                      bottom-right, top-right], source pixels after EXIF orientation
    landmarks   fixed_size_list<float64>[10], nullable   eyes, nose, mouth corners (x, y) in the same frame

Files that fail (unreadable, too small, no face found) are rows of ``<dst>/_errors/errors.parquet`` (``key``,
``source``, ``error``), written on every run, empty when nothing failed. The leading underscore is what keeps
them out of the shards: pyarrow datasets, Ray Data, Spark and :func:`read_shards` skip ``_``-prefixed paths
under a folder, while a plain ``errors/`` subfolder would be read as shard rows.

``w`` is a plain Arrow fixed-size list (not Ray Data's tensor extension type) so that pyarrow, pandas,
DuckDB and Spark read the files too.

    with ShardWriter("s3://bucket/ffhq", storage) as writer:
        writer.write({"key": "00000.png", "image": png_bytes, "height": 1024, "width": 1024})
    validate_shards(["s3://bucket/ffhq"], storage)          # before any training worker starts
    ds = read_shards(["s3://bucket/ffhq"], storage).map_batches(decode_batch, fn_kwargs={"size": (256, 256)})

:func:`make_shards` turns an image folder or a .zip into shards (``jobs/make_shards.py`` is its CLI).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import os
import posixpath
import re
import sys
import threading
import time
import zipfile
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from clcae.config import StorageConfig
from clcae.data import storage as st
from clcae.data.images import InputError, check_min_size, decode_image, encode_png, pil_to_tensor
from clcae.errors import CLCAEError

if TYPE_CHECKING:
    import ray.data

    from clcae.align import Aligner

REQUIRED: dict[str, pa.DataType] = {
    "key": pa.string(), "image": pa.binary(), "height": pa.int32(), "width": pa.int32(),
}
ALIGN_COLUMNS: dict[str, pa.DataType] = {
    "source_key": pa.string(), "face_index": pa.int32(), "score": pa.float32(),
    "quad": pa.list_(pa.float64(), 8), "landmarks": pa.list_(pa.float64(), 10),
}
OPTIONAL = ("w", "seed", *ALIGN_COLUMNS)
LABEL_TYPES: dict[str, pa.DataType] = {"int": pa.int64(), "float": pa.float32(), "string": pa.string()}
ERRORS_FILE = "_errors/errors.parquet"  # "_": readers of the shard folder skip it (see the module docstring)
LEGACY_ERRORS_FILE = "errors.csv"  # where make_shards wrote errors before; still read by read_errors
ERRORS_SCHEMA = pa.schema([("key", pa.string()), ("source", pa.string()), ("error", pa.string())])
FACE_KEY = "{key}#face{index}"
ROW_GROUP_ROWS = 64  # readers hold a row group in memory: 64 images, not a whole shard
KEPT_FORMATS = ("PNG", "JPEG")  # stored as given; other formats are re-encoded to PNG

# (predicate, words) per required column: what validate_shards accepts and how it names the expected type.
_ACCEPTS: dict[str, tuple[Callable[[pa.DataType], bool], str]] = {
    "key": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "string"),
    "image": (lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t),
              "binary (encoded PNG/JPEG bytes)"),
    "height": (pa.types.is_integer, "int32"),
    "width": (pa.types.is_integer, "int32"),
}


class ShardError(CLCAEError, ValueError):
    """Shards (or a shard source) that cannot be used; the message names the file and the problem."""


# ---------------------------------------------------------------------------------------------------
# Schema


def shard_schema(style_dim: int | None = None, labels: Mapping[str, str | pa.DataType] | None = None,
                 seed: bool | None = None, align: bool = False) -> pa.Schema:
    """The shard schema; ``style_dim`` adds ``w`` (and, unless ``seed=False``, ``seed``); ``align`` adds the
    alignment columns (``source_key``, ``face_index``, ``score``, ``quad``, ``landmarks``).

    ``labels`` maps extra column names to "int", "float", "string" or a pyarrow type of that kind.
    """
    fields = [pa.field(name, tp, nullable=False) for name, tp in REQUIRED.items()]
    if style_dim is not None:
        if style_dim < 1:
            raise ShardError(f"style_dim = {style_dim}: must be >= 1")
        fields.append(pa.field("w", pa.list_(pa.float32(), style_dim), nullable=False))
    if seed if seed is not None else style_dim is not None:
        fields.append(pa.field("seed", pa.int64()))
    if align:
        nullable = ("score", "landmarks")  # cars have neither
        fields += [pa.field(name, tp, nullable=name in nullable) for name, tp in ALIGN_COLUMNS.items()]
    for name, kind in (labels or {}).items():
        if name in REQUIRED or name in OPTIONAL:
            raise ShardError(f"label column {name!r} clashes with a shard column "
                             f"({', '.join((*REQUIRED, *OPTIONAL))})")
        fields.append(pa.field(name, _label_type(name, kind)))
    return pa.schema(fields)


def w_width(tp: pa.DataType) -> int | None:
    """D for ``fixed_size_list<float32>[D]``, else None."""
    if pa.types.is_fixed_size_list(tp) and tp.value_type == pa.float32():
        return tp.list_size
    return None


def schema_problems(schema: pa.Schema, need_w: bool = False, style_dim: int | None = None) -> list[str]:
    """What is wrong with ``schema`` as a shard schema, in words ([] when it is fine)."""
    problems = []
    for name, (ok, expected) in _ACCEPTS.items():
        if name not in schema.names:
            problems.append(f"missing column {name!r} ({expected})")
        elif not ok(schema.field(name).type):
            problems.append(f"column {name!r} is {schema.field(name).type}, expected {expected}")
    if "w" in schema.names:
        tp = schema.field("w").type
        width = w_width(tp)
        if width is None:
            problems.append(f"column 'w' is {tp}, expected fixed_size_list<float32>[D] "
                            "(pa.list_(pa.float32(), D)); variable-length lists and Ray Data's tensor "
                            "extension type are not accepted")
        elif style_dim is not None and width != style_dim:
            problems.append(f"column 'w' has {width} values per row, but generator.style_dim is {style_dim}")
    elif need_w:
        problems.append("no 'w' column: stage-1 (contrastive) training needs (image, w) pairs; "
                        "write them with jobs/synthesize.py")
    if "seed" in schema.names and not pa.types.is_integer(schema.field("seed").type):
        problems.append(f"column 'seed' is {schema.field('seed').type}, expected int64")
    for name, tp in ALIGN_COLUMNS.items():
        if name in schema.names and not schema.field(name).type.equals(tp):
            problems.append(f"column {name!r} is {schema.field(name).type}, expected {tp}")
    return problems


def _label_type(name: str, kind: str | pa.DataType) -> pa.DataType:
    if isinstance(kind, pa.DataType):
        if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_string(kind):
            return kind
    elif kind in LABEL_TYPES:
        return LABEL_TYPES[kind]
    raise ShardError(f"label column {name!r}: type {kind!r} is not one of {', '.join(LABEL_TYPES)}")


# ---------------------------------------------------------------------------------------------------
# Writing


class ShardWriter:
    """Rows -> ``{prefix}-00000.parquet``, ``{prefix}-00001.parquet``, ... (zstd) under ``uri_dir``.

    A shard is closed every ``rows_per_shard`` rows (or ``max_shard_bytes`` of row data) and written in one
    go (local: temp file + rename; object store: one PUT), so a crash never leaves half a file under a
    shard name. Existing shards with the same prefix are an error unless ``overwrite=True`` (then they are
    deleted first). As a context manager, an exception discards the rows not yet flushed.
    """

    def __init__(self, uri_dir: str, storage: StorageConfig | None = None, rows_per_shard: int = 1000,
                 prefix: str = "shard", schema: pa.Schema | None = None, *,
                 max_shard_bytes: int = 256 * 2**20, overwrite: bool = False):
        if rows_per_shard < 1:
            raise ShardError(f"rows_per_shard = {rows_per_shard}: must be >= 1")
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", prefix):
            raise ShardError(f"prefix {prefix!r}: use letters, digits, '_', '-' or '.', starting with a "
                             "letter or digit")
        self.schema = schema if schema is not None else shard_schema()
        problems = schema_problems(self.schema)
        if problems:
            raise ShardError("ShardWriter: the schema is not a shard schema: " + "; ".join(problems))
        self.uri_dir, self.storage, self.prefix = uri_dir, storage, prefix
        self.rows_per_shard, self.max_shard_bytes = rows_per_shard, max_shard_bytes
        self.uris: list[str] = []
        self.rows = 0
        self._batches: list[pa.RecordBatch] = []
        self._buffered_bytes = 0
        self._keys: set[str] = set()
        self._closed = False
        self._clear_old(overwrite)

    def write(self, row: Mapping[str, Any]) -> None:
        """Add one row (a dict of column -> value); ShardError names the row's key and what is wrong."""
        if self._closed:
            raise ShardError("ShardWriter.write() after close()")
        key = row.get("key") if isinstance(row, Mapping) else None
        if not isinstance(key, str) or not key:
            raise ShardError(f"a shard row needs a non-empty string 'key', got {key!r}")
        unknown = sorted(set(row) - set(self.schema.names))
        if unknown:
            raise ShardError(f"row {key!r}: column(s) {unknown} are not in the shard schema "
                             f"({', '.join(self.schema.names)}); declare labels with "
                             "shard_schema(labels=...)")
        missing = [f.name for f in self.schema if not f.nullable and row.get(f.name) is None]
        if missing:
            raise ShardError(f"row {key!r}: no value for required column(s) {missing}")
        if not isinstance(row["image"], (bytes, bytearray, memoryview)):
            raise ShardError(f"row {key!r}: 'image' must be the encoded PNG/JPEG bytes, got "
                             f"{type(row['image']).__name__} (encode with clcae.data.images.encode_png)")
        if key in self._keys:
            raise ShardError(f"duplicate key {key!r}: keys must be unique within a shard set")
        try:
            batch = pa.RecordBatch.from_pylist([dict(row)], schema=self.schema)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise ShardError(f"row {key!r}: {exc}") from None
        self._keys.add(key)
        self._batches.append(batch)
        self._buffered_bytes += batch.nbytes
        if len(self._batches) >= self.rows_per_shard or self._buffered_bytes >= self.max_shard_bytes:
            self._flush()

    def close(self) -> tuple[list[str], int]:
        """Flush the last shard; returns (URIs of all shards written, total rows)."""
        if not self._closed:
            self._flush()
            self._closed = True
        return list(self.uris), self.rows

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # a half-finished input must not look like a complete last shard
            self._batches.clear()
            self._closed = True

    def _flush(self) -> None:
        if not self._batches:
            return
        table = pa.Table.from_batches(self._batches, schema=self.schema)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", row_group_size=ROW_GROUP_ROWS)
        uri = st.join(self.uri_dir, f"{self.prefix}-{len(self.uris):05d}.parquet")
        st.write_bytes(uri, buf.getvalue(), self.storage)
        self.uris.append(uri)
        self.rows += table.num_rows
        self._batches, self._buffered_bytes = [], 0

    def _clear_old(self, overwrite: bool) -> None:
        pattern = re.compile(rf"{re.escape(self.prefix)}-\d{{5,}}\.parquet")
        found = st.list_files(self.uri_dir, self.storage)
        old = [u for u in found if pattern.fullmatch(posixpath.basename(u))]
        if not old:
            return
        if not overwrite:
            raise ShardError(f"{self.uri_dir} already holds {len(old)} shard file(s) named "
                             f"{self.prefix}-NNNNN.parquet (e.g. {old[0]}): write to a new folder, or pass "
                             "overwrite=True (make_shards --overwrite) to replace them")
        fs, _ = st.filesystem(self.uri_dir, self.storage)
        with st.storage_errors(self.uri_dir, self.storage):
            fs.rm([st.filesystem(u, self.storage)[1] for u in old])


# ---------------------------------------------------------------------------------------------------
# Validating and reading


def validate_shards(uris_or_dirs: str | Sequence[str], storage: StorageConfig | None = None,
                    need_w: bool = False, style_dim: int | None = None) -> list[str]:
    """Expand folders to their .parquet files and check every file's schema (footers only, in parallel).

    Returns the sorted shard URIs. Raises ShardError naming each bad file and its problem (no files at a
    URI, not Parquet, missing column, wrong type, ``w`` missing when ``need_w``, ``w`` width differing
    from ``style_dim`` or between files), and StorageError when the storage itself cannot be used.
    """
    files = _expand(uris_or_dirs, storage)
    schemas = _read_schemas(files, storage)
    bad = [f"{uri}: {'; '.join(schema_problems(schema, need_w, style_dim))}"
           for uri, schema in zip(files, schemas) if schema_problems(schema, need_w, style_dim)]
    if bad:
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise ShardError(f"{len(bad)} of {len(files)} shard file(s) do not match the shard schema:\n  "
                         + "\n  ".join(bad[:10]) + more)
    widths: dict[int, list[str]] = {}
    for uri, schema in zip(files, schemas):
        if "w" in schema.names:
            widths.setdefault(w_width(schema.field("w").type), []).append(uri)
    if len(widths) > 1:
        parts = [f"{d} in {len(u)} file(s), e.g. {u[0]}" for d, u in sorted(widths.items())]
        raise ShardError("shards disagree on the width of 'w': " + "; ".join(parts))
    return files


def read_shards(uris: str | Sequence[str], storage: StorageConfig | None = None,
                columns: Sequence[str] | None = None, **read_kwargs: Any) -> ray.data.Dataset:
    """Shards (files or folders, validated first) as a Ray Dataset through ``ray.data.read_parquet``.

    ``read_kwargs`` go to ``read_parquet`` (e.g. ``shuffle="files"``, ``override_num_blocks``).
    """
    import ray.data

    files = validate_shards(uris, storage)
    if columns is not None:
        names = set(_read_schemas(files[:1], storage)[0].names)
        missing = [c for c in columns if c not in names]
        if missing:
            raise ShardError(f"{files[0]}: no column(s) {missing}; the shards have {sorted(names)}")
    protocols = {st.protocol(f) for f in files}
    if len(protocols) > 1:
        raise ShardError(f"shards on several storages ({', '.join(sorted(protocols))}): read them separately")
    if st.is_local(files[0]):
        fs, _ = st.pyarrow_filesystem(files[0], storage)
    else:
        fs, _ = st.filesystem(files[0], storage)  # Ray Data wraps an fsspec filesystem itself
    paths = [st.filesystem(f, storage)[1] for f in files]
    ds = ray.data.read_parquet(paths, filesystem=fs, **read_kwargs)
    # select_columns is pushed down into the Parquet read (read_parquet's columns= is deprecated)
    if columns is None:
        return ds
    return ds.select_columns([*columns, "path"] if read_kwargs.get("include_paths") else list(columns))


def decode_batch(batch: Mapping[str, np.ndarray], size: tuple[int, int], keep: Sequence[str] = ()) -> dict:
    """A Ray Data batch of shard rows -> ``{"image": float32 (B, 3, H, W) in [-1, 1], "w": float32 (B, D)}``.

    For ``ds.map_batches(decode_batch, fn_kwargs={"size": (256, 256)})``. ``w`` is there when the batch has
    it; ``keep`` names other columns copied through (e.g. "seed"; strings do not go through
    ``iter_torch_batches``). A row that does not decode raises InputError naming its key.
    """
    h, w = size
    images = batch["image"]
    keys = batch.get("key")
    out_images = np.empty((len(images), 3, h, w), np.float32)
    for i, data in enumerate(images):
        try:
            im = decode_image(bytes(data))
        except InputError as exc:
            name = keys[i] if keys is not None else f"row {i}"
            raise InputError(f"shard image {name!r}: {exc}") from None
        out_images[i] = pil_to_tensor(im, (h, w)).numpy()
    out: dict[str, np.ndarray] = {"image": out_images}
    if "w" in batch:
        out["w"] = _stack_w(batch["w"])
    for name in keep:
        out[name] = np.asarray(batch[name])
    return out


def _stack_w(values: np.ndarray) -> np.ndarray:
    # Ray hands a fixed-size list column over as an object array of 1-D arrays; stack it to (B, D).
    arr = np.asarray(values)
    if arr.dtype == object:
        arr = np.stack([np.asarray(v, np.float32) for v in arr]) if len(arr) else np.zeros((0, 0), np.float32)
    return arr.astype(np.float32, copy=False)


def _expand(uris_or_dirs: str | Sequence[str], storage: StorageConfig | None) -> list[str]:
    items = [uris_or_dirs] if isinstance(uris_or_dirs, str) else list(uris_or_dirs)
    if not items:
        raise ShardError("no shard URIs given (data.train / data.pairs is empty)")
    files: list[str] = []
    for uri in items:
        found = st.list_files(uri, storage, ".parquet")
        if not found:
            why = "no .parquet files found there" if st.exists(uri, storage) else "no such file or folder"
            raise ShardError(f"{uri}: {why}; point it at a folder written by jobs/make_shards.py or "
                             "jobs/synthesize.py")
        files += found
    return list(dict.fromkeys(files))


def _read_schemas(files: list[str], storage: StorageConfig | None) -> list[pa.Schema]:
    if len(files) == 1:
        return [_read_schema(files[0], storage)]
    with ThreadPoolExecutor(min(16, len(files))) as pool:  # object stores: one round trip per footer
        return list(pool.map(lambda uri: _read_schema(uri, storage), files))


def _read_schema(uri: str, storage: StorageConfig | None) -> pa.Schema:
    fs, path = st.filesystem(uri, storage)
    error = None
    with st.storage_errors(uri, storage), fs.open(path, "rb") as fh:
        try:
            return pq.ParquetFile(fh).schema_arrow
        except pa.ArrowInvalid as exc:
            error = str(exc)
        except OSError as exc:
            # Arrow reports a corrupt footer as a bare OSError; storage failures come as subclasses or chained
            if type(exc) is not OSError or exc.__cause__ is not None or exc.__context__ is not None:
                raise
            error = str(exc).strip()
    raise ShardError(f"{uri}: not a readable Parquet file ({error})")


# ---------------------------------------------------------------------------------------------------
# make_shards: an image folder or a .zip -> shards


@dataclass(frozen=True)
class _Input:
    key: str
    source: str
    read: Callable[[], bytes]


# A file that vanished or cannot be read is the file's problem; other storage failures stop the run.
_READ_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, zipfile.BadZipFile, zlib.error,
                EOFError, RuntimeError, NotImplementedError)


def make_shards(src: str, dst: str, storage: StorageConfig | None = None, rows_per_shard: int = 1000,
                min_size: int = 64, *, overwrite: bool = False, workers: int | None = None,
                progress_every: int = 1000, progress_seconds: float = 10.0, align: str | None = None,
                align_size: int | Sequence[int] | None = None, largest_only: bool = False,
                device: str = "cpu") -> dict:
    """Every file of a folder (recursive) or a .zip -> shards in ``dst``, plus ``dst/_errors/errors.parquet``.

    Keys are the files' relative paths (POSIX), traversed in sorted order, so the output is deterministic
    and a zip of a folder gives the folder's keys. PNG/JPEG images in RGB mode are stored as their original
    bytes; other formats and modes (L, LA, RGBA, P, CMYK, I;16...) as PNG of the RGB conversion. Files that
    are not usable images (unreadable, corrupt, truncated, empty, too small, decompression bombs, duplicate
    zip entries) are rows of the errors table (key, source, error), which is written (empty if need be) on
    every run. Hidden files and ``__MACOSX/`` are not inputs; their count is reported as ``ignored``.

    ``align="faces"`` stores every face of each photo FFHQ-aligned (``largest_only``: the largest face) at
    ``align_size`` (default 256) as PNG, one row per face with the alignment columns (module docstring);
    a photo without a face is an error row ("no face found ..."). ``align="cars"`` stores the official
    192x256 centre crop. Alignment runs in the same worker threads as decoding (its torch ops release the
    GIL as PIL does); ``device`` places the detector.

    Returns ``{"inputs", "written", "inputs_written", "errors", "shards", "errors_file", "ignored",
    "seconds"}``: ``written`` counts rows (faces when aligning), ``inputs_written`` the files that gave at
    least one, and inputs == inputs_written + errors.
    """
    if min_size < 1:
        raise ShardError(f"min_size = {min_size}: must be >= 1")
    t0 = time.monotonic()
    st.check_access(dst, storage, write=True)
    aligner = None
    if align is not None:
        from clcae.align import DOMAINS, Aligner  # torch + the detector only when aligning

        if align not in DOMAINS:
            raise ShardError(f"align = {align!r}: use one of {', '.join(DOMAINS)}")
        aligner = Aligner(align, align_size, device=device, largest_only=largest_only)
    process = functools.partial(_convert, min_size=min_size, aligner=aligner)
    errors: list[dict[str, str]] = []
    inputs_written = rows_written = 0
    last_report = t0
    with _open_inputs(src, storage) as (inputs, ignored), \
            ShardWriter(dst, storage, rows_per_shard, schema=shard_schema(align=aligner is not None),
                        overwrite=overwrite) as writer:
        if overwrite:
            _remove_legacy_errors(dst, storage)
        seen: set[str] = set()
        results = _ordered_map(process, inputs, workers or min(8, os.cpu_count() or 1))
        for done, (item, (rows, error)) in enumerate(zip(inputs, results), 1):
            if error is None and item.key in seen:
                error = "duplicate entry: an earlier file in the zip has the same name"
            seen.add(item.key)
            if error is None:
                for row in rows:
                    writer.write(row)
                inputs_written += 1
                rows_written += len(rows)
            else:
                errors.append({"key": item.key, "source": item.source, "error": error})
            now = time.monotonic()
            if done % progress_every == 0 or now - last_report >= progress_seconds:
                _progress(done, len(inputs), rows_written, len(errors), now - t0)
                last_report = now
        shards, written = writer.close()
    errors_uri = st.join(dst, ERRORS_FILE)
    st.write_bytes(errors_uri, _errors_parquet(errors), storage)
    _progress(len(inputs), len(inputs), written, len(errors), time.monotonic() - t0)
    assert inputs_written + len(errors) == len(inputs)
    return {"inputs": len(inputs), "written": written, "inputs_written": inputs_written, "errors": len(errors),
            "shards": shards, "errors_file": errors_uri, "ignored": ignored,
            "seconds": round(time.monotonic() - t0, 3)}


def read_errors(dst: str, storage: StorageConfig | None = None) -> list[dict[str, str]]:
    """The rows of the errors table :func:`make_shards` wrote for ``dst`` (also the older ``errors.csv``)."""
    uri = st.join(dst, ERRORS_FILE)
    if not st.exists(uri, storage) and st.exists(st.join(dst, LEGACY_ERRORS_FILE), storage):
        fs, path = st.filesystem(st.join(dst, LEGACY_ERRORS_FILE), storage)
        with st.storage_errors(dst, storage):
            return list(csv.DictReader(io.StringIO(fs.cat_file(path).decode("utf-8"))))
    fs, path = st.filesystem(uri, storage)
    with st.storage_errors(dst, storage), fs.open(path, "rb") as fh:
        return pq.read_table(fh).to_pylist()


def _convert(item: _Input, min_size: int, aligner: Aligner | None = None) -> tuple[list[dict], str | None]:
    """(rows, None) for a usable image (one row, or one per aligned face), ([], reason) otherwise."""
    try:
        data = item.read()
    except _READ_ERRORS as exc:
        return [], f"cannot read the file ({type(exc).__name__}: {exc})"
    try:
        rgb = decode_image(data)
    except InputError as exc:
        return [], str(exc)
    try:
        check_min_size(rgb, min_size)
    except InputError as exc:
        return [], f"{exc} (lower --min-size to keep it)"
    if aligner is not None:
        try:
            crops = aligner(rgb, name=item.key)  # rgb is already EXIF-oriented: quads are in its frame
        except InputError as exc:  # NoFaceError among them
            return [], str(exc)
        faces = aligner.domain == "faces"
        return [{"key": FACE_KEY.format(key=item.key, index=c.index) if faces else item.key,
                 "image": encode_png(c.image), "height": c.image.height, "width": c.image.width,
                 "source_key": item.key, **c.row()} for c in crops], None
    with Image.open(io.BytesIO(data)) as im:  # header only: decode_image already proved the file readable
        kept = im.format in KEPT_FORMATS and im.mode == "RGB"
    image = data if kept else encode_png(rgb)
    return [{"key": item.key, "image": image, "height": rgb.height, "width": rgb.width}], None


def _remove_legacy_errors(dst: str, storage: StorageConfig | None) -> None:
    # an errors.csv beside the shards (older layout) makes pq.read_table(dst) fail: replaced, so removed
    legacy = st.join(dst, LEGACY_ERRORS_FILE)
    if st.exists(legacy, storage):
        fs, path = st.filesystem(legacy, storage)
        with st.storage_errors(legacy, storage):
            fs.rm(path)


@contextlib.contextmanager
def _open_inputs(src: str, storage: StorageConfig | None) -> Iterator[tuple[list[_Input], int]]:
    fs, path = st.filesystem(src, storage)
    with st.storage_errors(src, storage):
        try:
            kind = fs.info(path)["type"]
        except FileNotFoundError:
            kind = None
    if kind is None:
        raise ShardError(f"source {src}: no such folder or .zip file")
    if kind == "directory":
        with st.storage_errors(src, storage):
            found = fs.find(path)
        keys = {posixpath.relpath(p, path): p for p in found}
        inputs = [_Input(k, st.with_protocol(src, p), functools.partial(fs.cat_file, p))
                  for k, p in sorted(keys.items()) if not _ignored(k)]
        yield inputs, len(keys) - len(inputs)
        return
    if not path.lower().endswith(".zip"):
        raise ShardError(f"source {src}: not a folder or a .zip file")
    with st.storage_errors(src, storage):
        fh = fs.open(path, "rb")
    with fh:
        try:
            zf = zipfile.ZipFile(fh)
        except zipfile.BadZipFile as exc:
            raise ShardError(f"source {src}: not a valid zip file ({exc})") from None
        with zf:
            lock = threading.Lock()  # members share one file handle

            def read(info: zipfile.ZipInfo) -> bytes:
                with lock:
                    return zf.read(info)

            where = st.with_protocol(src, path)
            members = [i for i in zf.infolist() if not i.is_dir()]
            inputs = [_Input(i.filename, f"zip://{i.filename}::{where}", functools.partial(read, i))
                      for i in members if not _ignored(i.filename)]
            inputs.sort(key=lambda i: i.key)  # stable: duplicate names keep their zip order
            yield inputs, len(members) - len(inputs)


def _ignored(key: str) -> bool:
    parts = key.split("/")
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """map() over a thread pool with results in input order and at most 4 x workers items in flight
    (PIL releases the GIL while decoding and encoding)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _errors_parquet(errors: list[dict[str, str]]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA), buf, compression="zstd")
    return buf.getvalue()


def _progress(done: int, total: int, written: int, errors: int, seconds: float) -> None:
    rate = done / seconds if seconds > 0 else 0.0
    print(f"make_shards: {done}/{total} files, {written} written, {errors} errors, {rate:.1f} files/s",
          file=sys.stderr, flush=True)
