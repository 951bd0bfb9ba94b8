"""Serve load: throughput and latency of POST /v1/invert?format=png with and without dynamic batching.

Starts a local Ray and the Serve app (clcae/serving.py) itself, on 127.0.0.1 only, then for two settings in one
run -- ``batched`` (serve.max_batch_size=8) and ``unbatched`` (serve.max_batch_size=1), the same replicas
(min = max = --replicas, so autoscaling cannot differ between them) -- deploys the app afresh, sends a few
untimed warm-up requests, then N requests (--requests) from C concurrent clients (--concurrency, httpx async)
and records throughput (successful requests / wall seconds), p50/p99 latency and the status codes; then one
untimed burst of JSON requests shows the batch sizes the model saw.  Each setting stops after --max-seconds
even if requests are left; the JSON says how many were sent.

    python bench/serve_load.py                                   # tiny config, 200 requests, concurrency 16
    python bench/serve_load.py --requests 60 --concurrency 8
    python bench/serve_load.py --config configs/ffhq.yaml --checkpoint runs/x/checkpoint.pt serve.cpus_per_replica=2

Prints JSON: both settings, ``ratios`` (throughput batched/unbatched, p99 batched/unbatched), machine info (load
average before and after each setting) and notes.  A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clcae.cli_args import config_file, default_config, parse_with_overrides  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

HOST = "127.0.0.1"  # loopback only: the bench never sends traffic anywhere else
APP_NAME = "clcae-bench"
SETTINGS = {"batched": 8, "unbatched": 1}  # serve.max_batch_size


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def test_image(size: int) -> bytes:
    """A fixed PNG (gradient plus seeded noise): every request sends the same bytes."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], -1)
    rgb = (rgb + np.random.default_rng(0).integers(-20, 21, rgb.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


async def load(url: str, image: bytes, requests: int, concurrency: int, max_seconds: float,
               api_key: str | None) -> dict[str, Any]:
    """``requests`` POSTs from ``concurrency`` workers, none started after ``max_seconds``; in-flight ones are
    cut at the deadline too (counted as ``cut_at_deadline``)."""
    import httpx

    headers = {"content-type": "image/png", **({"x-api-key": api_key} if api_key else {})}
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    issued = 0
    start = time.perf_counter()
    deadline = start + max_seconds
    last_done = start

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal issued, last_done
        while issued < requests and time.perf_counter() < deadline:
            issued += 1
            t0 = time.perf_counter()
            try:
                resp = await asyncio.wait_for(client.post(url, content=image, headers=headers, timeout=None),
                                              timeout=max(0.01, deadline - t0))
            except asyncio.TimeoutError:
                statuses["cut_at_deadline"] += 1
                continue
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1
                continue
            t1 = time.perf_counter()
            statuses[str(resp.status_code)] += 1
            if resp.status_code == 200 and resp.content[:8] == b"\x89PNG\r\n\x1a\n":
                latencies.append(t1 - t0)
                last_done = t1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, trust_env=False) as client:  # trust_env: no proxy for loopback
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    wall = max(last_done - start, 1e-9)
    ok = len(latencies)
    return {
        "requests_sent": issued,
        "ok": ok,
        "statuses": dict(sorted(statuses.items())),
        "wall_s": round(wall, 3),
        "hit_max_seconds": issued < requests or time.perf_counter() >= deadline,
        "throughput_rps": round(ok / wall, 3) if ok else 0.0,
        "latency_ms": {
            "p50": _ms(percentile(latencies, 50)),
            "p90": _ms(percentile(latencies, 90)),
            "p99": _ms(percentile(latencies, 99)),
            "mean": _ms(statistics.fmean(latencies) if latencies else None),
            "min": _ms(min(latencies, default=None)),
            "max": _ms(max(latencies, default=None)),
        },
    }


async def batch_probe(url: str, image: bytes, concurrency: int, api_key: str | None) -> dict[str, Any]:
    """One untimed burst of ``concurrency`` JSON inversions after the timed part: the PNG answer does not say
    how many images shared a model call, the JSON answer's ``batch_size`` does."""
    import httpx

    headers = {"content-type": "image/png", **({"x-api-key": api_key} if api_key else {})}
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, trust_env=False, timeout=60) as client:
        answers = await asyncio.gather(*(client.post(url, content=image, headers=headers)
                                         for _ in range(concurrency)), return_exceptions=True)
    sizes = Counter(a.json().get("batch_size") for a in answers
                    if isinstance(a, httpx.Response) and a.status_code == 200)
    return {"requests": concurrency, "batch_sizes": {str(k): v for k, v in sorted(sizes.items(), key=str)}}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def machine() -> dict[str, Any]:
    import ray
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "ray": ray.__version__,
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().split()
        info["memory_gib"] = round(int(mem[mem.index("MemTotal:") + 1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return info


def loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def run_setting(name: str, cfg, args: argparse.Namespace, image: bytes) -> dict[str, Any]:
    from ray import serve

    from clcae.serving import start

    load_before = loadavg()
    t0 = time.perf_counter()
    start(cfg, "", name=APP_NAME)  # blocks until every replica is up
    deploy_s = time.perf_counter() - t0
    url = f"http://{HOST}:{cfg.serve.port}/v1/invert?format=png"
    key = cfg.serve.api_key or os.environ.get("CLCAE_API_KEY")
    try:
        # Untimed warm-up: the first model calls are slow (allocations, lazy init) in both settings alike.
        warm = (asyncio.run(load(url, image, args.warmup, min(args.warmup, args.concurrency), args.max_seconds, key))
                if args.warmup else {"requests_sent": 0, "ok": 0, "statuses": {}})
        result = asyncio.run(load(url, image, args.requests, args.concurrency, args.max_seconds, key))
        probe = asyncio.run(batch_probe(url.replace("format=png", "format=json"), image, args.concurrency, key))
    finally:
        serve.delete(APP_NAME)  # the next setting gets fresh replicas
    return {
        "serve.max_batch_size": cfg.serve.max_batch_size,
        **result,
        "batch_probe": probe,
        "warmup": {"requests": warm["requests_sent"], "ok": warm["ok"], "statuses": warm["statuses"]},
        "deploy_s": round(deploy_s, 2),
        "load_average_before": load_before,
        "load_average_after": loadavg(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=config_file, default=default_config("tiny"))
    p.add_argument("--model", "--checkpoint", dest="model", default=None, help="the model to serve (serve.model)")
    p.add_argument("--requests", type=int, default=200, help="timed requests per setting")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent clients")
    p.add_argument("--max-seconds", type=float, default=120.0, help="hard cap per setting (timed part)")
    p.add_argument("--warmup", type=int, default=8, help="untimed requests per setting before timing")
    p.add_argument("--replicas", type=int, default=1, help="model replicas per deployment (min = max)")
    p.add_argument("--image-size", type=int, default=128, help="side of the uploaded PNG")
    p.add_argument("--ray-cpus", type=int, default=None,
                   help="logical CPUs for the local Ray (default max(4, 2*cores))")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. serve.cpus_per_replica=2)")
    args = parse_with_overrides(p, argv)
    for name in ("requests", "concurrency", "replicas", "image_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.max_seconds <= 0:
        p.error("--warmup must be >= 0 and --max-seconds > 0")
    if any(o.split("=", 1)[0] in ("serve.host", "serve.max_batch_size") for o in args.overrides):
        p.error("serve.host is always 127.0.0.1 and serve.max_batch_size is what the bench varies: "
                "do not override them")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray
    from ray import serve

    from clcae.config import load_config

    base = list(args.overrides) + (["serve.model=" + args.model] if args.model else [])
    port = free_port()
    # Fixed replica count (no autoscaling difference between settings); queues deep enough that the
    # offered load is queued, not refused, unless the user overrides them.
    fixed = [f"serve.min_replicas={args.replicas}", f"serve.max_replicas={args.replicas}",
             f"serve.host={HOST}", f"serve.port={port}"]
    defaults = [f"serve.max_ongoing_requests={max(16, args.concurrency)}",
                f"serve.max_queued_requests={max(32, 2 * args.concurrency)}"]
    defaults = [d for d in defaults if d.split("=")[0] not in {o.split("=")[0] for o in base}]
    configs = {name: load_config(args.config, defaults + base + fixed + [f"serve.max_batch_size={bs}"])
               for name, bs in SETTINGS.items()}
    image = test_image(args.image_size)

    report: dict[str, Any] = {
        "benchmark": "bench/serve_load.py",
        "endpoint": "POST /v1/invert?format=png (raw PNG body)",
        "config": args.config, "model": args.model, "overrides": args.overrides,
        "requests": args.requests, "concurrency": args.concurrency, "max_seconds": args.max_seconds,
        "warmup": args.warmup, "replicas": args.replicas, "image": f"{args.image_size}x{args.image_size} PNG, "
                                                                       f"{len(image):,} bytes",
        "serve": {k: getattr(configs["batched"].serve, k) for k in (
            "cpus_per_replica", "batch_wait_timeout_s", "max_ongoing_requests", "max_queued_requests", "use_gpu")},
        "machine": {**machine(), "load_average_at_start": loadavg()},
        "settings": {},
    }
    ray.init(address="local", num_cpus=args.ray_cpus or max(4, 2 * (os.cpu_count() or 2)), include_dashboard=False,
             log_to_driver=False)
    try:
        for name, cfg in configs.items():
            print(f"[serve_load] {name}: serve.max_batch_size={cfg.serve.max_batch_size}, {args.requests} requests, "
                  f"concurrency {args.concurrency}", file=sys.stderr, flush=True)
            report["settings"][name] = run_setting(name, cfg, args, image)
    finally:
        serve.shutdown()
        ray.shutdown()

    b, u = report["settings"]["batched"], report["settings"]["unbatched"]
    p99_b, p99_u = b["latency_ms"]["p99"], u["latency_ms"]["p99"]
    report["ratios"] = {
        "throughput_batched_over_unbatched": round(b["throughput_rps"] / u["throughput_rps"], 3)
        if u["throughput_rps"] else None,
        "p99_batched_over_unbatched": round(p99_b / p99_u, 3) if p99_b and p99_u else None,
    }
    report["machine"]["load_average_at_end"] = loadavg()
    report["notes"] = notes(report, args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def notes(report: dict[str, Any], args: argparse.Namespace) -> list[str]:
    out = [
        "Throughput = successful requests / seconds from the first request to the last success; latency is per "
        "request at the client, including HTTP, decoding, queueing, the model call and PNG encoding.",
        "Settings run one after the other in one process on one machine: compare the ratios, not absolute figures "
        "across machines. Background load moves them; load_average_before/after shows how busy the machine was.",
        "batch_probe: one burst of `concurrency` JSON requests after the timed part; batch_sizes counts requests "
        "by the size of the model call they were part of (all 1 without batching).",
        "A local Ray runs the Api, InvertModel, EditModel replicas, Serve's proxy and controller, and the client on "
        "the same cores: with few cores the client and the ingress compete with the model for CPU.",
    ]
    if args.requests < 100:
        out.append(f"Only {args.requests} requests per setting: p99 is close to the maximum latency.")
    load = report["machine"]["load_average_at_start"]
    cores = report["machine"]["cpu_count"] or 1
    if load and load[0] > 0.5 * cores:
        out.append(f"The machine was busy at the start (1-min load {load[0]} on {cores} cores): figures are noisy.")
    for name, s in report["settings"].items():
        if s["hit_max_seconds"]:
            out.append(f"{name}: stopped at --max-seconds ({args.max_seconds:g} s) after {s['requests_sent']} of "
                       f"{args.requests} requests.")
        bad = {k: v for k, v in s["statuses"].items() if k != "200"}
        if bad:
            out.append(f"{name}: non-200 answers {bad} (503 = queue full: raise serve.max_queued_requests).")
    return out


if __name__ == "__main__":
    sys.exit(main())
