"""Bulk inversion of raw photos: throughput with and without alignment, and where the time goes.

    python bench/photos.py [--photos 64] [--rounds 2] [--out FILE.json] [key=value ...]
    python bench/photos.py --panel bench/results/photo_edit_astronaut.png [--model clcae-ffhq --config configs/ffhq.yaml
                           --edit smile=2.0]   # the picture only: original | aligned | reconstruction | edit

Inputs are real-photo variants (scikit-image's astronaut: random crops, scales and mirrors, saved as JPEG at
512 px), so every photo has one face.  ``aligned``: the job (``clcae.batch.invert_to_table``) on crops that
``Aligner`` made beforehand (what a user with an aligned dataset runs); ``align``: the same job on the raw photos
with ``infer.align=faces`` (detection + FFHQ crop in Ray Data tasks, then the same inversion actor).  Rounds are
interleaved (aligned, align, aligned, align ...) on one Ray cluster; medians are reported.  The split times the
two stages in this process, one batch at a time: ``align_rows`` per photo and the inversion actor per image.
The model is the config's (tiny by default, random weights: the speed is the point).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import emit  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from clcae.cli_args import config_file, default_config, parse_with_overrides  # noqa: E402
from clcae.config import load_config  # noqa: E402


def write_photos(folder: Path, n: int, seed: int = 0) -> None:
    from skimage import data as skimage_data

    folder.mkdir(parents=True, exist_ok=True)
    base = Image.fromarray(skimage_data.astronaut())
    rng = np.random.default_rng(seed)
    for i in range(n):
        side = int(rng.integers(420, 512))
        x0, y0 = (int(v) for v in rng.integers(0, 512 - side + 1, 2))
        im = base.crop((x0, y0, x0 + side, y0 + side)).resize((512, 512), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        im.save(folder / f"photo_{i:05d}.jpg", quality=92)


def write_crops(photos: Path, folder: Path, size: tuple[int, int]) -> None:
    from clcae.align import Aligner

    folder.mkdir(parents=True, exist_ok=True)
    aligner = Aligner("faces", size)
    for p in sorted(photos.iterdir()):
        aligner(p.read_bytes(), name=p.name)[0].image.save(folder / f"{p.stem}.png")


def split(cfg, photos: Path, batch: int) -> dict:
    """Seconds per photo of the alignment stage and per image of the inversion stage, in this process."""
    from clcae.batch import InvertActor, align_rows
    from clcae.config import to_dict

    files = sorted(photos.iterdir())[:batch]
    rows = {"key": np.asarray([f.name for f in files], dtype=object),
            "source": np.asarray([str(f) for f in files], dtype=object),
            "image": np.asarray([f.read_bytes() for f in files], dtype=object)}
    size = tuple(cfg.encoder.input_size)
    align_rows(rows, "faces", size)  # warm-up: builds the detector
    t0 = time.perf_counter()
    faces = align_rows(rows, "faces", size)
    align_s = (time.perf_counter() - t0) / len(files)
    actor = InvertActor(to_dict(cfg), None, "cpu", False, True)
    actor(faces)  # warm-up
    t0 = time.perf_counter()
    actor(faces)
    invert_s = (time.perf_counter() - t0) / len(faces["key"])
    return {"align_ms_per_photo": round(1000 * align_s, 1), "invert_ms_per_image": round(1000 * invert_s, 1),
            "align_share": round(align_s / (align_s + invert_s), 3)}


def panel(cfg, path: str, model: str | None, edit: str | None) -> None:
    """original (faces boxed) | aligned crop | reconstruction | edit pasted back into the whole photo."""
    import torch
    from skimage import data as skimage_data

    from bench.align import draw_faces, write_panel
    from clcae.align import Aligner, paste_back
    from clcae.config import DirectionConfig
    from clcae.data.images import tensor_to_pil
    from clcae.editing import save_interfacegan
    from clcae.evaluation import parse_edit
    from clcae.factory import build_directions
    from clcae.inference import Inverter

    photo = Image.fromarray(skimage_data.astronaut())
    faces = Aligner("faces", tuple(cfg.encoder.input_size))(photo)
    if edit is None:  # no direction files offline: a fixed random unit direction in W, labelled as such
        tmp = Path(tempfile.mkdtemp()) / "random.pt"
        g = torch.Generator().manual_seed(0)
        save_interfacegan(torch.nn.functional.normalize(torch.randn(1, cfg.generator.style_dim, generator=g)), tmp)
        cfg.directions = {"random direction": DirectionConfig(kind="interfacegan", path=str(tmp), max_strength=5)}
        edit = "random direction=3"
    inv = Inverter.from_pretrained(model, cfg, device="cpu") if model else Inverter.from_config(cfg, device="cpu")
    inv.directions = build_directions(cfg)
    res = inv.invert([faces[0].image])
    edited = tensor_to_pil(inv.edit(res, [parse_edit(edit)]))[0]
    what = model or f"{cfg.name}, random weights"
    write_panel(path, [("original", draw_faces(photo, faces)), ("aligned", faces[0].image),
                       (f"reconstruction ({what})", tensor_to_pil(res.image)[0]),
                       (f"{edit}, pasted back", paste_back(photo, edited, faces[0].quad))])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=config_file, default=default_config("tiny"))
    p.add_argument("--photos", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--panel", default=None, help="only write the picture to this PNG")
    p.add_argument("--model", default=None, help="for --panel: any model (default: the config's, random weights)")
    p.add_argument("--edit", default=None, metavar="NAME=STRENGTH", help="for --panel: a direction of the config")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_with_overrides(build_parser(), argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, [*args.overrides, f"infer.batch_size={args.batch}", "infer.psnr=false"])
    if args.panel:
        panel(load_config(args.config, args.overrides), args.panel, args.model, args.edit)
        print(args.panel)
        return 0
    from clcae.batch import invert_to_table
    from clcae.train.runtime import init_ray

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        photos, crops = tmp_path / "photos", tmp_path / "crops"
        write_photos(photos, args.photos)
        write_crops(photos, crops, tuple(cfg.encoder.input_size))
        result = {"photos": args.photos, "batch": args.batch, "config": str(args.config), "split": split(
            cfg, photos, args.batch)}
        init_ray()
        runs: dict[str, list[float]] = {"aligned": [], "align": []}
        for r in range(args.rounds):
            for name in runs:
                job_cfg = load_config(args.config, [*args.overrides, f"infer.batch_size={args.batch}",
                                                    "infer.psnr=false", *(["infer.align=faces"] if name == "align"
                                                                          else [])])
                out = tmp_path / f"out_{name}_{r}"
                t0 = time.perf_counter()
                summary = invert_to_table(job_cfg, [str(crops if name == "aligned" else photos)], str(out))
                seconds = time.perf_counter() - t0
                assert summary["errors"] == 0 and summary["written"] == args.photos, summary
                runs[name].append(args.photos / seconds)
        result["images_per_s"] = {k: round(statistics.median(v), 2) for k, v in runs.items()}
        result["images_per_s_all"] = {k: [round(x, 2) for x in v] for k, v in runs.items()}
        result["align_vs_aligned"] = round(result["images_per_s"]["align"] / result["images_per_s"]["aligned"], 3)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
