"""The Serve app over real HTTP: every endpoint, every kind of bad input, overload and recovery."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import MODE_ZOO, ROOT, forged_png, noise_image, serve_app, serve_config
from PIL import Image

from clcae.config import load_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served_config(tmp_path_factory):
    return serve_config(tmp_path_factory.mktemp("dirs"), "serve.max_body_mb=1", "serve.max_queued_requests=4",
                        "serve.max_ongoing_requests=8", "serve.max_batch_size=8")


@pytest.fixture(scope="module")
def server(ray_cluster, served_config):
    with serve_app(served_config) as url:
        yield url


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
    r = httpx.post(f"{server}/v1/invert", content=noise_image(), headers={"content-type": "image/png"}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["w"]) == 64 and np.asarray(body["w_plus"]).shape == (10, 64)
    assert body["latents"]["f"]["shape"] == [32, 16, 16]
    rec = Image.open(io.BytesIO(base64.b64decode(body["reconstruction_png"])))
    assert rec.size == (64, 64)
    png = httpx.post(f"{server}/v1/invert?format=png", files={"image": ("x.jpg", noise_image(fmt="JPEG"))}, timeout=60)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (64, 64)
    # replies are deflated at the fastest level (3.7x less CPU than zlib's default for a 1024 image)
    assert png_deflate_level(png.content) == png_deflate_level(base64.b64decode(body["reconstruction_png"])) == 0


def png_deflate_level(data: bytes) -> int:
    """FLEVEL of the zlib header of a PNG's first IDAT chunk: 0 = fastest (levels 0-1), 2 = zlib's default (6)."""
    pos = 8
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        if data[pos + 4:pos + 8] == b"IDAT":
            return data[pos + 9] >> 6
        pos += 12 + length
    raise AssertionError("no IDAT chunk")


def test_edit_from_latents_strength_zero_is_the_reconstruction(server):
    inv = httpx.post(f"{server}/v1/invert", content=noise_image(seed=3), timeout=60).json()
    same = httpx.post(f"{server}/v1/edit", json={"latents": inv["latents"], "edits": [
        {"direction": "smile", "strength": 0.0}], "format": "json"}, timeout=60).json()
    assert same["image_png"] == same["reconstruction_png"]
    moved = httpx.post(f"{server}/v1/edit", json={"latents": inv["latents"], "edits": [
        {"direction": "smile", "strength": 3.0}]}, timeout=60)
    assert moved.status_code == 200 and moved.headers["content-type"] == "image/png"
    assert moved.content != base64.b64decode(same["image_png"])


def test_edit_from_an_uploaded_image(server):
    r = httpx.post(f"{server}/v1/edit", files={"image": ("a.png", noise_image())},
                   data={"edits": '[{"direction": "smile", "strength": 2}]'}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


def test_an_uploaded_images_edit_is_the_in_process_invert_and_edit(server, served_config):
    """One call of the invert replica, Inverter.invert_and_edit: the same code as in-process, so the HTTP edit
    and reconstruction are the in-process ones (to a uint8 level: the replica runs 1 torch thread)."""
    from clcae.data.images import decode_image, pil_to_tensor, tensor_to_pil
    from clcae.inference import Inverter

    image = noise_image(seed=5)
    r = httpx.post(f"{server}/v1/edit", files={"image": ("a.png", image)}, timeout=60,
                   data={"edits": '[{"direction": "smile", "strength": 2}]', "format": "json"})
    assert r.status_code == 200, r.text
    assert {"read", "decode", "queue", "model", "handle", "encode", "total"} <= {
        part.split(";")[0].strip() for part in r.headers["server-timing"].split(",")}
    inverter = Inverter.from_config(served_config, device="cpu")
    inversion, edited = inverter.invert_and_edit(pil_to_tensor(decode_image(image), (64, 64))[None], [("smile", 2.0)])

    def pixels(png: str) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(png))), dtype=int)

    for got, want in ((r.json()["image_png"], edited), (r.json()["reconstruction_png"], inversion.image)):
        assert np.abs(pixels(got) - np.asarray(tensor_to_pil(want)[0], dtype=int)).max() <= 1
    assert np.abs(pixels(r.json()["image_png"]) - pixels(r.json()["reconstruction_png"])).max() > 5  # it edits


@pytest.mark.parametrize("mode,fmt", MODE_ZOO)
def test_unusual_modes_are_converted(server, mode, fmt):
    r = httpx.post(f"{server}/v1/invert?format=png", content=noise_image(mode, fmt), timeout=60)
    assert r.status_code == 200, r.text


BAD = {
    "not an image": (b"hello world, not an image", 415, "not a readable image"),
    "zero bytes": (b"", 400, "0 bytes"),
    "truncated png": (noise_image()[:300], 415, "not a readable image"),
    "decompression bomb": (forged_png(20000, 20000), 400, "limit"),
    "too small": (noise_image(size=(4, 4)), 400, "too small"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_images_get_4xx_with_a_reason(server, name):
    data, status, words = BAD[name]
    r = httpx.post(f"{server}/v1/invert", content=data, timeout=60)
    assert r.status_code == status and words in r.json()["error"], (r.status_code, r.text)


def test_bad_edit_requests_get_4xx_with_a_reason(server):
    inv = httpx.post(f"{server}/v1/invert", content=noise_image(), timeout=60).json()
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
    r = httpx.post(f"{server}/v1/invert?format=gif", content=noise_image())
    assert r.status_code == 400 and "format" in r.json()["error"]


def test_body_limit_is_413(server):
    r = httpx.post(f"{server}/v1/invert", content=b"\0" * (2 * 2**20), timeout=60)
    assert r.status_code == 413 and "limit" in r.json()["error"]


def test_overload_answers_json_503_fast_and_recovers(server):
    """80 concurrent uploads against a model queue of 4 (admission limit 12): some are refused with 503 + a JSON
    {"error"} + Retry-After, and quickly; never Serve's plain-text 503.  Counts vary run to run: not asserted."""
    async def burst():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=100)) as client:
            async def one(i):
                t = asyncio.get_running_loop().time()
                r = await client.post(f"{server}/v1/invert?format=png", content=noise_image(seed=i))
                return r, asyncio.get_running_loop().time() - t
            return await asyncio.gather(*(one(i) for i in range(80)))

    results = asyncio.run(asyncio.wait_for(burst(), timeout=180))
    codes = [r.status_code for r, _ in results]
    assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) > 0, codes
    rejected = [(r, t) for r, t in results if r.status_code == 503]
    for r, _ in rejected:
        assert r.headers["content-type"] == "application/json", (r.headers, r.text)
        assert "busy" in r.json()["error"] and int(r.headers["retry-after"]) >= 1
    refused = sorted(t for _, t in rejected)
    served = sorted(t for r, t in results if r.status_code == 200)
    # refused at once, not after waiting in a queue: faster than the requests that were served (0.2-0.5 s vs
    # several seconds measured with 80 connections on 2 busy cores)
    assert refused[len(refused) // 2] < served[len(served) // 2], (refused, served)
    r = httpx.post(f"{server}/v1/invert?format=png", content=noise_image(), timeout=60)
    assert r.status_code == 200  # recovered


def slow_png(side: int = 7900) -> bytes:
    """A small file (about 200 KB) that takes about half a second to decode: ~62 Mpx of one colour."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (30, 60, 90)).save(buf, format="PNG")
    return buf.getvalue()


def test_healthz_answers_promptly_while_slow_decodes_are_in_flight(server):
    """Decoding runs off the ingress's event loop: /healthz is not queued behind six slow decodes."""
    data = slow_png()

    async def probe():
        async with httpx.AsyncClient(timeout=120) as client:
            loop = asyncio.get_running_loop()
            uploads = [asyncio.create_task(client.post(f"{server}/v1/invert?format=png", content=data))
                       for _ in range(6)]
            await asyncio.sleep(0.5)  # the uploads (200 KB each) have reached the ingress
            latencies = []
            for _ in range(4):
                t = loop.time()
                assert (await client.get(f"{server}/healthz")).status_code == 200
                latencies.append(loop.time() - t)
                await asyncio.sleep(0.05)
            in_flight = sum(not u.done() for u in uploads)
            answers = await asyncio.gather(*uploads)
            return latencies, in_flight, [a.status_code for a in answers]

    latencies, in_flight, codes = asyncio.run(asyncio.wait_for(probe(), timeout=180))
    # the proof is that /healthz answered while uploads were still decoding; the bound only catches a stall
    assert in_flight > 0, "the slow uploads finished before /healthz was probed: the test proved nothing"
    assert max(latencies) < 5.0, latencies
    assert codes == [200] * 6


def test_image_errors_name_the_upload_not_a_buffer(server):
    r = httpx.post(f"{server}/v1/invert", files={"image": ("holiday.png", b"not a png at all")}, timeout=60)
    assert r.status_code == 415 and "holiday.png" in r.json()["error"], r.text
    r = httpx.post(f"{server}/v1/invert", content=b"not a png at all", timeout=60)
    assert r.status_code == 415 and "the uploaded image" in r.json()["error"], r.text
    for body in (r.text, httpx.post(f"{server}/v1/invert", files={"image": ("x.png", b"")}, timeout=60).text):
        assert "BytesIO" not in body and " at 0x" not in body, body


# --------------------------------------------------------------------------------- malformed bodies, no 5xx
SMILE = [{"direction": "smile", "strength": 1}]


def _wire(arr: np.ndarray, dtype: str = "float32", shape=None, data=None) -> dict:
    raw = np.asarray(arr, dtype).tobytes()
    return {"dtype": dtype, "shape": list(arr.shape) if shape is None else shape,
            "data": base64.b64encode(raw).decode() if data is None else data}


def malformed_latents() -> dict[str, object]:
    """A wrong value for one latent each: wrong length, nesting, types, NaN/inf/huge, and broken wire forms."""
    shapes = {"w": (64,), "w_plus": (10, 64), "f": (32, 16, 16), "deltas": (10, 64)}
    cases: dict[str, object] = {}
    for key, shape in shapes.items():
        good = np.zeros(shape, np.float32)
        flat = good.ravel().tolist()
        cases |= {
            f"{key}-too-short": good.ravel()[:-1].tolist() if len(shape) == 1 else good[:-1].tolist(),
            f"{key}-too-long": np.zeros((shape[0] + 1, *shape[1:])).tolist(),
            f"{key}-five-numbers": [0.0] * 5,
            f"{key}-flattened": flat if len(shape) > 1 else [flat],
            f"{key}-extra-nesting": [good.tolist()],
            f"{key}-ragged": [[0.0] * 3, [0.0]],
            f"{key}-empty": [],
            f"{key}-scalar": 1.5,
            f"{key}-null": None,
            f"{key}-string": "zeros",
            f"{key}-strings": ["0.5"] * shape[-1] if len(shape) == 1 else [["0.5"] * shape[-1]] * shape[0],
            f"{key}-bools": np.zeros(shape, bool).tolist(),
            f"{key}-objects": [{"x": 1}] * shape[0],
            f"{key}-nan": np.full(shape, np.nan).tolist(),
            f"{key}-inf": np.full(shape, np.inf).tolist(),
            f"{key}-huge-float": np.full(shape, 1e39).tolist(),  # finite in JSON, inf in float32
            f"{key}-huge-int": [10**400] * shape[0],
            f"{key}-wire-wrong-shape": _wire(good.ravel()[:-1]),
            f"{key}-wire-shape-lies": _wire(good, shape=[s + 1 for s in shape]),
            f"{key}-wire-negative-shape": _wire(good, shape=[-1]),
            f"{key}-wire-huge-shape": _wire(good, shape=[10**30]),
            f"{key}-wire-shape-not-list": _wire(good, shape=7),
            f"{key}-wire-float64": _wire(good, "float64"),
            f"{key}-wire-int": _wire(good, "int32"),
            f"{key}-wire-bad-base64": _wire(good, data="%%%not base64%%%"),
            f"{key}-wire-data-number": _wire(good, data=12),
            f"{key}-wire-nan": _wire(np.full(shape, np.nan, np.float32)),
            f"{key}-wire-missing-data": {"dtype": "float32", "shape": list(shape)},
            f"{key}-wire-dtype-list": {**_wire(good), "dtype": ["float32"]},
        }
    return cases


MALFORMED_LATENTS = malformed_latents()
MALFORMED_BODIES = {
    "body-is-a-list": [1, 2, 3],
    "body-is-a-string": "edit please",
    "body-is-null": None,
    "latents-null": {"latents": None, "edits": SMILE},
    "latents-list": {"latents": [1, 2], "edits": SMILE},
    "edits-null": {"edits": None},
    "edit-direction-list": {"edits": [{"direction": ["smile"], "strength": 1}]},
    "edit-direction-object": {"edits": [{"direction": {"a": 1}, "strength": 1}]},
    "edit-strength-huge-int": {"edits": [{"direction": "smile", "strength": 10**400}]},
    "edit-strength-nan": {"edits": [{"direction": "smile", "strength": float("nan")}]},
    "edit-strength-bool": {"edits": [{"direction": "smile", "strength": True}]},
    "edits-object-huge": {"edits": {"smile": 10**400}},
    "format-object": {"edits": SMILE, "format": {"png": 1}},
}


@pytest.fixture(scope="module")
def good_latents(server) -> dict:
    r = httpx.post(f"{server}/v1/invert", content=noise_image(seed=5), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["latents"]


@pytest.mark.parametrize("case", list(MALFORMED_LATENTS) + list(MALFORMED_BODIES))
def test_malformed_edit_bodies_get_a_json_4xx_never_a_5xx(server, good_latents, case):
    if case in MALFORMED_LATENTS:
        key = case.split("-")[0]
        payload = {"latents": {**good_latents, key: MALFORMED_LATENTS[case]}, "edits": SMILE}
    else:
        payload = MALFORMED_BODIES[case]
        if isinstance(payload, dict) and "latents" not in payload:
            payload = {"latents": good_latents, **payload}
    import json

    body = json.dumps(payload)  # allow_nan: Python writes NaN / Infinity, which Python's parser accepts
    r = httpx.post(f"{server}/v1/edit", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert r.headers["content-type"] == "application/json" and r.json()["error"], r.text[:300]


def test_deeply_nested_json_is_a_400(server):
    r = httpx.post(f"{server}/v1/edit", content=b"[" * 100_000, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"], r.text[:300]


@pytest.mark.parametrize("name", ["config.yaml", "config.cluster.yaml"])
def test_serve_config_yaml_is_valid_for_serve_deploy(name):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from clcae.serving import admission_limit, ingress_limits

    schema = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve" / name).read_text()))
    app = schema.applications[0]
    assert app.import_path == "serve.app:build_app"
    assert {d.name for d in app.deployments} == {"InvertModel", "EditModel", "Api"}
    models = [d for d in app.deployments if d.name != "Api"]
    assert all(d.max_queued_requests and d.max_queued_requests > 0 for d in models)
    # The ingress's admission limit (from the builder's serve.*) matches what the model deployments can hold,
    # and Serve's own ingress limits are left to the builder, which puts them above it.
    args = dict(app.args)
    cfg = load_config(ROOT / args.pop("config"), [f"{k}={v}" for k, v in args.items()])
    held = min(d.autoscaling_config["max_replicas"] * (d.max_ongoing_requests + d.max_queued_requests)
               for d in models)
    assert admission_limit(cfg.serve) == held
    api = next(d for d in app.deployments if d.name == "Api")
    assert "max_ongoing_requests" not in api.model_fields_set and "max_queued_requests" not in api.model_fields_set
    assert ingress_limits(cfg.serve)["max_queued_requests"] > admission_limit(cfg.serve)


def test_builder_reads_args_as_config_and_overrides():
    import sys

    sys.path.insert(0, str(ROOT))
    from serve.app import build_app

    app = build_app({"config": str(ROOT / "configs" / "tiny.yaml"), "serve.max_replicas": "3"})
    ingress = app._bound_deployment  # the Api, bound to the two model deployments
    bound = [a._bound_deployment for a in ingress.init_args if hasattr(a, "_bound_deployment")]
    models = {d.name: d for d in bound}
    assert ingress.name == "Api" and set(models) == {"InvertModel", "EditModel"}
    for d in models.values():  # the override reached every model deployment's autoscaling bounds
        assert d._deployment_config.autoscaling_config.max_replicas == 3
    from clcae.config import ConfigError

    with pytest.raises(ConfigError, match="serve.max_replicsa"):
        build_app({"serve.max_replicsa": "3"})


def _model_deployments(app) -> dict:
    ingress = app._bound_deployment  # the Api, bound to the two model deployments
    return {a._bound_deployment.name: a._bound_deployment for a in ingress.init_args
            if hasattr(a, "_bound_deployment")}


def test_a_gpu_app_fits_one_gpu_unless_told_otherwise():
    """With serve.use_gpu each model deployment asked Ray for a whole GPU: on a one-GPU machine EditModel waited
    for a second GPU and the application never became ready."""
    import sys

    sys.path.insert(0, str(ROOT))
    from serve.app import build_app

    config = str(ROOT / "configs" / "tiny.yaml")
    models = _model_deployments(build_app({"config": config, "serve.use_gpu": "true"}))
    assert set(models) == {"InvertModel", "EditModel"}
    assert sum(d.ray_actor_options["num_gpus"] for d in models.values()) <= 1
    whole = _model_deployments(build_app({"config": config, "serve.use_gpu": "true", "serve.gpus_per_replica": "1"}))
    assert [d.ray_actor_options["num_gpus"] for d in whole.values()] == [1, 1]
    cpu = _model_deployments(build_app({"config": config, "serve.gpus_per_replica": "1"}))
    assert [d.ray_actor_options["num_gpus"] for d in cpu.values()] == [0, 0]
    from clcae.config import ConfigError

    for bad in ("0", "2"):
        with pytest.raises(ConfigError, match="serve.gpus_per_replica"):
            build_app({"config": config, "serve.gpus_per_replica": bad})


def test_an_app_larger_than_a_fixed_cluster_is_refused_before_deploying(monkeypatch):
    """Serve leaves replicas it cannot place pending: `serve/app.py serve.min_replicas=3` on a 4-CPU local Ray waited
    forever without a word.  Now it is one error naming what is short, before anything is deployed."""
    import ray
    from ray import serve

    from clcae.errors import ClusterCapacityError
    from clcae.serving import check_capacity, resources_at_min_scale, start

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["serve.min_replicas=3", "serve.max_replicas=3"])
    assert resources_at_min_scale(cfg.serve) == {"CPU": 6.5, "GPU": 0}  # 3 + 3 model replicas, the ingress
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    monkeypatch.setattr(serve, "start", lambda **_: pytest.fail("deployed an app that cannot start"))
    with pytest.raises(ClusterCapacityError, match=r"serve.min_replicas=3 .* need 6.5 CPUs \(the cluster has 4\)\. "
                                                 r"Lower serve.min_replicas, serve.cpus_per_replica, or"):
        start(cfg, fixed_size=True)
    check_capacity(cfg.serve, {"CPU": 6.5})  # fits exactly
    gpu = load_config(ROOT / "configs" / "tiny.yaml", ["serve.use_gpu=true"])
    check_capacity(gpu.serve, {"CPU": 4.0, "GPU": 1.0})  # one replica of each model on one GPU
    with pytest.raises(ClusterCapacityError, match=r"need 1 GPUs \(the cluster has 0\)\. .*serve.gpus_per_replica"):
        check_capacity(gpu.serve, {"CPU": 4.0})


def test_a_port_in_use_is_one_clear_error_before_serve_starts(monkeypatch):
    """It was Serve's proxy failing to bind: exit 1 and a traceback of the proxy actor."""
    import socket

    import ray
    from ray import serve

    from clcae import serving

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    monkeypatch.setattr(serving, "_serve_running", lambda: False)
    monkeypatch.setattr(serve, "start", lambda **_: pytest.fail("Serve was started on a port in use"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg.serve.port = port
        with pytest.raises(serving.ServeAddressError, match=rf"serve.port={port}: 127.0.0.1:{port} is already in use"):
            serving.start(cfg, fixed_size=True)
    serving.check_port("127.0.0.1", port)  # free again
    with pytest.raises(serving.ServeAddressError, match=r"serve.host=203.0.113.77.*cannot listen there"):
        serving.check_port("203.0.113.77", port)  # TEST-NET-3: not an address of this machine


def test_a_slow_start_says_what_it_waits_for(monkeypatch, capsys):
    """On a cluster that may grow (RAY_ADDRESS), the start waits; a line every interval names the deployments not yet
    healthy with Serve's own message (which says which resources the replicas wait for)."""
    import threading
    from types import SimpleNamespace

    from ray import serve

    from clcae.serving import _report_progress

    pending = SimpleNamespace(status=SimpleNamespace(value="UPDATING"),
                              message="has 1 replicas that have taken more than 30s to be scheduled.\nmore")
    healthy = SimpleNamespace(status=SimpleNamespace(value="HEALTHY"), message="")
    app = SimpleNamespace(deployments={"InvertModel": healthy, "EditModel": pending})
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications={"clcae": app}))
    done = threading.Event()
    reporter = threading.Thread(target=_report_progress, args=("clcae", done, 0.05), daemon=True)
    reporter.start()
    try:
        done.wait(0.3)
    finally:
        done.set()
        reporter.join(5)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and not reporter.is_alive()
    assert all(line.startswith("still starting after ") for line in lines)
    assert lines[0].endswith("s: EditModel UPDATING: has 1 replicas that have taken more than 30s to be scheduled.")


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


def _deployments(path: Path) -> dict:
    import yaml

    app = yaml.safe_load(path.read_text())["applications"][0]
    return {d["name"]: d for d in app["deployments"]}


def test_shipped_serve_config_fits_a_two_cpu_laptop():
    """serve/config.yaml must become ready on 2 CPUs: every replica it may run, ingress included, fits."""
    total = 0.0
    for d in _deployments(ROOT / "serve" / "config.yaml").values():
        replicas = d.get("autoscaling_config", {}).get("max_replicas", d.get("num_replicas", 1))
        total += replicas * d.get("ray_actor_options", {}).get("num_cpus", 1)
    assert total <= 2.0, f"serve/config.yaml asks for {total} CPUs at full scale"


def test_cluster_serve_config_is_valid_and_sized_for_a_cluster():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    path = ROOT / "serve" / "config.cluster.yaml"
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    assert schema.applications[0].import_path == "serve.app:build_app"
    models = {n: d for n, d in _deployments(path).items() if n != "Api"}
    assert all(d["autoscaling_config"]["max_replicas"] > 1 for d in models.values())


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


def test_api_enforces_the_environment_key_of_the_process_that_built_it(server, monkeypatch):
    """The key is decided once, where the app is built, and travels with it: the replicas (started before the
    variable was set, like replicas on other nodes) enforce the builder's CLCAE_API_KEY."""
    from ray import serve

    from clcae.serving import build

    monkeypatch.setenv("CLCAE_API_KEY", "env-s3cret")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["serve.cpus_per_replica=0.5", "serve.max_replicas=1"])
    serve.run(build(cfg), name="keyed", route_prefix="/keyed")
    try:
        assert httpx.get(f"{server}/keyed/v1/directions", timeout=30).status_code == 401
        ok = httpx.get(f"{server}/keyed/v1/directions", headers={"x-api-key": "env-s3cret"}, timeout=30)
        assert ok.status_code == 200, ok.text
    finally:
        serve.delete("keyed")


# --------------------------------------------------------------------------------- serve/app.py as a command
def _app(*args: str, timeout: float = 120):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CLCAE_API_KEY", None)
    return subprocess.run([sys.executable, str(ROOT / "serve" / "app.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_app_help_is_whole():
    out = _app("--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "serve run serve/config.yaml" in text and "--checkpoint" in text
    first = out.stdout.split("\n\n")[1]  # the description paragraph ends a sentence
    assert first.rstrip().endswith((".", ")")), first


@pytest.mark.parametrize("args,words", [
    (["--config", "configs/no-such-config.yaml"], "no-such-config.yaml"),
    (["serve.max_replicsa=2"], "serve.max_replicsa"),
    (["serve.host=0.0.0.0"], "serve.host"),
    (["--checkpoint", "/no/such/dir/checkpoint.pt"], "/no/such/dir/checkpoint.pt"),
])
def test_app_user_errors_are_one_message_not_a_traceback(args, words):
    out = _app(*args)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and words in out.stderr, out.stderr[-2000:]


def test_a_png_inversion_does_not_ship_the_latents_back(server, served_config):
    """The model replica returns w, w+, deltas and f only for answers that carry them (JSON): a PNG answer would
    drop them at the ingress after they crossed the wire (a 1024 model's f alone is 512 KB a request). One batch
    may mix both kinds; what the PNG caller gets is unchanged."""
    from ray import serve

    handle = serve.get_deployment_handle("InvertModel", app_name="clcae")
    h, w = served_config.encoder.input_size
    image = np.asarray(Image.open(io.BytesIO(noise_image(size=(w, h), seed=3))).convert("RGB"))
    with_latents, without = handle.remote(image, None, True), handle.remote(image, None, False)
    with_latents, without = with_latents.result(timeout_s=60), without.result(timeout_s=60)
    latents = {"w", "w_plus", "deltas", "f"}
    assert latents <= set(with_latents) and not latents & set(without)
    np.testing.assert_array_equal(with_latents["image"], without["image"])
    assert with_latents["psnr"] == without["psnr"]
    png = httpx.post(f"{server}/v1/invert?format=png", content=noise_image(size=(w, h), seed=3), timeout=60)
    assert png.status_code == 200
    # the same image in a batch of its own: equal to within one uint8 level (batch size changes the summation)
    got = np.asarray(Image.open(io.BytesIO(png.content))).astype(int)
    assert np.abs(got - without["image"].astype(int)).max() <= 1
