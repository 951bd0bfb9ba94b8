"""An image folder (recursive) or a .zip -> Parquet image shards, locally or on S3.

    python jobs/make_shards.py SRC DST [--rows-per-shard 1000] [--min-size 64] [--workers N] [--overwrite]
                               [--align faces|cars [--align-size 256] [--largest-only] [--device cuda]]
                               [--config configs/ffhq.yaml] [storage.endpoint_url=http://minio:9000 ...]

Keys are the files' relative paths. Files that are not usable images are rows of DST/_errors/errors.parquet
(key, source, error; always written, empty when nothing failed) and counted, never dropped silently.
``--align faces`` stores every face FFHQ-aligned, one row per face keyed ``<file key>#face<i>`` (0 = largest)
with its quad, landmarks, score, face index and source key; a photo without a face is an error row.
``--align cars`` stores the official 192x256 centre crop. Progress goes to stderr every --progress-every
files or 10 s; the summary {"inputs", "written", "inputs_written", "errors", "shards", ...} is printed to
stdout as JSON. Exit status: 0 when at least one image was written, 1 when none was, 2 for bad arguments or
config.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clcae.cli_args import add_verbose, job  # noqa: E402
from clcae.config import load_config  # noqa: E402
from clcae.data.ingest import make_shards  # noqa: E402
from clcae.data.storage import StorageError  # noqa: E402
from clcae.train.runtime import configure_output  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="make_shards.py", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="image folder or .zip (path or URI)")
    p.add_argument("dst", help="output folder for the shards (path, file:// or s3:// URI)")
    p.add_argument("--rows-per-shard", type=int, default=1000)
    p.add_argument("--min-size", type=int, default=64, help="smallest accepted side in pixels")
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default: min(8, CPUs))")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in DST")
    p.add_argument("--progress-every", type=int, default=1000, help="files between progress lines")
    p.add_argument("--align", choices=("faces", "cars"), default=None,
                   help="store aligned crops: FFHQ-aligned faces (one row per face) or the car centre crop")
    p.add_argument("--align-size", type=_size, default=None,
                   help="crop size, N or HxW (default: 256 for faces, 192x256 for cars)")
    p.add_argument("--largest-only", action="store_true", help="with --align faces: only the largest face")
    p.add_argument("--device", default="cpu", help="with --align faces: where the detector runs (cpu, cuda)")
    p.add_argument("--config", default=None, help="YAML config whose storage.* section is used")
    add_verbose(p)
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. storage.endpoint_url=...")
    return p.parse_intermixed_args(argv)  # overrides may come before or after the options


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        h, w = (int(parts[0]),) * 2 if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or HxW, e.g. 256 or 192x256") from None
    if len(parts) > 2 or h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or HxW with positive sides")
    return h, w


@job  # a user's mistake (config, source, destination: CLCAEError) is "error: ..." and exit 2
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_output(args.verbose)
    cfg = load_config(args.config, args.overrides)
    try:
        with _one_torch_thread(args.align == "faces" and args.device == "cpu"):
            summary = make_shards(args.src, args.dst, cfg.storage, rows_per_shard=args.rows_per_shard,
                                  min_size=args.min_size, overwrite=args.overwrite, workers=args.workers,
                                  progress_every=args.progress_every, align=args.align,
                                  align_size=args.align_size, largest_only=args.largest_only, device=args.device)
    except StorageError as exc:  # the storage failed while writing: nothing usable was written (exit 1, as documented)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    if summary["written"] == 0:
        print(f"error: no usable image in {args.src}; see {summary['errors_file']}", file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def _one_torch_thread(active: bool) -> Iterator[None]:
    """Parallel over photos (--workers), one intra-op thread each: the face detector's many small ops ran
    several times slower with 2 threads waiting for each other on a busy machine (bench/README.md)."""
    if not active:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)  # main() also runs inside other processes (tests)

if __name__ == "__main__":
    sys.exit(main())
