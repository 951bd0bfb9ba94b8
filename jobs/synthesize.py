"""Synthesise the stage-1 (image, w) pairs into shards with a Ray Data actor pool.

    python jobs/synthesize.py OUT_URI [--config configs/tiny.yaml] [--num N] [--start-seed S]
        [--rows-per-shard R] [--actors K] [key=value ...]

Deterministic (same seeds -> same bytes) and resumable (a re-run writes only the missing shards).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clcae.cli_args import add_verbose, config_file, default_config, job, parse_with_overrides  # noqa: E402
from clcae.config import load_config  # noqa: E402
from clcae.data.storage import absolute, absolute_paths  # noqa: E402
from clcae.data.synthesis import synthesize  # noqa: E402
from clcae.train.runtime import configure_output, init_ray  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output folder URI (local path or s3://...)")
    parser.add_argument("--config", type=config_file, default=default_config("tiny"),
                        help="YAML config (default: the shipped configs/tiny.yaml)")
    parser.add_argument("--num", type=int, default=None, help="number of pairs (default: data.num_synthetic)")
    parser.add_argument("--start-seed", type=int, default=0)
    parser.add_argument("--rows-per-shard", type=int, default=1000)
    parser.add_argument("--actors", type=int, default=1, help="generator actors (one GPU each when available)")
    add_verbose(parser)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (anywhere on the line)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_with_overrides(build_parser(), argv)


@job  # a user's mistake (config, output, storage: CLCAEError) is "error: ..." and exit 2
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_output(args.verbose)
    # the generator actors may run in another folder: paths become absolute where the command runs
    cfg = absolute_paths(load_config(args.config, args.overrides))
    init_ray(None)
    summary = synthesize(cfg, absolute(args.out), args.num, args.start_seed, args.rows_per_shard, args.actors)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
