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

:func:`clcae.data.ingest.make_shards` turns an image folder or a .zip into shards (``jobs/make_shards.py``
is its CLI); this module is the format alone.
"""

from __future__ import annotations

import csv
import io
import posixpath
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clcae.config import StorageConfig
from clcae.data import storage as st
from clcae.data.images import InputError, decode_image, to_pixels
from clcae.errors import CLCAEError

if TYPE_CHECKING:
    import ray.data


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
    return open_shards(validate_shards(uris, storage), storage, columns, **read_kwargs)


def open_shards(files: Sequence[str], storage: StorageConfig | None = None, columns: Sequence[str] | None = None,
                **read_kwargs: Any) -> ray.data.Dataset:
    """:func:`read_shards` for the file list :func:`validate_shards` returned (a job that validates with its
    own options, e.g. ``need_w``, does not validate twice)."""
    import ray.data  # the shard format itself does not need Ray

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
    """A Ray Data batch of shard rows -> ``{"image": uint8 (B, H, W, 3), "w": float32 (B, D)}``.

    For ``ds.map_batches(decode_batch, fn_kwargs={"size": (256, 256)})``: decoding and resizing run in Ray Data's
    CPU tasks, and the pixels travel through the object store as uint8 (a quarter of float32's bytes); the
    consumer turns them into the model's float (B, 3, H, W) in [-1, 1] on its device with
    :func:`clcae.data.images.uint8_to_unit` (the training loop does). ``w`` is there when the batch has it;
    ``keep`` names other columns copied through (e.g. "seed"; strings do not go through ``iter_torch_batches``).
    A row that does not decode raises InputError naming its key.
    """
    h, w = size
    images = batch["image"]
    keys = batch.get("key")
    out_images = np.empty((len(images), h, w, 3), np.uint8)
    for i, data in enumerate(images):
        try:
            im = decode_image(bytes(data))
        except InputError as exc:
            name = keys[i] if keys is not None else f"row {i}"
            raise InputError(f"shard image {name!r}: {exc}") from None
        out_images[i] = to_pixels(im, (h, w))
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
