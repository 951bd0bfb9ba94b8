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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clcae.cli_args import add_verbose, job  # noqa: E402
from clcae.config import load_config  # noqa: E402
from clcae.train.loop import STAGES, fit, run_uri  # noqa: E402
from clcae.train.runtime import configure_output, init_ray  # noqa: E402


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, str, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", default="configs/tiny.yaml", help="YAML config (default: configs/tiny.yaml)")
    parser.add_argument("--run-name", required=True, help="run name; the same name resumes")
    parser.add_argument("--num-cpus", type=int, default=None, help="logical CPUs for a local Ray cluster")
    add_verbose(parser)
    parser.add_argument("args", nargs="*", help="stage=contrastive|inversion and key=value overrides")
    ns = parser.parse_intermixed_args(argv)
    stage = [a.split("=", 1)[1] for a in ns.args if a.startswith("stage=")]
    overrides = [a for a in ns.args if not a.startswith("stage=")]
    if len(stage) != 1 or stage[0] not in STAGES:
        parser.error(f"give exactly one stage=... with one of {STAGES}")
    return ns, stage[0], overrides


@job  # a user's mistake (config, paths, shards, weights, storage: CLCAEError) is "error: ..." and exit 2
def main(argv: list[str] | None = None) -> int:
    ns, stage, overrides = parse(argv)
    configure_output(ns.verbose)
    cfg = load_config(ns.config, overrides)
    init_ray(ns.num_cpus)
    result = fit(cfg, stage, ns.run_name)  # what a retry cannot fix is raised here, before any worker starts
    summary = {"run": run_uri(cfg, ns.run_name), "stage": stage, "metrics": result.metrics,
               "checkpoint": result.checkpoint.path if result.checkpoint else None}
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
