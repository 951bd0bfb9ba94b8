"""Throughput of the bulk inversion job (jobs/invert.py) against a plain PyTorch loop, where its time goes, and
its peak memory.

    python bench/batch.py [--images 256] [--batch 16] [--actors 1 2] [--rounds 3] [--memory-images 0]
                          [--out FILE.json] [key=value ...]   (config overrides, anywhere on the line)

* ``plain``: one process decodes the same image files and runs ``Inverter.invert`` in batches of ``--batch``
  (its model build and warm-up call are not timed).
* ``ray_Na``: ``clcae.batch.invert_to_table`` with N inversion actors, same model and batch size, writing the
  Parquet latent table (the plain loop writes nothing: the ratio includes the job's I/O). Every job starts its
  own actors, so actor start and model load are inside its time; Ray's own start (``ray_start_s``) is not, and
  an untimed job over ``--warmup-images`` images first warms the cluster as the plain loop's warm-up call does.
* Each of ``--rounds`` rounds runs every case once over N and over 2N images, in an order that rotates between
  rounds, so load from other processes lands on all cases alike. Ratios are taken within a round (end to end at
  N and at 2N images; at the margin: (plain 2N - plain N) / (ray 2N - ray N) seconds, which removes fixed
  costs) and reported as median [min, max] over rounds.
* ``stages``: each job's time by stage (``clcae.batch.stage_seconds``: plan, actor ready, first batch, model
  loads, read, decode, invert and write seconds), median over rounds.
* ``--memory-images M``: a second Ray cluster with a small object store (``--object-store-mb``) inverts M
  images whose decoded pixels are ``--memory-factor`` times that store; peak memory is the sampled
  proportional set size (PSS, so shared object-store pages are not double counted) of every process of this
  benchmark's session, drivers and Ray workers together.

All figures in one run on one machine; ratios are what to compare.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from bench.memory import PeakMemory, cpu_snapshot, cpu_spent  # noqa: E402
from bench.report import emit  # noqa: E402
from clcae.cli_args import config_file, default_config, parse_with_overrides  # noqa: E402
from clcae.config import load_config  # noqa: E402
from clcae.train.runtime import LOCAL_SYSTEM_CONFIG  # noqa: E402


def write_images(folder: Path, n: int, size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i:06d}.png")


def plain_inverter(cfg, batch: int):
    """The plain loop's model, built and warmed up once (untimed)."""
    import torch

    from clcae.inference import Inverter

    torch.set_num_threads(max(1, int(cfg.infer.cpus_per_actor)))
    inverter = Inverter.from_config(cfg, device="cpu")
    inverter.invert(torch.zeros(batch, 3, *cfg.encoder.input_size))  # warm-up
    return inverter


def plain_loop(inverter, folder: Path, batch: int) -> dict:
    import torch

    from clcae.data.images import decode_image, pil_to_tensor

    files = sorted(folder.iterdir())
    size = inverter.input_size
    decode = 0.0
    t, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(files), batch):
        d = time.perf_counter()
        x = torch.stack([pil_to_tensor(decode_image(f.read_bytes()), size) for f in files[i:i + batch]])
        decode += time.perf_counter() - d
        inverter.invert(x)
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    return {"images": len(files), "seconds": round(seconds, 2), "images_per_s": round(len(files) / seconds, 2),
            "stages": {"read_decode_s": round(decode, 2), "invert_s": round(seconds - decode, 2),
                       "cpu_s": round(cpu, 2)}}


def ray_job(cfg, folder: Path, out: Path) -> dict:
    from clcae.batch import invert_to_table

    shutil.rmtree(out, ignore_errors=True)
    cpu, by_process = time.process_time(), cpu_snapshot()
    summary = invert_to_table(cfg, [str(folder)], str(out))
    spent = cpu_spent(by_process, cpu_snapshot())
    assert summary["written"] + summary["errors"] == summary["inputs"], summary  # exact accounting
    result = {k: summary[k] for k in ("inputs", "written", "errors", "seconds", "images_per_s", "stages")}
    result["stages"]["driver_cpu_s"] = round(time.process_time() - cpu, 2)  # this process: Ray Data's executor
    # every process of the session (the driver, Ray's daemons, the actors and tasks), by role: with the cores'
    # capacity (seconds x cpus) it says how much of the machine the job left idle
    result["cpu_s_by_process"] = {k: round(v, 2) for k, v in sorted(spent.items(), key=lambda kv: -kv[1])
                                  if v >= 0.05}
    result["cpu_s"] = round(sum(spent.values()), 2)
    return result


def spread(values: list[float | None], digits: int = 3) -> dict:
    """Median [min, max] over rounds; None (a round whose 2N run was not slower than its N run, so it has no
    margin) is listed but left out of the statistics."""
    known = [v for v in values if v is not None]
    stats = {"median": round(statistics.median(known), digits), "min": round(min(known), digits),
             "max": round(max(known), digits)} if known else {"median": None, "min": None, "max": None}
    return {**stats, "rounds": [None if v is None else round(v, digits) for v in values]}


def margin(extra: float, seconds: float, seconds_2x: float) -> float | None:
    """``extra`` over the extra seconds the 2N run took (None when it took none)."""
    return extra / (seconds_2x - seconds) if seconds_2x > seconds else None


def summarise(runs: dict[str, list[dict]], actors: list[int], images: int) -> dict:
    """Per case: seconds and images/s as median [min, max]; per ray case the median of each stage; per-round
    ratios against the plain loop of the same round."""
    cases = {}
    for name, results in runs.items():
        case = {"seconds": spread([r["seconds"] for r in results], 2),
                "images_per_s": spread([r["images"] / r["seconds"] if "images" in r else r["images_per_s"]
                                        for r in results], 2)}
        if "stages" in results[0]:
            case["stages"] = {k: round(statistics.median(r["stages"][k] for r in results), 2)
                              for k in results[0]["stages"] if all(r["stages"][k] is not None for r in results)}
        if "cpu_s_by_process" in results[0]:
            roles = {k for r in results for k in r["cpu_s_by_process"]}
            case["cpu_s"] = round(statistics.median(r["cpu_s"] for r in results), 2)
            case["cpu_s_by_process"] = dict(sorted(
                ((k, round(statistics.median(r["cpu_s_by_process"].get(k, 0.0) for r in results), 2)) for k in roles),
                key=lambda kv: -kv[1]))
        cases[name] = case
    plain, plain2 = ([r["seconds"] for r in runs[n]] for n in ("plain", "plain_2x"))
    ratios, marginal = {}, {"plain": spread([margin(images, a, b) for a, b in zip(plain, plain2)], 2)}
    for n in actors:
        ray, ray2 = ([r["seconds"] for r in runs[c]] for c in (f"ray_{n}a", f"ray_{n}a_2x"))
        ratios[f"ray_{n}a_over_plain_end_to_end"] = spread([p / r for p, r in zip(plain, ray)])
        ratios[f"ray_{n}a_over_plain_end_to_end_2x"] = spread([p / r for p, r in zip(plain2, ray2)])
        ratios[f"ray_{n}a_over_plain_marginal"] = spread([margin(p2 - p, r, r2) if p2 > p else None
                                                          for p, p2, r, r2 in zip(plain, plain2, ray, ray2)])
        marginal[f"ray_{n}a"] = spread([margin(images, a, b) for a, b in zip(ray, ray2)], 2)
    return {"cases": cases, "marginal_images_per_s": marginal, "ratios": ratios}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=config_file, default=default_config("tiny"))
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=96, help="side of the generated input files")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each runs every case once)")
    parser.add_argument("--warmup-images", type=int, default=32, help="an untimed first job (0: none)")
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
                    "cpus": os.cpu_count(), "config": args.config, "batch": args.batch, "images": args.images,
                    "image_size": args.image_size, "input_size": base.encoder.input_size, "rounds": args.rounds,
                    "overrides": args.overrides}
    try:
        # Two input sizes: the marginal rate (extra images / extra seconds) removes fixed start-up costs
        # (actor start, model build, first-batch scheduling) that a job over millions of images amortises.
        write_images(work / "in", args.images, args.image_size)
        write_images(work / "in2", 2 * args.images, args.image_size)
        t = time.perf_counter()
        # the local cluster jobs/invert.py starts (clcae.train.runtime.init_ray): workers at the user's priority
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, _system_config=LOCAL_SYSTEM_CONFIG)
        report["ray_start_s"] = round(time.perf_counter() - t, 2)
        configs = {n: load_config(args.config, [f"infer.batch_size={args.batch}", f"infer.actors={n}",
                                                *args.overrides]) for n in args.actors}
        if args.warmup_images:
            write_images(work / "warm", args.warmup_images, args.image_size)
            report["warmup_job"] = ray_job(configs[args.actors[0]], work / "warm", work / "warm_out")
        inverter = plain_inverter(base, args.batch)
        cases = {"plain": lambda: plain_loop(inverter, work / "in", args.batch),
                 "plain_2x": lambda: plain_loop(inverter, work / "in2", args.batch)}
        for n in args.actors:
            cases[f"ray_{n}a"] = functools.partial(ray_job, configs[n], work / "in", work / f"out{n}")
            cases[f"ray_{n}a_2x"] = functools.partial(ray_job, configs[n], work / "in2", work / f"out{n}x2")
        names = list(cases)
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order every round
                runs[name].append(cases[name]())
                print(f"round {r + 1}/{args.rounds} {name}: {runs[name][-1]['seconds']} s "
                      f"{json.dumps(runs[name][-1].get('stages', {}))}", file=sys.stderr)
        report.update(summarise(runs, args.actors, args.images))
        e2e, gain = (report["ratios"][f"ray_{args.actors[0]}a_over_plain_{k}"]["median"]
                       for k in ("end_to_end", "marginal"))
        report["target"] = {"end_to_end_at_least_1.0": e2e is not None and e2e >= 1.0,
                            "marginal_at_least_1.3": gain is not None and gain >= 1.3}
        ray.shutdown()
        if args.memory_images:
            h, w = base.encoder.input_size
            store = args.object_store_mb * 2**20
            write_images(work / "mem", args.memory_images, max(h, w))
            ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, object_store_memory=store,
                     _system_config=LOCAL_SYSTEM_CONFIG)
            with PeakMemory() as mem:
                result = ray_job(base, work / "mem", work / "mem_out")
            ray.shutdown()
            decoded = args.memory_images * h * w * 3
            report["memory"] = {"object_store_bytes": store, "decoded_pixels_bytes": decoded,
                                "pixels_over_store": round(decoded / store, 2), "peak_pss_bytes": mem.peak,
                                "peak_pss_gib": round(mem.peak / 2**30, 3), "job": result}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
