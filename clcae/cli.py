"""``clcae`` command: ``clcae export SRC OUT [--dtype fp16]`` and ``clcae weights list | fetch NAME [--dir DIR] |
check PATH | convert SRC OUT``.

``fetch`` needs a network (never used by the tests).  Google Drive downloads go through ``gdown``
(``pip install gdown``), which handles Drive's confirmation pages; plain URLs use urllib.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import sys
import urllib.request
from pathlib import Path

from clcae.config import ConfigError
from clcae.official import OFFICIAL, OfficialFile
from clcae.pretrained import export
from clcae.weights import WeightsError, read_state, sha256_of

log = logging.getLogger("clcae")

MIN_BYTES = 1_000_000  # a smaller "checkpoint" from Drive is its quota/HTML page


def _download(url: str, dest: Path, folder: bool) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if "drive.google.com" in url:
        try:
            import gdown
        except ImportError:
            raise SystemExit("this file is on Google Drive: `pip install gdown` and run the command again") from None
        if folder:
            gdown.download_folder(url=url.replace("uc?id=", "drive/folders/"), output=str(dest), quiet=False)
        else:
            gdown.download(url, str(dest), quiet=False)
        return
    tmp = dest.with_suffix(dest.suffix + ".part")
    with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as fh:  # noqa: S310 - fixed https URLs
        shutil.copyfileobj(r, fh, 1 << 20)
    tmp.replace(dest)


def _verify(entry: OfficialFile, path: Path) -> None:
    if path.is_dir():
        print(f"{entry.name}: folder at {path}")
        return
    size = path.stat().st_size
    if size < MIN_BYTES and path.suffix in (".pt", ".pth"):
        raise SystemExit(f"{path} is only {size} bytes: probably Drive's quota page. Delete it and retry later.")
    digest = sha256_of(path)
    print(f"{entry.name}: {path} ({size:,} bytes) sha256 {digest}")
    if entry.sha256 and digest != entry.sha256:
        print(f"  warning: differs from the sha256 independent mirrors agree on ({entry.sha256})")
    if entry.md5_prefix:
        md5 = hashlib.md5(path.read_bytes()).hexdigest()  # noqa: S324 - matching MoCo's published md5
        print(f"  md5 {md5[:8]} (published: {entry.md5_prefix})")
    read_state(path)  # structure check: a readable weights_only checkpoint


def cmd_list(_: argparse.Namespace) -> int:
    for e in OFFICIAL.values():
        print(f"{e.name:26s} {e.filename:32s} {e.source}" + (f"  [{e.note}]" if e.note else ""))
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    names = list(OFFICIAL) if args.name == "all" else [args.name]
    for name in names:
        if name not in OFFICIAL:
            raise SystemExit(f"unknown file {name!r}; `clcae weights list` shows the known names")
        entry = OFFICIAL[name]
        dest = Path(args.dir) / entry.filename
        if dest.exists() and not args.force:
            print(f"{name}: already at {dest}")
            _verify(entry, dest)
            continue
        errors = []
        for url in entry.urls:
            try:
                _download(url, dest, entry.folder)
                break
            except Exception as exc:  # noqa: BLE001 - try the next mirror, report all at the end
                errors.append(f"{url}: {exc}")
        else:
            raise SystemExit(f"could not download {name}:\n  " + "\n  ".join(errors))
        _verify(entry, dest)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    try:
        state = read_state(args.path)
    except WeightsError as exc:
        print(exc, file=sys.stderr)
        return 1
    keys = list(state)[:10] if isinstance(state, dict) else type(state).__name__
    print(f"{args.path}: sha256 {sha256_of(args.path)}; top-level: {keys}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Any model (registry name, the authors' file, our checkpoint or run directory) -> one .safetensors file:
    weights + model-only config, no optimiser state, no training paths, no direction files."""
    if not str(args.out).endswith(".safetensors"):
        print(f"error: {args.out}: the exported model is a .safetensors file; name it *.safetensors", file=sys.stderr)
        return 2
    try:
        info = export(args.source, args.out, dtype=args.dtype, overrides=args.overrides)
    except (ConfigError, WeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{info['out']}: {info['bytes']:,} bytes, {info['tensors']} tensors ({info['dtype']}), "
          f"model id {info['model_id']}")
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="registry name (clcae-ffhq), the authors' file, our checkpoint or run directory")
    p.add_argument("out", help="the .safetensors file to write (local or s3://)")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                   help="fp16 halves the file; outputs then differ slightly from the source (fp32 is bit-identical)")
    p.add_argument("overrides", nargs="*", help="generator.checkpoint=... / model.average_image=... for the "
                                                "authors' files")
    p.set_defaults(fn=cmd_export)


def build_parser() -> argparse.ArgumentParser:
    """The ``clcae`` command's parser (tests/test_docs.py parses the README's ``clcae ...`` lines with it)."""
    parser = argparse.ArgumentParser(prog="clcae", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="group", required=True)
    weights = sub.add_parser("weights", help="official weight files").add_subparsers(dest="cmd", required=True)
    weights.add_parser("list", help="the official files and where they come from").set_defaults(fn=cmd_list)
    fetch = weights.add_parser("fetch", help="download an official file (needs a network)")
    fetch.add_argument("name", help="a name from `clcae weights list`, or 'all'")
    fetch.add_argument("--dir", default="pretrained", help="destination folder (default: pretrained/)")
    fetch.add_argument("--force", action="store_true", help="download again even if the file exists")
    fetch.set_defaults(fn=cmd_fetch)
    check = weights.add_parser("check", help="read a checkpoint safely and print its sha256 and keys")
    check.add_argument("path")
    check.set_defaults(fn=cmd_check)
    _export_args(weights.add_parser("convert", help="the authors' file (or any model) -> our exported format "
                                                    "(same as `clcae export`)"))
    _export_args(sub.add_parser("export", help="a model -> one .safetensors file (weights + model config)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
