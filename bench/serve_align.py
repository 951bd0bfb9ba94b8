"""Serve with align=true: what alignment costs per request, and that it stays off the ingress's event loop.

Starts a local Ray and the Serve app (tiny config, random weights) on 127.0.0.1, then, sequentially after
warm-up, for each photo -- scikit-image's astronaut (512x512 PNG) and the same portrait upscaled to a 12 MP JPEG
(4000x3000, the face then ~1400 px wide) -- times R requests (--repeats) of POST /v1/invert (JSON) with and without
``align=true``, and /v1/edit with align (JSON, whole photo as PNG and as JPEG).  ``align_ms`` is the server's
own time for detection + crop (``align.align_ms`` in the response).  Then C concurrent align requests on the 12 MP
photo with /healthz probed meanwhile: its latency shows whether alignment blocks the event loop.

    python bench/serve_align.py --out bench/results/serve_align_cpu.json

Prints JSON (medians in ms, load average before and after).  A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SMILE = '[{"direction": "smile", "strength": 3}]'


def photos() -> dict[str, bytes]:
    from PIL import Image
    from skimage import data

    im = Image.fromarray(data.astronaut())
    small, big = io.BytesIO(), io.BytesIO()
    im.save(small, format="PNG")
    canvas = Image.new("RGB", (4000, 3000), (120, 120, 120))
    canvas.paste(im.resize((2800, 2800), Image.Resampling.BICUBIC), (600, 100))
    canvas.save(big, format="JPEG", quality=90)
    return {"astronaut_512_png": small.getvalue(), "portrait_12mp_jpeg": big.getvalue()}


def timed(client, url: str, repeats: int, **kw) -> dict:
    times, server = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        r = client.post(url, **kw)
        times.append((time.perf_counter() - t) * 1000)
        assert r.status_code == 200, r.text[:300]
        if r.headers["content-type"] == "application/json" and "align" in r.json():
            server.append(r.json()["align"]["align_ms"])
    out = {"median_ms": round(statistics.median(times), 1), "min_ms": round(min(times), 1)}
    if server:
        out["align_ms_median"] = round(statistics.median(server), 1)
    return out


async def healthz_under_load(base: str, data: bytes, concurrent: int) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=300) as client:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        uploads = [asyncio.create_task(client.post(f"{base}/v1/invert?align=true", content=data))
                   for _ in range(concurrent)]
        await asyncio.sleep(0.3)
        probes = []
        while not all(u.done() for u in uploads):
            t = loop.time()
            await client.get(f"{base}/healthz")
            probes.append((loop.time() - t) * 1000)
            await asyncio.sleep(0.1)
        codes = [u.result().status_code for u in uploads]
        return {"concurrent": concurrent, "wall_s": round(loop.time() - t0, 2), "codes": codes,
                "healthz_probes": len(probes), "healthz_max_ms": round(max(probes), 1) if probes else None,
                "healthz_median_ms": round(statistics.median(probes), 1) if probes else None}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed requests per photo and endpoint")
    p.add_argument("--concurrent", type=int, default=4, help="concurrent 12 MP align requests in the /healthz probe")
    p.add_argument("--out", default=None, help="also write the JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    import httpx
    import ray
    import torch
    from ray import serve

    from clcae.config import load_config
    from clcae.editing import save_interfacegan
    from clcae.serving import start

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = Path("/tmp/clcae_serve_align_bench")
    d.mkdir(exist_ok=True)
    save_interfacegan(torch.nn.functional.normalize(torch.randn(1, 64), dim=1), d / "smile.pt")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"serve.port={port}", "serve.cpus_per_replica=0.5", "serve.max_replicas=1", "serve.max_body_mb=20",
        "directions.smile.kind=interfacegan", f"directions.smile.path={d / 'smile.pt'}"])
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir="/tmp/ray_sab")
    result: dict = {"load_before": os.getloadavg(), "cpus": os.cpu_count(), "results": {}}
    try:
        start(cfg, "")
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=300) as client:
            for name, data in photos().items():
                for _ in range(2):  # warm-up: the first align request may still wait for the detector's build
                    client.post(f"{base}/v1/invert?align=true", content=data)
                files = {"image": ("photo", data)}
                result["results"][name] = {
                    "bytes": len(data),
                    "invert_no_align": timed(client, f"{base}/v1/invert", args.repeats, content=data),
                    "invert_align": timed(client, f"{base}/v1/invert?align=true", args.repeats, content=data),
                    "edit_align_json_png": timed(client, f"{base}/v1/edit", args.repeats, files=files,
                                                 data={"align": "true", "edits": SMILE, "format": "json"}),
                    "edit_align_json_jpeg": timed(client, f"{base}/v1/edit", args.repeats, files=files,
                                                  data={"align": "true", "edits": SMILE, "format": "json",
                                                        "photo_format": "jpeg"}),
                }
        big = photos()["portrait_12mp_jpeg"]
        result["healthz_while_aligning_12mp"] = asyncio.run(healthz_under_load(base, big, args.concurrent))
    finally:
        serve.shutdown()
        ray.shutdown()
    result["load_after"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
