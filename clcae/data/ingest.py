"""Ingestion: an image folder or a .zip (local or any fsspec URI) -> image shards, with threads, progress
and an errors table (``jobs/make_shards.py`` is its CLI).  The shard format itself is ``clcae.data.shards``."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import posixpath
import sys
import threading
import time
import zipfile
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from clcae.config import StorageConfig
from clcae.data import storage as st
from clcae.data.images import InputError, check_min_size, decode_image, encode_png
from clcae.data.shards import (
    ERRORS_FILE,
    ERRORS_SCHEMA,
    FACE_KEY,
    KEPT_FORMATS,
    LEGACY_ERRORS_FILE,
    ShardError,
    ShardWriter,
    shard_schema,
)

if TYPE_CHECKING:
    from clcae.align import Aligner


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
