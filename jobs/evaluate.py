"""Evaluate a CLCAE model on test images: the paper's Table 1 (PSNR, SSIM, LPIPS, ID, time, ID after edit).

    python jobs/evaluate.py --config configs/ffhq.yaml --checkpoint runs/ffhq-s2/checkpoint_100000/checkpoint.pt \
        --input data/celebahq_test --out eval/ffhq [--limit N] [--batch-size 8] [--edit smile=2.0] [key=value ...]

``--input`` is an image folder or image shards (a Parquet file or folder, local or s3://). Without ``--config``
the config stored in the checkpoint is used. LPIPS and ID settings come from the config's ``loss`` section
(``loss.lpips_pretrained``, ``loss.id_network``, ``loss.id_weights``); the edit's direction from ``directions``.
Writes OUT/metrics.json, OUT/metrics.md and OUT/per_image.csv, and prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clcae.config import ConfigError, from_dict, load_config  # noqa: E402
from clcae.data.images import InputError  # noqa: E402
from clcae.data.shards import ShardError  # noqa: E402
from clcae.data.storage import StorageError  # noqa: E402
from clcae.editing import DirectionFileError, EditError  # noqa: E402
from clcae.evaluation import EvaluationError, evaluate, parse_edit, read_images, to_markdown, write_report  # noqa: E402
from clcae.inference import Inverter, merge_overrides  # noqa: E402
from clcae.metrics import SSIM_WINDOWS  # noqa: E402
from clcae.weights import WeightsError, read_checkpoint  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="default: the config stored in --checkpoint")
    parser.add_argument("--checkpoint", default=None, help="our stage-2 checkpoint (default: random init)")
    parser.add_argument("--input", required=True, help="image folder or image shards (local or s3://)")
    parser.add_argument("--out", required=True, help="output folder (local or s3://)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate at most N images")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--edit", action="append", default=[], metavar="NAME=STRENGTH",
                        help="direction from the config's directions: for 'ID after edit' (repeat to combine)")
    parser.add_argument("--ssim-window", choices=SSIM_WINDOWS, default="gaussian11")
    parser.add_argument("--device", default=None, help="default: the config's device")
    parser.add_argument("--no-timing", action="store_true", help="skip the separate timed inversion per batch")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        if args.config is None and args.checkpoint is None:
            raise EvaluationError("give --config, --checkpoint, or both")
        if args.config is not None:
            cfg = load_config(args.config, args.overrides)
        else:
            cfg = from_dict(merge_overrides(read_checkpoint(args.checkpoint, kind="inversion")["config"],
                                            args.overrides))
        edits = [parse_edit(spec) for spec in args.edit]
        unknown = [name for name, _ in edits if name not in cfg.directions]
        if unknown:  # before building the model
            raise EditError(f"unknown direction {unknown[0]!r}; known directions: {sorted(cfg.directions)} "
                            "(add it under directions: in the config)")
        inverter = Inverter.from_config(cfg, args.checkpoint, device=args.device)
        result = evaluate(
            inverter, read_images(args.input, cfg.storage), edits,
            id_network=cfg.loss.id_network, id_weights=cfg.loss.id_weights, id_backbone=cfg.loss.id_backbone,
            lpips_pretrained_backbone=cfg.loss.lpips_pretrained, ssim_window=args.ssim_window,
            batch_size=args.batch_size, limit=args.limit, timing=not args.no_timing, source=args.input)
        paths = write_report(result, args.out, cfg.storage)
    except (ConfigError, EvaluationError, EditError, DirectionFileError, WeightsError, StorageError, ShardError,
            InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(to_markdown(result))
    print(json.dumps({"written": paths, "images": result["images"],
                      "undecodable": result["undecodable"]["count"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
