"""An image folder (recursive) or a .zip -> Parquet image shards, locally or on S3.

    python jobs/make_shards.py SRC DST [--rows-per-shard 1000] [--min-size 64] [--workers N] [--overwrite]
                               [--config configs/ffhq.yaml] [storage.endpoint_url=http://minio:9000 ...]

Keys are the files' relative paths. Files that are not usable images are listed in DST/errors.csv
(key, source, error) and counted, never dropped silently. Progress goes to stderr every --progress-every
files or 10 s; the summary {"inputs", "written", "errors", "shards", ...} is printed to stdout as JSON.
Exit status: 0 when at least one image was written, 1 when none was, 2 for bad arguments or config.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clcae.config import ConfigError, load_config  # noqa: E402
from clcae.data.shards import ShardError, make_shards  # noqa: E402
from clcae.data.storage import StorageError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="make_shards.py", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="image folder or .zip (path or URI)")
    p.add_argument("dst", help="output folder for the shards (path, file:// or s3:// URI)")
    p.add_argument("--rows-per-shard", type=int, default=1000)
    p.add_argument("--min-size", type=int, default=64, help="smallest accepted side in pixels")
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default: min(8, CPUs))")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in DST")
    p.add_argument("--progress-every", type=int, default=1000, help="files between progress lines")
    p.add_argument("--config", default=None, help="YAML config whose storage.* section is used")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. storage.endpoint_url=...")
    return p.parse_intermixed_args(argv)  # overrides may come before or after the options


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        summary = make_shards(args.src, args.dst, cfg.storage, rows_per_shard=args.rows_per_shard,
                              min_size=args.min_size, overwrite=args.overwrite, workers=args.workers,
                              progress_every=args.progress_every)
    except ConfigError as exc:
        print(f"make_shards: {exc}", file=sys.stderr)
        return 2
    except (ShardError, StorageError) as exc:
        print(f"make_shards: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, StorageError) else 2
    print(json.dumps(summary))
    if summary["written"] == 0:
        print(f"make_shards: no usable image in {args.src}; see {summary['errors_file']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
