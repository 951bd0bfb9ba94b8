"""Serve load: throughput and latency with and without dynamic batching, and where a request's time goes.

Starts a local Ray and the Serve app (clcae/serving.py) itself, on 127.0.0.1 only, as two applications side by
side -- ``batched`` (serve.max_batch_size=8) and ``unbatched`` (serve.max_batch_size=1), the same replicas (min =
max = --replicas, so autoscaling cannot differ) -- sends a few untimed warm-up requests to each, then --rounds
rounds, each one load of N requests (--requests) from C concurrent clients (--concurrency, httpx async) to each
application in turn (the order alternates from round to round, so background load on a shared machine falls on
both alike).  Per load: throughput (successful requests / wall seconds), p50/p99 latency and the status codes;
per setting the median and spread (min, max) over rounds; per round the batched/unbatched ratios.  The endpoint
is ``POST /v1/invert?format=png`` (raw PNG body), or with ``--endpoint edit`` ``POST /v1/edit`` of an uploaded
image (multipart: image + one InterFaceGAN edit, a random direction the bench writes).  After the rounds, one
untimed burst of JSON inversions per setting shows the batch sizes the model saw.  Each load stops after
--max-seconds even if requests are left; the JSON says how many were sent.

Per-request breakdown: the ingress answers with a ``Server-Timing`` header (clcae.serving.Stages): its own stages
(read the body, decode, PNG encode, ...), the replica's (queue: waiting for a batch; model: the batch's model
call; post: outputs made ready to send) and ``handle`` (the rest of a model call's round trip: routing,
serialisation, transport).  ``http`` = the client's latency - the ingress's total (the client, HTTP, Serve's proxy
and the proxy -> ingress hop).  Means over every timed request (they add up to the mean latency) and medians.

    python bench/serve_load.py                                   # tiny config, 3 rounds of 200 requests, concurrency 16
    python bench/serve_load.py --requests 60 --concurrency 8 --rounds 5
    python bench/serve_load.py --endpoint edit --requests 100
    python bench/serve_load.py --config configs/ffhq.yaml --checkpoint runs/x/checkpoint.pt serve.cpus_per_replica=2

Prints JSON: both settings, ``ratios`` (throughput batched/unbatched, p99 batched/unbatched: per round, median and
spread), machine info (load average per load) and notes.  A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.memory import cpu_snapshot, cpu_spent  # noqa: E402
from clcae.cli_args import config_file, default_config, parse_with_overrides  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

HOST = "127.0.0.1"  # loopback only: the bench never sends traffic anywhere else
APP_NAME = "clcae-bench"
SETTINGS = {"batched": 8, "unbatched": 1}  # serve.max_batch_size
EDITS = '[{"direction": "bench", "strength": 2.0}]'


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


def server_timing(header: str | None) -> dict[str, float]:
    """``Server-Timing: read;dur=0.31, decode;dur=1.20, ...`` -> {stage: ms}."""
    out: dict[str, float] = {}
    for part in (header or "").split(","):
        name, _, rest = part.strip().partition(";dur=")
        try:
            out[name] = float(rest)
        except ValueError:
            continue
    return out


class Request:
    """What one load sends: the invert endpoint's raw PNG, or the edit endpoint's multipart form."""

    def __init__(self, url: str, image: bytes, endpoint: str, api_key: str | None):
        self.url, self.image, self.endpoint = url, image, endpoint
        self.headers = {"x-api-key": api_key} if api_key else {}

    def send(self, client, url: str | None = None, **params: str):
        url = url or self.url
        if params:  # (httpx's params= replaces the URL's query string, even when empty)
            url = url.split("?")[0] + "?" + "&".join(f"{k}={v}" for k, v in params.items())
        if self.endpoint == "edit":
            return client.post(url, files={"image": ("bench.png", self.image, "image/png")},
                               data={"edits": EDITS}, headers=self.headers, timeout=None)
        return client.post(url, content=self.image, headers={"content-type": "image/png", **self.headers},
                           timeout=None)


async def load(req: Request, requests: int, concurrency: int, max_seconds: float) -> dict[str, Any]:
    """``requests`` POSTs from ``concurrency`` workers, none started after ``max_seconds``; in-flight ones are
    cut at the deadline too (counted as ``cut_at_deadline``)."""
    import httpx

    latencies: list[float] = []
    stages: list[dict[str, float]] = []
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
                resp = await asyncio.wait_for(req.send(client), timeout=max(0.01, deadline - t0))
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
                timing = server_timing(resp.headers.get("server-timing"))
                if "total" in timing:
                    timing["http"] = max(0.0, (t1 - t0) * 1000 - timing["total"])
                stages.append(timing)

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
        "_stages": stages,
    }


async def batch_probe(req: Request, concurrency: int) -> dict[str, Any]:
    """One untimed burst of ``concurrency`` JSON requests after the timed part: the PNG answer does not say how
    many images shared a model call, the JSON answer of /v1/invert does (``batch_size``)."""
    import httpx

    url = req.url.replace("/v1/edit", "/v1/invert").split("?")[0]
    probe = Request(url, req.image, "invert", req.headers.get("x-api-key"))
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, trust_env=False, timeout=60) as client:
        answers = await asyncio.gather(*(probe.send(client, format="json") for _ in range(concurrency)),
                                       return_exceptions=True)
    sizes = Counter(a.json().get("batch_size") for a in answers
                    if isinstance(a, httpx.Response) and a.status_code == 200)
    return {"requests": concurrency, "batch_sizes": {str(k): v for k, v in sorted(sizes.items(), key=str)}}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def spread(values: list[float | None], digits: int = 3) -> dict[str, Any]:
    v = [x for x in values if x is not None]
    if not v:
        return {"median": None, "min": None, "max": None, "all": values}
    return {"median": round(statistics.median(v), digits), "min": round(min(v), digits),
            "max": round(max(v), digits), "all": [None if x is None else round(x, digits) for x in values]}


def breakdown(stages: list[dict[str, float]]) -> dict[str, Any]:
    """Per-stage mean (a request that skipped a stage counts 0 there, so means add up to the mean latency) and
    median over every timed request of a setting."""
    names: list[str] = []
    for s in stages:
        names += [k for k in s if k not in names]
    order = ["http", *[n for n in names if n not in ("http", "total")], "total"]
    n = max(len(stages), 1)
    mean = {k: round(sum(s.get(k, 0.0) for s in stages) / n, 2) for k in order if k in names}
    median = {k: round(statistics.median(s.get(k, 0.0) for s in stages), 2) for k in order if k in names}
    return {"requests": len(stages), "mean_ms": mean, "median_ms": median}


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


def deploy(configs: dict[str, Any]) -> dict[str, float]:
    """Both settings as applications side by side (route prefix /<setting>), on one HTTP port."""
    from ray import serve

    from clcae.serving import build

    port = next(iter(configs.values())).serve.port
    serve.start(http_options={"host": HOST, "port": port})
    seconds = {}
    for name, cfg in configs.items():
        t0 = time.perf_counter()
        serve.run(build(cfg, ""), name=f"{APP_NAME}-{name}", route_prefix=f"/{name}")  # waits for every replica
        seconds[name] = round(time.perf_counter() - t0, 2)
    return seconds


def run_rounds(configs: dict[str, Any], args: argparse.Namespace, image: bytes) -> dict[str, Any]:
    port = next(iter(configs.values())).serve.port
    path = "/v1/edit?format=png" if args.endpoint == "edit" else "/v1/invert?format=png"
    key = next(iter(configs.values())).serve.api_key or os.environ.get("CLCAE_API_KEY")
    reqs = {name: Request(f"http://{HOST}:{port}/{name}{path}", image, args.endpoint, key) for name in configs}
    out: dict[str, Any] = {name: {"warmup": None, "rounds": [], "_stages": [], "_cpu": {}, "_ok": 0}
                           for name in configs}
    for name, req in reqs.items():  # untimed: the first model calls are slow (allocations, lazy init)
        if args.warmup:
            warm = asyncio.run(load(req, args.warmup, min(args.warmup, args.concurrency), args.max_seconds))
            out[name]["warmup"] = {"requests": warm["requests_sent"], "ok": warm["ok"], "statuses": warm["statuses"]}
    names = list(configs)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            print(f"[serve_load] round {r + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
            before, cpu = loadavg(), cpu_snapshot()
            result = asyncio.run(load(reqs[name], args.requests, args.concurrency, args.max_seconds))
            for role, seconds in cpu_spent(cpu, cpu_snapshot()).items():
                out[name]["_cpu"][role] = out[name]["_cpu"].get(role, 0.0) + seconds
            out[name]["_ok"] += result["ok"]
            out[name]["_stages"] += result.pop("_stages")
            out[name]["rounds"].append({"round": r + 1, **result, "load_average_before": before,
                                        "load_average_after": loadavg()})
    for name, req in reqs.items():
        out[name]["batch_probe"] = asyncio.run(batch_probe(req, args.concurrency))
    return out


def summarise(setting: dict[str, Any]) -> dict[str, Any]:
    rounds = setting["rounds"]
    return {
        "throughput_rps": spread([r["throughput_rps"] for r in rounds]),
        "p50_ms": spread([r["latency_ms"]["p50"] for r in rounds], 1),
        "p99_ms": spread([r["latency_ms"]["p99"] for r in rounds], 1),
        "breakdown": breakdown(setting.pop("_stages")),
        "cpu_ms_per_request": cpu_per_request(setting.pop("_cpu"), setting.pop("_ok")),
        **setting,
    }


def cpu_per_request(cpu: dict[str, float], ok: int) -> dict[str, float]:
    """CPU milliseconds per successful request, by process (Serve's proxy, the ingress and model replicas, the
    load client = this process, Ray's own daemons), over the timed loads; both applications' replicas run all
    along, so the idle one's polling shows too."""
    per = {title: round(1000 * seconds / max(ok, 1), 2) for title, seconds in cpu.items() if seconds > 0.005}
    per = dict(sorted(per.items(), key=lambda kv: -kv[1]))
    return {"total": round(sum(per.values()), 2), **per}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=config_file, default=default_config("tiny"))
    p.add_argument("--model", "--checkpoint", dest="model", default=None, help="the model to serve (serve.model)")
    p.add_argument("--endpoint", choices=("invert", "edit"), default="invert",
                   help="POST /v1/invert (raw PNG) or /v1/edit (multipart: the image and one edit)")
    p.add_argument("--requests", type=int, default=200, help="timed requests per setting and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every setting once, order alternating")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent clients")
    p.add_argument("--max-seconds", type=float, default=120.0, help="hard cap per load (timed part)")
    p.add_argument("--warmup", type=int, default=16, help="untimed requests per setting before the rounds")
    p.add_argument("--replicas", type=int, default=1, help="model replicas per deployment (min = max)")
    p.add_argument("--image-size", type=int, default=128, help="side of the uploaded PNG")
    p.add_argument("--ray-cpus", type=int, default=None,
                   help="logical CPUs for the local Ray (default: max(4, 2*cores, what both settings ask))")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. serve.cpus_per_replica=2)")
    args = parse_with_overrides(p, argv)
    for name in ("requests", "rounds", "concurrency", "replicas", "image_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.max_seconds <= 0:
        p.error("--warmup must be >= 0 and --max-seconds > 0")
    if any(o.split("=", 1)[0] in ("serve.host", "serve.max_batch_size") for o in args.overrides):
        p.error("serve.host is always 127.0.0.1 and serve.max_batch_size is what the bench varies: "
                "do not override them")
    return args


def edit_direction(config: str, folder: str) -> list[str]:
    """Overrides adding a random InterFaceGAN direction "bench" (seeded) for --endpoint edit."""
    import torch

    from clcae.config import load_config
    from clcae.editing import save_interfacegan

    dim = load_config(config).generator.style_dim
    path = Path(folder) / "bench.pt"
    save_interfacegan(torch.nn.functional.normalize(torch.randn(1, dim, generator=torch.Generator().manual_seed(0)),
                                                    dim=1), path)
    return ["directions.bench.kind=interfacegan", f"directions.bench.path={path}", "directions.bench.max_strength=5"]


def bench_configs(args: argparse.Namespace, port: int, folder: str) -> dict[str, Any]:
    """The two applications' configs (SETTINGS), from the command line's config and overrides."""
    from clcae.config import load_config

    base = list(args.overrides) + (["serve.model=" + args.model] if args.model else [])
    # Fixed replica count (no autoscaling difference between settings); queues deep enough that the
    # offered load is queued, not refused, unless the user overrides them.
    fixed = [f"serve.min_replicas={args.replicas}", f"serve.max_replicas={args.replicas}",
             f"serve.host={HOST}", f"serve.port={port}"]
    # With serve.use_gpu, both applications' model replicas (2 deployments each) share one GPU.
    gpu_share = math.floor(1e4 / (len(SETTINGS) * 2 * args.replicas)) / 1e4
    defaults = [f"serve.max_ongoing_requests={max(16, args.concurrency)}",
                f"serve.max_queued_requests={max(32, 2 * args.concurrency)}", f"serve.gpus_per_replica={gpu_share}"]
    defaults = [d for d in defaults if d.split("=")[0] not in {o.split("=")[0] for o in base}]
    if args.endpoint == "edit":
        base += edit_direction(args.config, folder)
    return {name: load_config(args.config, defaults + base + fixed + [f"serve.max_batch_size={bs}"])
            for name, bs in SETTINGS.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray
    from ray import serve

    tmp = tempfile.TemporaryDirectory(prefix="serve_load_")
    configs = bench_configs(args, free_port(), tmp.name)
    image = test_image(args.image_size)

    report: dict[str, Any] = {
        "benchmark": "bench/serve_load.py",
        "endpoint": ("POST /v1/edit?format=png (multipart: image + one edit)" if args.endpoint == "edit"
                     else "POST /v1/invert?format=png (raw PNG body)"),
        "config": args.config, "model": args.model, "overrides": args.overrides,
        "requests": args.requests, "rounds": args.rounds, "concurrency": args.concurrency,
        "max_seconds": args.max_seconds, "warmup": args.warmup, "replicas": args.replicas,
        "image": f"{args.image_size}x{args.image_size} PNG, {len(image):,} bytes",
        "serve": {k: getattr(configs["batched"].serve, k) for k in (
            "cpus_per_replica", "gpus_per_replica", "batch_wait_timeout_s", "max_ongoing_requests",
            "max_queued_requests", "use_gpu")},
        "machine": {**machine(), "load_average_at_start": loadavg()},
    }
    # Logical CPUs: both applications' replicas must fit (each: the ingress's 0.5 + two model deployments)
    need = sum(min(0.5, c.serve.cpus_per_replica) + 2 * args.replicas * c.serve.cpus_per_replica
               for c in configs.values())
    ray.init(address="local", num_cpus=args.ray_cpus or max(4, 2 * (os.cpu_count() or 2), math.ceil(need)),
             include_dashboard=False, log_to_driver=False)
    try:
        report["deploy_s"] = deploy(configs)
        settings = run_rounds(configs, args, image)
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()
    report["settings"] = {name: {"serve.max_batch_size": configs[name].serve.max_batch_size, **summarise(s)}
                          for name, s in settings.items()}
    b, u = (report["settings"][k]["rounds"] for k in ("batched", "unbatched"))
    report["ratios"] = {  # per round: the two loads of a round ran back to back
        "throughput_batched_over_unbatched": spread(
            [x["throughput_rps"] / y["throughput_rps"] if y["throughput_rps"] else None for x, y in zip(b, u)]),
        "p99_batched_over_unbatched": spread(
            [x["latency_ms"]["p99"] / y["latency_ms"]["p99"] if x["latency_ms"]["p99"] and y["latency_ms"]["p99"]
             else None for x, y in zip(b, u)]),
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
        "Both settings are deployed side by side and run alternately in one process on one machine: compare the "
        "ratios (per round, then median and spread), not absolute figures across machines. Background load moves "
        "them; load_average_before/after per load shows how busy the machine was.",
        "breakdown: from each answer's Server-Timing header; http = client latency - the ingress's total; "
        "queue/model/post are the replica's, handle the rest of the model call's round trip; model is the whole "
        "batch's model call, so a batch's requests each count it.",
        "batch_probe: one burst of `concurrency` JSON inversions after the rounds; batch_sizes counts requests "
        "by the size of the model call they were part of (all 1 without batching).",
        "A local Ray runs the Api, InvertModel, EditModel replicas of both settings, Serve's proxy and controller, "
        "and the client on the same cores: with few cores the client and the ingress compete with the model.",
    ]
    if args.requests < 100:
        out.append(f"Only {args.requests} requests per load: p99 is close to the maximum latency.")
    load = report["machine"]["load_average_at_start"]
    cores = report["machine"]["cpu_count"] or 1
    if load and load[0] > 0.5 * cores:
        out.append(f"The machine was busy at the start (1-min load {load[0]} on {cores} cores): figures are noisy.")
    for name, s in report["settings"].items():
        for r in s["rounds"]:
            if r["hit_max_seconds"]:
                out.append(f"{name}, round {r['round']}: stopped at --max-seconds ({args.max_seconds:g} s) after "
                           f"{r['requests_sent']} of {args.requests} requests.")
            bad = {k: v for k, v in r["statuses"].items() if k != "200"}
            if bad:
                out.append(f"{name}, round {r['round']}: non-200 answers {bad} (503 = queue full: raise "
                           "serve.max_queued_requests).")
    return out


if __name__ == "__main__":
    sys.exit(main())
