"""Evaluate a CLCAE model on test images: the paper's Table 1 (PSNR, SSIM, LPIPS, ID, time, ID after edit).

    python jobs/evaluate.py --model clcae-ffhq --config configs/ffhq.yaml \
        --input data/celebahq_test --out eval/ffhq [--limit N] [--batch-size 8] [--edit smile=2.0] [key=value ...]

``--model`` is a registry name, the authors' file, our checkpoint or run directory, or an exported model (its
architecture comes with it).  ``--input`` is an image folder or image shards (a Parquet file or folder, local or
s3://). Without ``--config`` the job settings stored in our checkpoint are used (schema defaults for other
models). LPIPS and ID settings come from the config's ``loss`` section
(``loss.lpips_pretrained``, ``loss.id_network``, ``loss.id_weights``); the edit's direction from ``directions``.
Writes OUT/metrics.json, OUT/metrics.md and OUT/per_image.csv, and prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clcae.cli_args import add_verbose, config_file, job, parse_with_overrides  # noqa: E402
from clcae.config import load_config  # noqa: E402
from clcae.editing import EditError  # noqa: E402
from clcae.evaluation import EvaluationError, evaluate, parse_edit, read_images, to_markdown, write_report  # noqa: E402
from clcae.inference import Inverter  # noqa: E402
from clcae.metrics import SSIM_WINDOWS  # noqa: E402
from clcae.pretrained import prepare  # noqa: E402
from clcae.train.runtime import configure_output  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=config_file, default=None,
                        help="job settings (default: those stored in --model)")
    parser.add_argument("--model", "--checkpoint", dest="model", default=None,
                        help="registry name, the authors' file, our checkpoint or run directory, or an export "
                             "(default: the config's model with a random encoder)")
    parser.add_argument("--input", required=True, help="image folder or image shards (local or s3://)")
    parser.add_argument("--out", required=True, help="output folder (local or s3://)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate at most N images")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--edit", action="append", default=[], metavar="NAME=STRENGTH",
                        help="direction from the config's directions: for 'ID after edit' (repeat to combine)")
    parser.add_argument("--ssim-window", choices=SSIM_WINDOWS, default="gaussian11")
    parser.add_argument("--device", default=None, help="default: the config's device")
    parser.add_argument("--no-timing", action="store_true", help="skip the separate timed inversion per batch")
    add_verbose(parser)
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (anywhere on the line)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_with_overrides(build_parser(), argv)


@job  # a user's mistake (config, model, inputs, directions, storage: CLCAEError) is "error: ..." and exit 2
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_output(args.verbose)
    if args.config is None and args.model is None:
        raise EvaluationError("give --model, --config, or both")
    job_cfg = load_config(args.config, [] if args.model else args.overrides) if args.config else None
    source = None
    if args.model:
        source, cfg = prepare(args.model, job_cfg, args.overrides)
    else:
        cfg = job_cfg
    edits = [parse_edit(spec) for spec in args.edit]
    unknown = [name for name, _ in edits if name not in cfg.directions]
    if unknown:  # before building the model
        raise EditError(f"unknown direction {unknown[0]!r}; known directions: {sorted(cfg.directions)} "
                        "(add it under directions: in the config)")
    # only the edits' directions are loaded: the config may name files this machine does not have
    cfg.directions = {name: spec for name, spec in cfg.directions.items() if name in dict(edits)}
    inverter = (Inverter.load(source, cfg, device=args.device) if source is not None
                else Inverter.from_config(cfg, device=args.device))
    result = evaluate(
        inverter, read_images(args.input, cfg.storage), edits,
        id_network=cfg.loss.id_network, id_weights=cfg.loss.id_weights, id_backbone=cfg.loss.id_backbone,
        lpips_pretrained_backbone=cfg.loss.lpips_pretrained, ssim_window=args.ssim_window,
        batch_size=args.batch_size, limit=args.limit, timing=not args.no_timing, source=args.input)
    paths = write_report(result, args.out, cfg.storage)
    print(to_markdown(result))
    print(json.dumps({"written": paths, "images": result["images"],
                      "undecodable": result["undecodable"]["count"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
