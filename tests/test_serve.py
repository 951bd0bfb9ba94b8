"""The Serve app over real HTTP: every endpoint, every kind of bad input, overload and recovery."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from clcae.config import load_config
from clcae.editing import save_interfacegan

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def encoded(mode: str = "RGB", fmt: str = "PNG", size=(72, 64), seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    if mode == "I;16":
        im = Image.fromarray(np.full(size[::-1], 30000, np.uint16))
    elif mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def forged_png(width: int, height: int) -> bytes:
    data = bytearray(encoded(size=(8, 8)))
    i = data.index(b"IHDR")
    data[i + 4:i + 12] = struct.pack(">II", width, height)
    data[i + 17:i + 21] = struct.pack(">I", zlib.crc32(bytes(data[i:i + 17])))
    return bytes(data)


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    from ray import serve

    from clcae.serving import start

    d = tmp_path_factory.mktemp("dirs")
    torch.manual_seed(0)
    save_interfacegan(torch.nn.functional.normalize(torch.randn(1, 64), dim=1), d / "smile.pt")
    port = free_port()
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"serve.port={port}", "serve.cpus_per_replica=0.5", "serve.max_replicas=1", "serve.max_body_mb=1",
        "serve.max_queued_requests=4", "serve.max_ongoing_requests=8", "serve.max_batch_size=8",
        "directions.smile.kind=interfacegan", f"directions.smile.path={d / 'smile.pt'}",
        "directions.smile.max_strength=5"])
    start(cfg, "<html><body>editor</body></html>")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def test_health_readiness_openapi_and_page(server):
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    spec = httpx.get(f"{server}/openapi.json").json()
    assert {"/v1/invert", "/v1/edit", "/v1/directions"} <= set(spec["paths"])
    assert "editor" in httpx.get(f"{server}/").text


def test_directions_listing(server):
    d = httpx.get(f"{server}/v1/directions").json()
    assert d["smile"]["kind"] == "interfacegan" and d["smile"]["max_strength"] == 5.0


def test_invert_json_png_and_multipart(server):
    r = httpx.post(f"{server}/v1/invert", content=encoded(), headers={"content-type": "image/png"}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["w"]) == 64 and np.asarray(body["w_plus"]).shape == (10, 64)
    assert body["latents"]["f"]["shape"] == [32, 16, 16]
    rec = Image.open(io.BytesIO(base64.b64decode(body["reconstruction_png"])))
    assert rec.size == (64, 64)
    png = httpx.post(f"{server}/v1/invert?format=png", files={"image": ("x.jpg", encoded(fmt="JPEG"))}, timeout=60)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (64, 64)


def test_edit_from_latents_strength_zero_is_the_reconstruction(server):
    inv = httpx.post(f"{server}/v1/invert", content=encoded(seed=3), timeout=60).json()
    same = httpx.post(f"{server}/v1/edit", json={"latents": inv["latents"], "edits": [
        {"direction": "smile", "strength": 0.0}], "format": "json"}, timeout=60).json()
    assert same["image_png"] == same["reconstruction_png"]
    moved = httpx.post(f"{server}/v1/edit", json={"latents": inv["latents"], "edits": [
        {"direction": "smile", "strength": 3.0}]}, timeout=60)
    assert moved.status_code == 200 and moved.headers["content-type"] == "image/png"
    assert moved.content != base64.b64decode(same["image_png"])


def test_edit_from_an_uploaded_image(server):
    r = httpx.post(f"{server}/v1/edit", files={"image": ("a.png", encoded())},
                   data={"edits": '[{"direction": "smile", "strength": 2}]'}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


@pytest.mark.parametrize("mode,fmt", [("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("LA", "PNG"),
                                      ("I;16", "PNG"), ("L", "JPEG")])
def test_unusual_modes_are_converted(server, mode, fmt):
    r = httpx.post(f"{server}/v1/invert?format=png", content=encoded(mode, fmt), timeout=60)
    assert r.status_code == 200, r.text


BAD = {
    "not an image": (b"hello world, not an image", 415, "not a readable image"),
    "zero bytes": (b"", 400, "0 bytes"),
    "truncated png": (encoded()[:300], 415, "not a readable image"),
    "decompression bomb": (forged_png(20000, 20000), 400, "limit"),
    "too small": (encoded(size=(4, 4)), 400, "too small"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_images_get_4xx_with_a_reason(server, name):
    data, status, words = BAD[name]
    r = httpx.post(f"{server}/v1/invert", content=data, timeout=60)
    assert r.status_code == status and words in r.json()["error"], (r.status_code, r.text)


def test_bad_edit_requests_get_4xx_with_a_reason(server):
    inv = httpx.post(f"{server}/v1/invert", content=encoded(), timeout=60).json()
    cases = [
        ({"latents": inv["latents"], "edits": [{"direction": "smiel", "strength": 1}]}, 404, "unknown direction"),
        ({"latents": inv["latents"], "edits": [{"direction": "smile", "strength": 50}]}, 422, "out of range"),
        ({"latents": inv["latents"], "edits": [{"direction": "smile", "strength": "lots"}]}, 422, "finite number"),
        ({"latents": inv["latents"], "edits": []}, 400, "non-empty list"),
        ({"latents": {"w": [1, 2]}, "edits": [{"direction": "smile", "strength": 1}]}, 400, "missing"),
        ({"latents": {**inv["latents"], "w": [0.0] * 3}, "edits": [{"direction": "smile", "strength": 1}]}, 422,
         "shape"),
    ]
    for payload, status, words in cases:
        r = httpx.post(f"{server}/v1/edit", json=payload, timeout=60)
        assert r.status_code == status and words in r.json()["error"], (payload.get("edits"), r.text)
    r = httpx.post(f"{server}/v1/edit", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
    r = httpx.post(f"{server}/v1/invert?format=gif", content=encoded())
    assert r.status_code == 400 and "format" in r.json()["error"]


def test_body_limit_is_413(server):
    r = httpx.post(f"{server}/v1/invert", content=b"\0" * (2 * 2**20), timeout=60)
    assert r.status_code == 413 and "limit" in r.json()["error"]


def test_overload_answers_503_fast_and_recovers(server):
    """Bounded in count and time: 40 concurrent requests against a queue of 4; some get 503 at once."""
    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            async def one(i):
                t = asyncio.get_running_loop().time()
                r = await client.post(f"{server}/v1/invert?format=png", content=encoded(seed=i))
                return r.status_code, asyncio.get_running_loop().time() - t, r.headers.get("retry-after")
            return await asyncio.gather(*(one(i) for i in range(40)))

    results = asyncio.run(asyncio.wait_for(burst(), timeout=120))
    codes = [c for c, _, _ in results]
    assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) > 0
    rejected = [(t, ra) for c, t, ra in results if c == 503]
    assert all(ra is not None for _, ra in rejected)
    assert min(t for t, _ in rejected) < 5.0  # refused at once, not after waiting in a queue
    r = httpx.post(f"{server}/v1/invert?format=png", content=encoded(), timeout=60)
    assert r.status_code == 200  # recovered


def test_serve_config_yaml_is_valid_for_serve_deploy():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve" / "config.yaml").read_text()))
    app = schema.applications[0]
    assert app.import_path == "serve.app:build_app"
    assert {d.name for d in app.deployments} == {"InvertModel", "EditModel", "Api"}
    assert all(d.max_queued_requests and d.max_queued_requests > 0 for d in app.deployments)


def test_builder_reads_args_as_config_and_overrides():
    import sys

    sys.path.insert(0, str(ROOT))
    from serve.app import build_app

    app = build_app({"config": str(ROOT / "configs" / "tiny.yaml"), "serve.max_replicas": "3"})
    assert type(app).__name__ == "Application"
    from clcae.config import ConfigError

    with pytest.raises(ConfigError, match="serve.max_replicsa"):
        build_app({"serve.max_replicsa": "3"})


def test_api_key_is_required_when_configured():
    from clcae.config import ConfigError
    from clcae.serving import ApiError, check_api_key

    for given in (None, "", "wrong"):
        with pytest.raises(ApiError) as err:
            check_api_key("s3cret", given)
        assert err.value.status == 401 and "x-api-key" in err.value.message
    check_api_key("s3cret", "s3cret")
    check_api_key(None, None)  # no key configured: open, and then...
    with pytest.raises(ConfigError, match="serve.host"):  # ...only on loopback
        load_config(ROOT / "configs" / "tiny.yaml", ["serve.host=0.0.0.0"])
    load_config(ROOT / "configs" / "tiny.yaml", ["serve.host=0.0.0.0", "serve.api_key=s3cret"])



def test_api_key_from_the_environment_counts_for_the_host_check(monkeypatch):
    from clcae.config import ConfigError, serve_api_key

    monkeypatch.delenv("CLCAE_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="serve.host"):
        load_config(ROOT / "configs" / "tiny.yaml", ["serve.host=0.0.0.0"])
    monkeypatch.setenv("CLCAE_API_KEY", "from-env")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["serve.host=0.0.0.0"])
    assert serve_api_key(cfg.serve) == "from-env"
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["serve.host=0.0.0.0", "serve.api_key=from-config"])
    assert serve_api_key(cfg.serve) == "from-config"  # the config wins over the environment
    monkeypatch.setenv("CLCAE_API_KEY", "")
    assert serve_api_key(load_config(ROOT / "configs" / "tiny.yaml").serve) is None  # empty = unset
