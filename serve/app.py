"""Serve the CLCAE API and web editor (starts Ray Serve on serve.host:serve.port).

Other ways to start the same app: `serve run serve.app:build_app config=configs/tiny.yaml [model=...]`,
`serve run serve/config.yaml` (a 2-CPU machine), or `serve deploy serve/config.cluster.yaml` (a cluster).
The model is a registry name (clcae-ffhq), the authors' file, our checkpoint or run directory, or an export.

The deployments live in clcae/serving.py; this file only reads the config and the web page.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clcae.cli_args import add_verbose, job  # noqa: E402
from clcae.config import load_config  # noqa: E402
from clcae.errors import CLCAEError  # noqa: E402
from clcae.serving import build, start  # noqa: E402

PAGE = Path(__file__).resolve().parent / "static" / "index.html"


def page() -> str:
    return PAGE.read_text() if PAGE.exists() else ""


def build_app(args: dict[str, str]):
    """Application builder for `serve run` / `serve deploy`: args config=..., model=... (or checkpoint=...), and
    any other key=value pair is a config override (e.g. serve.max_replicas=4)."""
    args = dict(args)
    cfg_path = args.pop("config", str(ROOT / "configs" / "tiny.yaml"))
    model = args.pop("model", None) or args.pop("checkpoint", None)
    overrides = [f"{k}={v}" for k, v in args.items()]
    if model:
        overrides.append(f"serve.model={model}")
    return build(load_config(cfg_path, overrides), page())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--model", "--checkpoint", dest="model", default=None,
                        help="registry name, the authors' file, our checkpoint or run directory, or an export")
    add_verbose(parser)
    parser.add_argument("overrides", nargs="*")
    return parser.parse_intermixed_args(argv)


@job  # a user's mistake (config key, missing model file: CLCAEError) is "error: ..." and exit 2
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from clcae.train.runtime import configure_output, init_ray

    configure_output(args.verbose)
    overrides = list(args.overrides) + ([f"serve.model={args.model}"] if args.model else [])
    cfg = load_config(args.config, overrides)
    init_ray()
    try:
        start(cfg, page())  # resolves the model here, in the driver, before any replica starts
    except CLCAEError:
        raise
    except RuntimeError as exc:  # serve.run: "Deploying application clcae failed: ..." (details in Ray's logs)
        print(f"error: serving failed to start: {exc}", file=sys.stderr)
        return 1
    print(f"serving on http://{cfg.serve.host}:{cfg.serve.port}/ (Ctrl-C to stop)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
