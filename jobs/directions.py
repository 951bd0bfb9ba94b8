"""Fit editing directions: GANSpace (PCA of the generator's W) or InterFaceGAN (linear SVM on labelled latents).

    python jobs/directions.py ganspace --config configs/ffhq.yaml [--checkpoint CKPT] --out pretrained/editing/pca.pt
        [--samples 100000] [--components K (default min(80, style_dim))] [--seed 0] [--batch 10000] [key=value ...]
    python jobs/directions.py interfacegan --latents URI --labels URI --label-column smile --out smile.pt
        [--space w] [--ratio 0.02] [--val-fraction 0.3] [--C 1.0] [--seed 0] [--config FILE (storage settings)]

Prints a JSON summary. The files are e4e's formats: add them to a config's ``directions:`` (the summary's
``config_example``) to edit with them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clcae.cli_args import add_verbose, config_file, job, parse_with_overrides  # noqa: E402
from clcae.config import StorageConfig, load_config  # noqa: E402
from clcae.device import pick_device  # noqa: E402
from clcae.directions import (  # noqa: E402
    DEFAULT_COMPONENTS,
    fit_ganspace_to_file,
    fit_interfacegan_to_file,
    generator_for,
)
from clcae.train.runtime import configure_output  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="kind", required=True)

    g = sub.add_parser("ganspace", help="PCA over w = mapping(z) of the config's generator")
    g.add_argument("--config", type=config_file, required=True)
    g.add_argument("--checkpoint", default=None,
                   help="a StyleGAN2 .pt (rosinality) or our stage-2 checkpoint; default: generator.checkpoint")
    g.add_argument("--out", required=True, help="output .pt (local path or s3://...)")
    g.add_argument("--samples", type=int, default=100_000)
    g.add_argument("--components", type=int, default=None,
                   help=f"principal components to keep (default: min({DEFAULT_COMPONENTS}, style_dim), e4e's 80 "
                        "for a 512-wide W; at most style_dim)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch", type=int, default=10_000, help="samples per IncrementalPCA batch (bounds memory)")
    g.add_argument("--device", default=None, help="default: the config's device")
    add_verbose(g)
    g.add_argument("overrides", nargs="*", help="config overrides key=value")

    i = sub.add_parser("interfacegan", help="linear SVM on a labelled latent table")
    i.add_argument("--latents", required=True, help="latent table: Parquet file or folder (local or s3://)")
    i.add_argument("--labels", default=None,
                   help="Parquet or .csv with key + the label column; default: the column is in the latent table")
    i.add_argument("--label-column", required=True)
    i.add_argument("--out", required=True, help="output .pt (local path or s3://...)")
    i.add_argument("--space", choices=("w", "w_plus"), default="w")
    i.add_argument("--ratio", type=float, default=0.02,
                   help="continuous labels: fraction taken from each end (InterFaceGAN's 0.02)")
    i.add_argument("--val-fraction", type=float, default=0.3)
    i.add_argument("--C", type=float, default=1.0, help="SVM regularisation")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--config", type=config_file, default=None,
                   help="only its storage: section is used (S3 endpoint, credentials)")
    add_verbose(i)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_with_overrides(build_parser(), argv)


@job  # a user's mistake (config, latents, labels, weights, storage: CLCAEError) is "error: ..." and exit 2
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_output(args.verbose)
    if args.kind == "ganspace":
        cfg = load_config(args.config, args.overrides)
        generator = generator_for(cfg, args.checkpoint).to(pick_device(args.device or cfg.device))
        summary = fit_ganspace_to_file(generator, args.out, args.samples, args.components, args.seed, args.batch)
    else:
        storage = load_config(args.config).storage if args.config else StorageConfig()
        summary = fit_interfacegan_to_file(
            args.latents, args.labels, args.label_column, args.out, storage, args.space,
            ratio=args.ratio, val_fraction=args.val_fraction, C=args.C, seed=args.seed)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
