"""Ray Serve deployments for CLCAE: inversion (dynamically batched) and editing behind a FastAPI ingress.

    Api (ingress, CPU)  -- decode/validate uploads, limits, API key, JSON <-> arrays, the web page
      -> InvertModel    -- the Inverter, ``@serve.batch``: one model call for many concurrent requests
      -> EditModel      -- the Inverter's edit path (InterFaceGAN on w, GANSpace on w+, Eq. 6 on f)

Both model deployments build the library's ``Inverter`` (the same object as the batch job).  Bounded queues:
past ``max_queued_requests`` a request is refused at once with 503 + Retry-After instead of waiting; every
bad input is a 4xx with a JSON ``{"error": ...}`` saying what was wrong.

Edits of an uploaded image run through the invert deployment first; the edit then re-runs the W+ attention
from the returned residuals, so w+ follows an InterFaceGAN edit as in the in-process path.  f is not
recomputed from T3 (64x64x512 per image is too large to ship between replicas): it is edited by Eq. 6 only.
"""

# No `from __future__ import annotations`: FastAPI must resolve the route signatures at run time.
import asyncio
import base64
import json
import logging
import os
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from clcae.config import CLCAEConfig, from_dict, n_latent

log = logging.getLogger(__name__)

API_KEY_HEADER = "x-api-key"


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def check_api_key(expected: str | None, given: str | None) -> None:
    """401 unless no key is configured or the right one was sent (constant-time comparison)."""
    import hmac

    if expected and not (given and hmac.compare_digest(given.encode(), expected.encode())):
        raise ApiError(401, f"missing or wrong API key: send it in the {API_KEY_HEADER!r} header")


def _inverter(config: dict[str, Any], source: Any):
    """The replica's Inverter: ``source`` (a ModelSource the driver resolved) or the config's own model."""
    import torch

    from clcae.inference import Inverter

    cfg = from_dict(config)
    torch.set_num_threads(max(1, int(cfg.serve.cpus_per_replica)))
    device = "cuda" if cfg.serve.use_gpu else "cpu"
    if source is not None:
        return Inverter.load(source, cfg, device=device)
    return Inverter.from_config(cfg, device=device)


def _to_wire(t, dtype: str = "float32") -> dict[str, Any]:
    """A tensor as {"dtype", "shape", "data": base64}: compact (JSON lists for w/w+ are for humans).  Latents
    stay float32 so an edit of strength 0 reproduces the reconstruction; f may go as float16 (it only enters
    additively, Eq. 6)."""
    arr = np.ascontiguousarray(t.detach().float().cpu().numpy() if hasattr(t, "detach") else t).astype(dtype)
    return {"dtype": str(arr.dtype), "shape": list(arr.shape), "data": base64.b64encode(arr.tobytes()).decode()}


def _from_wire(obj: Any, name: str) -> np.ndarray:
    if isinstance(obj, list):
        try:
            return np.asarray(obj, np.float32)
        except (TypeError, ValueError):
            raise ApiError(400, f"latents.{name} must be a (nested) list of numbers") from None
    if not isinstance(obj, dict) or not {"dtype", "shape", "data"} <= set(obj):
        raise ApiError(400, f"latents.{name} must be a list or {{dtype, shape, data}} as returned by /v1/invert")
    if obj["dtype"] not in ("float16", "float32"):
        raise ApiError(400, f"latents.{name}.dtype must be float16 or float32")
    try:
        arr = np.frombuffer(base64.b64decode(obj["data"], validate=True), dtype=obj["dtype"])
        return arr.reshape([int(s) for s in obj["shape"]]).astype(np.float32)
    except Exception:  # noqa: BLE001
        raise ApiError(400, f"latents.{name}: data does not match dtype/shape") from None


def _png(image) -> bytes:
    from clcae.data.images import encode_png, tensor_to_pil

    return encode_png(tensor_to_pil(image[None] if image.ndim == 3 else image)[0])


@serve.deployment(name="InvertModel")
class InvertModel:
    """The Inverter with dynamic batching: concurrent requests become one model call."""

    def __init__(self, config: dict[str, Any], source: Any = None):
        self.inverter = _inverter(config, source)
        cfg = from_dict(config).serve
        self.invert_batch.set_max_batch_size(cfg.max_batch_size)
        self.invert_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def invert_batch(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        import torch

        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        res = self.inverter.invert(x.to(self.inverter.device))
        from clcae.metrics import psnr

        scores = psnr(res.image.float().cpu().clamp(-1, 1), x).tolist()
        return [{"w": res.w[i].cpu(), "w_plus": res.w_plus[i].cpu(), "deltas": res.deltas[i].cpu(),
                 "f": res.f[i].cpu(), "image": res.image[i].cpu(), "psnr": scores[i],
                 "batch_size": len(images), "model_id": self.inverter.model_id} for i in range(len(images))]

    async def __call__(self, image: np.ndarray) -> dict[str, Any]:
        return await self.invert_batch(image)

    def check_health(self) -> None:
        if self.inverter is None:
            raise RuntimeError("model not loaded")


@serve.deployment(name="EditModel")
class EditModel:
    def __init__(self, config: dict[str, Any], source: Any = None):
        self.inverter = _inverter(config, source)

    async def __call__(self, latents: dict[str, np.ndarray], edits: list[tuple[str, float]]):
        import torch

        inv = self.inverter
        t = {k: torch.from_numpy(np.array(v, np.float32))[None] for k, v in latents.items()}  # a writable copy
        inversion = inv.latents_to_inversion(t["w"], t["w_plus"], t["f"], t.get("deltas"))
        return {"image": inv.edit(inversion, edits)[0].cpu(), "reconstruction": inversion.image[0].cpu()}


app = FastAPI(title="CLCAE", version="1", description="StyleGAN2 inversion and editing (CLCAE, CVPR 2023)")


@app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


@serve.deployment(name="Api")
@serve.ingress(app)
class Api:
    def __init__(self, inverter: DeploymentHandle, editor: DeploymentHandle, config: dict[str, Any],
                 page: str = ""):
        from clcae.inference import directions_from_config

        self.inverter, self.editor = inverter, editor
        self.cfg: CLCAEConfig = from_dict(config)
        self.directions = directions_from_config(self.cfg)
        self.page = page
        self.api_key = self.cfg.serve.api_key or os.environ.get("CLCAE_API_KEY") or None
        self.max_body = int(self.cfg.serve.max_body_mb * 2**20)
        g = self.cfg.generator
        self.shapes = {"w": (g.style_dim,), "w_plus": (n_latent(self.cfg), g.style_dim)}

    # ------------------------------------------------------------------------------------ helpers
    def _auth(self, request: Request) -> None:
        check_api_key(self.api_key, request.headers.get(API_KEY_HEADER))

    async def _body(self, request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise ApiError(413, f"request body is {int(length):,} bytes; the limit is {self.max_body:,} "
                                "(serve.max_body_mb)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise ApiError(413, f"request body is over the {self.max_body:,}-byte limit (serve.max_body_mb)")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _image_and_fields(self, request: Request) -> tuple[bytes | None, dict[str, str]]:
        """Image bytes from a multipart form (field 'image') or a raw body; other form fields as strings."""
        body = await self._body(request)
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            from starlette.datastructures import Headers
            from starlette.requests import Request as StarletteRequest

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": body, "more_body": False}

            scope = dict(request.scope)
            scope["headers"] = Headers(headers={"content-type": ctype}).raw
            try:
                form = await StarletteRequest(scope, receive).form()
            except Exception as exc:  # noqa: BLE001
                raise ApiError(400, f"malformed multipart body: {exc}") from None
            upload = form.get("image")
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            if upload is None or isinstance(upload, str):
                return None, fields
            return await upload.read(), fields
        if ctype.startswith("application/json"):
            return None, {"_json": body.decode("utf-8", "replace")}
        return body, {}

    def _decode(self, data: bytes | None) -> np.ndarray:
        from clcae.data.images import InputError, decode_image, pil_to_tensor

        if data is None:
            raise ApiError(400, "no image: send the file as the request body or as the multipart field 'image'")
        try:
            im = decode_image(data)
        except InputError as exc:
            raise ApiError(415 if "not a readable image" in str(exc) else 400, f"bad image: {exc}") from None
        if min(im.size) < 16:
            raise ApiError(400, f"bad image: {im.width}x{im.height} is too small (at least 16 px a side)")
        x = pil_to_tensor(im, tuple(self.cfg.encoder.input_size))
        return ((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)

    async def _call(self, handle: DeploymentHandle, *args: Any) -> Any:
        try:
            return await asyncio.wait_for(handle.remote(*args), timeout=self.cfg.serve.request_timeout_s)
        except BackPressureError:
            raise ApiError(503, "server busy: the request queue is full, retry shortly", {"Retry-After": "1"}) \
                from None
        except DeploymentUnavailableError:
            raise ApiError(503, "model deployment unavailable, retry shortly", {"Retry-After": "5"}) from None
        except TimeoutError:
            raise ApiError(504, f"model did not answer within {self.cfg.serve.request_timeout_s:g} s") from None

    def _edits(self, raw: Any) -> list[tuple[str, float]]:
        from clcae.editing import EditError

        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ApiError(400, f"'edits' is not valid JSON: {exc}") from None
        if isinstance(raw, dict):
            raw = [{"direction": k, "strength": v} for k, v in raw.items()]
        if not isinstance(raw, list) or not raw:
            raise ApiError(400, "'edits' must be a non-empty list of {\"direction\": name, \"strength\": number}")
        edits = []
        for e in raw:
            if not isinstance(e, dict) or "direction" not in e or "strength" not in e:
                raise ApiError(400, "each edit needs 'direction' and 'strength'")
            name, strength = e["direction"], e["strength"]
            if not isinstance(strength, int | float) or isinstance(strength, bool) or not np.isfinite(strength):
                raise ApiError(422, f"strength of {name!r} must be a finite number, got {strength!r}")
            if name not in self.directions.names():
                raise ApiError(404, f"unknown direction {name!r}; known: {self.directions.names()}")
            cap = self.cfg.serve.max_strength
            if abs(strength) > cap:
                raise ApiError(422, f"strength {strength} of {name!r} is out of range [-{cap:g}, {cap:g}]")
            try:
                self.directions.check_strength(name, float(strength))
            except EditError as exc:
                raise ApiError(422, str(exc)) from None
            edits.append((name, float(strength)))
        return edits

    def _latents(self, raw: Any) -> dict[str, np.ndarray]:
        if not isinstance(raw, dict):
            raise ApiError(400, "'latents' must be the object returned by /v1/invert (w, w_plus, f[, deltas])")
        missing = [k for k in ("w", "w_plus", "f") if k not in raw]
        if missing:
            raise ApiError(400, f"latents are missing {missing}")
        out = {k: _from_wire(raw[k], k) for k in ("w", "w_plus", "f", "deltas") if k in raw}
        for k, shape in {**self.shapes, "deltas": self.shapes["w_plus"]}.items():
            if k in out and out[k].shape != shape:
                raise ApiError(422, f"latents.{k} has shape {list(out[k].shape)}, expected {list(shape)}")
        if any(not np.isfinite(v).all() for v in out.values()):
            raise ApiError(422, "latents contain NaN or infinite values")
        return out

    # ------------------------------------------------------------------------------------ routes
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self.page or "<p>CLCAE API: see <a href='/docs'>/docs</a></p>")

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """Liveness: the ingress answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """Readiness: the model deployments answer (a tiny inversion is not needed; a handle ping is)."""
        try:
            await asyncio.wait_for(self.inverter.check_health.remote(), timeout=5)
        except Exception as exc:  # noqa: BLE001
            return JSONResponse({"status": "not ready", "error": str(exc)}, status_code=503)
        return JSONResponse({"status": "ready", "model_input": list(self.cfg.encoder.input_size)})

    @app.get("/v1/directions")
    async def directions(self, request: Request) -> dict[str, Any]:
        """Edit directions, their kind and strength range."""
        self._auth(request)
        cap = self.cfg.serve.max_strength
        return {name: {**d, "max_strength": min(d.get("max_strength", cap), cap)}
                for name, d in self.directions.describe().items()}

    @app.post("/v1/invert", responses={200: {"content": {"image/png": {}}}})
    async def invert(self, request: Request, format: str = "json") -> Response:
        """Invert an image (raw body or multipart field 'image'): JSON with w, w+, f, residuals and a
        reconstruction PNG (base64), or ``?format=png`` for the reconstruction alone."""
        self._auth(request)
        if format not in ("json", "png"):
            raise ApiError(400, f"format must be 'json' or 'png', got {format!r}")
        data, _ = await self._image_and_fields(request)
        res = await self._call(self.inverter, self._decode(data))
        png = _png(res["image"])
        if format == "png":
            return Response(png, media_type="image/png")
        return JSONResponse({
            "model_id": res["model_id"], "psnr": res["psnr"], "batch_size": res["batch_size"],
            "w": res["w"].tolist(), "w_plus": res["w_plus"].tolist(),
            "latents": {"w": _to_wire(res["w"]), "w_plus": _to_wire(res["w_plus"]), "f": _to_wire(res["f"], "float16"),
                        "deltas": _to_wire(res["deltas"])},
            "reconstruction_png": base64.b64encode(png).decode(),
        })

    @app.post("/v1/edit", responses={200: {"content": {"image/png": {}}}})
    async def edit(self, request: Request, format: str = "png") -> Response:
        """Edit an image (multipart: 'image' + 'edits' JSON) or latents from /v1/invert (JSON body:
        {"latents": ..., "edits": [{"direction": "smile", "strength": 2}]}); PNG by default, or JSON."""
        self._auth(request)
        data, fields = await self._image_and_fields(request)
        if "_json" in fields:
            try:
                payload = json.loads(fields["_json"])
            except json.JSONDecodeError as exc:
                raise ApiError(400, f"malformed JSON body: {exc}") from None
            if not isinstance(payload, dict):
                raise ApiError(400, "the JSON body must be an object with 'latents' and 'edits'")
            edits = self._edits(payload.get("edits"))
            latents = self._latents(payload.get("latents"))
            format = payload.get("format", format)
        else:
            edits = self._edits(fields.get("edits"))
            format = fields.get("format", format)
            inverted = await self._call(self.inverter, self._decode(data))
            latents = {k: inverted[k].numpy() for k in ("w", "w_plus", "f", "deltas")}
        if format not in ("json", "png"):
            raise ApiError(400, f"format must be 'json' or 'png', got {format!r}")
        out = await self._call(self.editor, latents, edits)
        png = _png(out["image"])
        if format == "png":
            return Response(png, media_type="image/png")
        return JSONResponse({"edits": [{"direction": n, "strength": s} for n, s in edits],
                             "image_png": base64.b64encode(png).decode(),
                             "reconstruction_png": base64.b64encode(_png(out["reconstruction"])).decode()})


# ---------------------------------------------------------------------------------------------- building
def build(cfg: CLCAEConfig, page: str = ""):
    """The Serve application for a config: deployment options (replicas, queues, batching, GPUs) from
    ``cfg.serve``."""
    from ray.serve.config import BackpressureConfig

    from clcae.config import to_dict

    source = None
    if cfg.serve.model:
        from clcae.pretrained import prepare

        # resolved here, in the driver: a missing file fails before any replica starts, and the replicas get
        # the model's architecture with the serving config's settings and directions
        source, cfg = prepare(cfg.serve.model, cfg)
    s = cfg.serve
    config = to_dict(cfg)
    actor = {"num_cpus": s.cpus_per_replica, "num_gpus": 1 if s.use_gpu else 0}
    autoscaling = {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                   "target_ongoing_requests": s.target_ongoing_requests}
    backpressure = BackpressureConfig(status_code=503, retry_after_s=1)
    model_opts = dict(ray_actor_options=actor, max_ongoing_requests=s.max_ongoing_requests,
                      max_queued_requests=s.max_queued_requests, autoscaling_config=autoscaling,
                      backpressure_config=backpressure, health_check_period_s=10)
    inverter = InvertModel.options(**model_opts).bind(config, source)
    editor = EditModel.options(**model_opts).bind(config, source)
    return Api.options(ray_actor_options={"num_cpus": min(0.5, s.cpus_per_replica)},
                       max_ongoing_requests=4 * s.max_ongoing_requests, max_queued_requests=4 * s.max_queued_requests,
                       backpressure_config=backpressure).bind(inverter, editor, config, page)


def start(cfg: CLCAEConfig, page: str = "", name: str = "clcae", blocking: bool = False):
    """``serve.start`` on the configured host/port, then run the app; returns the ingress handle."""
    s = cfg.serve
    serve.start(http_options={"host": s.host, "port": s.port, "request_timeout_s": s.request_timeout_s})
    return serve.run(build(cfg, page), name=name, route_prefix="/", blocking=blocking)

