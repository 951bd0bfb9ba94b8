"""Face alignment speed (detection + FFHQ crop) at 1, 4 and 12 MP, and the picture for the note.

    python bench/align.py [--megapixels 1 4 12] [--repeats 5] [--size 256] [--device cpu] [--out FILE.json]
                          [--panel bench/results/align_astronaut.png]

The photo is scikit-image's astronaut (512x512, one face) upscaled (Lanczos) to a square of each size, so
every photo holds one face and faces/s = photos/s. Per size, after one warm-up call, ``--repeats`` timed
calls of each stage (median ms):

* ``decode``: JPEG bytes (quality 90) -> RGB, EXIF applied (``clcae.align.load_photo``), not in faces/s;
* ``detect``: downscale to <= 1024 px, MTCNN, landmark refinement (``Aligner.detector``);
* ``align``: ``Aligner.__call__`` on the decoded photo: detect + the FFHQ crop at ``--size``;
* ``faces_per_s`` = 1000 / align ms; ``faces_per_s_from_jpeg`` = 1000 / (decode + align) ms;
* ``cpu_ms`` / ``faces_per_cpu_s``: the same from this process's CPU time, with the 1-minute load average
  before and after: on a shared machine wall time also measures the other tenants.

The panel (``write_panel``) is original (quad and landmarks drawn) | aligned crop; pass more
``(label, image)`` pairs to add panels (reconstruction, edit pasted back).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import emit  # noqa: E402
from clcae.align import AlignedCrop, Aligner, load_photo  # noqa: E402


def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


def photo_of(megapixels: float) -> Image.Image:
    side = round((megapixels * 1e6) ** 0.5)
    return astronaut().resize((side, side), Image.Resampling.LANCZOS)


def timed(fn, repeats: int) -> tuple[float, float, list[float]]:
    """(median wall ms, median CPU ms of this process, all wall ms) of ``repeats`` calls after a warm-up call.

    CPU time is reported because wall time on a shared machine measures the other tenants as much as us.
    """
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.process_time() - c0) * 1000)
    return statistics.median(wall), statistics.median(cpu), [round(t, 1) for t in wall]


def bench_size(aligner: Aligner, megapixels: float, repeats: int) -> dict:
    photo = photo_of(megapixels)
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    decoded = load_photo(jpeg)
    faces = aligner(decoded)
    load0 = os.getloadavg()[0]
    decode_ms, decode_cpu, decode_all = timed(lambda: load_photo(jpeg), repeats)
    detect_ms, detect_cpu, detect_all = timed(lambda: aligner.detector([decoded]), repeats)
    align_ms, align_cpu, align_all = timed(lambda: aligner(decoded), repeats)
    return {"megapixels": round(photo.width * photo.height / 1e6, 2), "size": list(photo.size),
            "faces": len(faces), "decode_ms": round(decode_ms, 1), "detect_ms": round(detect_ms, 1),
            "align_ms": round(align_ms, 1), "faces_per_s": round(len(faces) * 1000 / align_ms, 2),
            "faces_per_s_from_jpeg": round(len(faces) * 1000 / (decode_ms + align_ms), 2),
            "cpu_ms": {"decode": round(decode_cpu, 1), "detect": round(detect_cpu, 1), "align": round(align_cpu, 1)},
            "faces_per_cpu_s": round(len(faces) * 1000 / align_cpu, 2),
            "load_average_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
            "raw_wall_ms": {"decode": decode_all, "detect": detect_all, "align": align_all}}


def draw_faces(photo: Image.Image, faces: Sequence[AlignedCrop], width: int = 3) -> Image.Image:
    """The photo with each face's quad (top edge thicker: the crop's top) and landmarks drawn."""
    out = photo.copy()
    draw = ImageDraw.Draw(out)
    for face in faces:
        q = [tuple(p + 0.5) for p in face.quad]
        draw.polygon(q, outline=(255, 64, 64), width=width)
        draw.line([q[0], q[3]], fill=(255, 220, 0), width=2 * width)
        for x, y in (face.landmarks if face.landmarks is not None else []):
            draw.ellipse((x - width, y - width, x + width, y + width), fill=(64, 255, 64))
    return out


def write_panel(path: str | Path, panels: Sequence[tuple[str, Image.Image]], height: int = 384) -> Path:
    """Images side by side at one height, each labelled underneath; returns the path written (PNG).

    For the note: ``[("original", draw_faces(photo, faces)), ("aligned", faces[0].image)]`` now; a later
    step appends ``("reconstruction", ...)``, ``("edit, pasted back", ...)``.
    """
    label_h, gap = 22, 6
    scaled = [im.convert("RGB").resize((max(round(im.width * height / im.height), 1), height),
                                       Image.Resampling.LANCZOS) for _, im in panels]
    canvas = Image.new("RGB", (sum(im.width for im in scaled) + gap * (len(scaled) - 1), height + label_h),
                       "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for (label, _), im in zip(panels, scaled):
        canvas.paste(im, (x, 0))
        draw.text((x + 4, height + 4), label, fill=(0, 0, 0))
        x += im.width + gap
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--megapixels", type=float, nargs="+", default=[1, 4, 12])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--size", type=int, default=256, help="crop side")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--panel", default=str(ROOT / "bench" / "results" / "align_astronaut.png"),
                   help="where the original | aligned picture goes ('' to skip)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    aligner = Aligner("faces", args.size, device=args.device)
    result = {
        "what": "faces/s of Aligner (detect <= 1024 px + landmark refinement + FFHQ crop), astronaut upscaled",
        "device": args.device, "crop_size": args.size, "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
        "sizes": [bench_size(aligner, mp, args.repeats) for mp in args.megapixels],
    }
    if args.panel:
        photo = astronaut()
        faces = aligner(photo)
        result["panel"] = str(write_panel(args.panel, [("original (quad, landmarks)", draw_faces(photo, faces)),
                                                       ("aligned crop", faces[0].image)]))
    emit(result, args.out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
