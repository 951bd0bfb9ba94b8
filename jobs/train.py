"""Train a CLCAE stage on Ray Train.

    python jobs/train.py stage=contrastive --config configs/tiny.yaml --run-name tiny-s1 [key=value ...]
    python jobs/train.py stage=inversion --config configs/tiny.yaml --run-name tiny-s2 \
        contrastive.checkpoint=runs/tiny-s1 [key=value ...]

Submitting the same --run-name again resumes from its newest checkpoint.  On a cluster
(`ray job submit -- python jobs/train.py ...`) it connects to that cluster; elsewhere it starts a local one.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clcae.config import ConfigError, load_config  # noqa: E402
from clcae.data.storage import StorageError  # noqa: E402
from clcae.train.loop import STAGES, TrainSetupError, fit, run_uri  # noqa: E402
from clcae.train.runtime import init_ray  # noqa: E402


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, str, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", default="configs/tiny.yaml", help="YAML config (default: configs/tiny.yaml)")
    parser.add_argument("--run-name", required=True, help="run name; the same name resumes")
    parser.add_argument("--num-cpus", type=int, default=None, help="logical CPUs for a local Ray cluster")
    parser.add_argument("args", nargs="*", help="stage=contrastive|inversion and key=value overrides")
    ns = parser.parse_intermixed_args(argv)
    stage = [a.split("=", 1)[1] for a in ns.args if a.startswith("stage=")]
    overrides = [a for a in ns.args if not a.startswith("stage=")]
    if len(stage) != 1 or stage[0] not in STAGES:
        parser.error(f"give exactly one stage=... with one of {STAGES}")
    return ns, stage[0], overrides


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ns, stage, overrides = parse(argv)
    try:
        cfg = load_config(ns.config, overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    init_ray(ns.num_cpus)
    try:
        result = fit(cfg, stage, ns.run_name)
    except (TrainSetupError, ValueError, StorageError) as exc:  # ValueError: config, shards, weights files
        print(f"cannot start training: {exc}", file=sys.stderr)
        return 2
    summary = {"run": run_uri(cfg, ns.run_name), "stage": stage, "metrics": result.metrics,
               "checkpoint": result.checkpoint.path if result.checkpoint else None}
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
