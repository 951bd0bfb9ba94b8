"""Throughput of the bulk inversion job (jobs/invert.py) against a plain PyTorch loop, and its peak memory.

    python bench/batch.py [--images 256] [--batch 16] [--actors 1 2] [--memory-images 0] [--out FILE.json]
                          [key=value ...]   (config overrides, anywhere on the line)

* ``plain``: one process decodes the same image files and runs ``Inverter.invert`` in batches of ``--batch``.
* ``ray_Na``: ``clcae.batch.invert_to_table`` with N inversion actors, same model and batch size, writing the
  Parquet latent table (the plain loop writes nothing: the ratio includes the job's I/O).
* ``--memory-images M``: a second Ray cluster with a small object store (``--object-store-mb``) inverts M
  images whose decoded pixels are ``--memory-factor`` times that store; peak memory is the sampled
  proportional set size (PSS, so shared object-store pages are not double counted) of every process of this
  benchmark's session, drivers and Ray workers together.

All figures in one run on one machine; ratios are what to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from clcae.cli_args import config_file, default_config, parse_with_overrides  # noqa: E402
from clcae.config import load_config  # noqa: E402


def write_images(folder: Path, n: int, size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i:06d}.png")


def session_pss_bytes() -> int:
    """PSS of every process in this process's session (the bench, Ray's GCS/raylet/workers)."""
    sid, total = os.getsid(0), 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) != sid:
                continue
            with open(f"/proc/{entry}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, ProcessLookupError):
            continue
    return total


class PeakMemory:
    def __init__(self, every_s: float = 0.5):
        self.peak, self.every, self._stop = 0, every_s, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, session_pss_bytes())
            self._stop.wait(self.every)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def plain_loop(cfg, folder: Path, batch: int) -> dict:
    import torch

    from clcae.data.images import decode_image, pil_to_tensor
    from clcae.inference import Inverter

    torch.set_num_threads(max(1, int(cfg.infer.cpus_per_actor)))
    inverter = Inverter.from_config(cfg, device="cpu")
    files = sorted(folder.iterdir())
    size = tuple(cfg.encoder.input_size)
    inverter.invert(torch.zeros(batch, 3, *size))  # warm-up
    t = time.perf_counter()
    for i in range(0, len(files), batch):
        x = torch.stack([pil_to_tensor(decode_image(f.read_bytes()), size) for f in files[i:i + batch]])
        inverter.invert(x)
    seconds = time.perf_counter() - t
    return {"images": len(files), "seconds": round(seconds, 2), "images_per_s": round(len(files) / seconds, 2)}


def ray_job(cfg, folder: Path, out: Path) -> dict:
    from clcae.batch import invert_to_table

    shutil.rmtree(out, ignore_errors=True)
    summary = invert_to_table(cfg, [str(folder)], str(out))
    return {k: summary[k] for k in ("inputs", "written", "errors", "seconds", "images_per_s")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=config_file, default=default_config("tiny"))
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=96, help="side of the generated input files")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs of the Ray cluster")
    parser.add_argument("--memory-images", type=int, default=0, help="images for the streaming-memory run (0: skip)")
    parser.add_argument("--object-store-mb", type=int, default=100)
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (anywhere on the line)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # key=value overrides are taken out first: `--actors 1 encoder.input_size=[128,128]` would otherwise hand the
    # override to --actors (nargs="+") and fail with "invalid int value"
    return parse_with_overrides(build_parser(), argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray

    base = load_config(args.config, [f"infer.batch_size={args.batch}", *args.overrides])
    work = Path(tempfile.mkdtemp(prefix="clcae-bench-batch-"))
    report: dict = {"benchmark": "bench/batch.py", "machine": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "config": args.config, "batch": args.batch,
                    "images": args.images, "input_size": base.encoder.input_size, "results": {}}
    try:
        # Two input sizes: the marginal rate (extra images / extra seconds) removes fixed start-up costs
        # (actor start, model build, first-batch scheduling) that a job over millions of images amortises.
        write_images(work / "in", args.images, args.image_size)
        write_images(work / "in2", 2 * args.images, args.image_size)
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        for name, folder in (("plain", "in"), ("plain_2x", "in2")):
            report["results"][name] = plain_loop(base, work / folder, args.batch)
        for n in args.actors:
            cfg = load_config(args.config, [f"infer.batch_size={args.batch}", f"infer.actors={n}", *args.overrides])
            report["results"][f"ray_{n}a"] = ray_job(cfg, work / "in", work / f"out{n}")
            report["results"][f"ray_{n}a_2x"] = ray_job(cfg, work / "in2", work / f"out{n}x2")
        r = report["results"]

        def marginal(name: str) -> float:
            return args.images / max(r[f"{name}_2x"]["seconds"] - r[name]["seconds"], 1e-9)

        plain = marginal("plain")
        report["marginal_images_per_s"] = {"plain": round(plain, 2),
                                           **{f"ray_{n}a": round(marginal(f"ray_{n}a"), 2) for n in args.actors}}
        report["ratios"] = {
            **{f"ray_{n}a_over_plain_marginal": round(marginal(f"ray_{n}a") / plain, 3) for n in args.actors},
            **{f"ray_{n}a_over_plain_end_to_end": round(r[f"ray_{n}a_2x"]["images_per_s"]
                                                        / r["plain_2x"]["images_per_s"], 3) for n in args.actors}}
        ray.shutdown()
        if args.memory_images:
            h, w = base.encoder.input_size
            store = args.object_store_mb * 2**20
            write_images(work / "mem", args.memory_images, max(h, w))
            ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, object_store_memory=store)
            with PeakMemory() as mem:
                result = ray_job(base, work / "mem", work / "mem_out")
            ray.shutdown()
            decoded = args.memory_images * h * w * 3
            report["memory"] = {"object_store_bytes": store, "decoded_pixels_bytes": decoded,
                                "pixels_over_store": round(decoded / store, 2), "peak_pss_bytes": mem.peak,
                                "peak_pss_gib": round(mem.peak / 2**30, 3), "job": result}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
