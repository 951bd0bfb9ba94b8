"""Ray Serve deployments for CLCAE: inversion (dynamically batched) and editing behind a FastAPI ingress.

    Api (ingress, CPU)  -- decode/validate uploads, limits, API key, JSON <-> arrays, the web page
      -> InvertModel    -- the Inverter, ``@serve.batch``: one model call for many concurrent requests
      -> EditModel      -- the Inverter's edit path (InterFaceGAN on w, GANSpace on w+, Eq. 6 on f)

Both model deployments build the library's ``Inverter`` (the same object as the batch job).  Overload: the
ingress admits at most ``admission_limit(serve)`` model-bound requests at once (what the model deployments can
run and queue at full scale) and refuses the rest itself, before reading the body, with 503 + Retry-After and a
JSON ``{"error": ...}``; a model deployment's full queue (``max_queued_requests``) is answered the same way.
Serve's own limits on the ingress sit far above that, so Serve's plain-text 503 ("Request dropped due to
backpressure") only comes from a flood past ``ingress_limits``.  Every bad input is a 4xx with a JSON
``{"error": ...}`` saying what was wrong.  Image decoding, PNG encoding and JSON parsing run in a small thread
pool, never on the ingress's event loop, so a slow upload does not hold up /healthz or other requests.

Edits of an uploaded image run through the invert deployment first; the edit then re-runs the W+ attention
from the returned residuals, so w+ follows an InterFaceGAN edit as in the in-process path.  f is not
recomputed from T3 (64x64x512 per image is too large to ship between replicas): it is edited by Eq. 6 only.
"""

# No `from __future__ import annotations`: FastAPI must resolve the route signatures at run time.
import asyncio
import base64
import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from clcae.config import CLCAEConfig, ServeConfig, from_dict, n_latent, serve_api_key

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from clcae.align import AlignedCrop, Aligner

log = logging.getLogger(__name__)

API_KEY_HEADER = "x-api-key"
# Serve's own concurrency limit on the ingress is the admission limit plus this much room: for cheap routes
# (/healthz, /v1/directions) and for the requests being refused, which hold a slot for a few milliseconds.
INGRESS_HEADROOM = 64
T = TypeVar("T")


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}
        self.extra = extra or {}  # more JSON fields beside "error" (e.g. the faces found, so a client can choose)


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


def _from_wire(obj: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A client's latent -> float32 array of ``shape``, or an ApiError: 400 for what is not numbers (strings,
    booleans, null, ragged nesting, a broken wire form), 422 for numbers of the wrong shape or not finite in
    float32 (NaN, inf, beyond +-3.4e38)."""
    want = list(shape)
    if isinstance(obj, list):
        try:
            arr = np.asarray(obj)
        except (ValueError, TypeError, OverflowError, RecursionError):  # ragged or absurdly deep nesting
            raise ApiError(400, f"latents.{name} must be a nested list of numbers of shape {want}") from None
        if arr.dtype.kind not in "iuf":  # 'U' strings, 'b' booleans, 'O' null/objects/ints beyond 64 bits
            raise ApiError(400, f"latents.{name} must contain only numbers (shape {want})")
    elif isinstance(obj, dict) and {"dtype", "shape", "data"} <= set(obj):
        arr = _from_wire_dict(obj, name, want)
    else:
        raise ApiError(400, f"latents.{name} must be a list or {{dtype, shape, data}} as returned by /v1/invert")
    if list(arr.shape) != want:
        raise ApiError(422, f"latents.{name} has shape {list(arr.shape)}, expected {want}")
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, refused just below
        arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ApiError(422, f"latents.{name} contains NaN, infinite or out-of-range (beyond float32) values")
    return arr


def _from_wire_dict(obj: dict[str, Any], name: str, want: list[int]) -> np.ndarray:
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if dtype not in ("float16", "float32") or not isinstance(dtype, str):
        raise ApiError(400, f"latents.{name}.dtype must be \"float16\" or \"float32\"")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                            for d in shape)):
        raise ApiError(400, f"latents.{name}.shape must be a list of sizes, e.g. {want}")
    if shape != want:  # before decoding: a lying shape must not size an allocation
        raise ApiError(422, f"latents.{name} has shape {shape}, expected {want}")
    if not isinstance(data, str):
        raise ApiError(400, f"latents.{name}.data must be a base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError:
        raise ApiError(400, f"latents.{name}.data is not valid base64") from None
    if len(raw) != math.prod(shape) * np.dtype(dtype).itemsize:
        raise ApiError(400, f"latents.{name}: {len(raw)} bytes of data do not make a {dtype} array of shape {shape}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _finite_number(x: Any) -> float | None:
    """x as a float if it is a finite JSON number (not a boolean, not an int too large for a float), else None."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    try:
        value = float(x)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def _short(x: Any, limit: int = 60) -> str:
    """repr for an error message, cut short: clients may send megabytes."""
    text = repr(x) if not isinstance(x, int) or abs(x) < 10**50 else f"an integer of {len(str(abs(x)))} digits"
    return text if len(text) <= limit else text[:limit] + "..."


def latent_shapes(cfg: CLCAEConfig) -> dict[str, tuple[int, ...]]:
    """Per-image shapes of the latents /v1/invert returns and /v1/edit takes back: w, w+, f (G5's output,
    FEATURE_RES x FEATURE_RES) and the encoder's residuals (like w+)."""
    from clcae.models.stylegan2 import FEATURE_RES, channel_table

    g = cfg.generator
    channels = channel_table(g.channel_multiplier, g.channel_max)[FEATURE_RES]
    w_plus = (n_latent(cfg), g.style_dim)
    return {"w": (g.style_dim,), "w_plus": w_plus, "f": (channels, FEATURE_RES, FEATURE_RES), "deltas": w_plus}


def admission_limit(s: ServeConfig) -> int:
    """Model-bound requests (/v1/invert, /v1/edit) the ingress lets in at once: what the model deployments can
    hold at full scale (running + queued on every replica).  The rest are refused at once with a JSON 503."""
    return s.max_replicas * (s.max_ongoing_requests + s.max_queued_requests)


def ingress_limits(s: ServeConfig) -> dict[str, int]:
    """Serve's max_ongoing/max_queued for the ingress: above the admission limit, so the ingress's own JSON 503
    answers overload and Serve's plain-text one is a last resort."""
    ongoing = admission_limit(s) + INGRESS_HEADROOM
    return {"max_ongoing_requests": ongoing, "max_queued_requests": ongoing}


def _png(image) -> bytes:
    from clcae.data.images import encode_png, tensor_to_pil

    return encode_png(tensor_to_pil(image[None] if image.ndim == 3 else image)[0])


def align_domain(cfg: CLCAEConfig) -> str:
    """What ``align=true`` aligns to: ``serve.align_domain``, else the model's domain (only car models crop their
    generator output, ``generator.crop``)."""
    return cfg.serve.align_domain or ("cars" if cfg.generator.crop is not None else "faces")


TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _flag(value: str | None, name: str) -> bool:
    if value is None:
        return False
    v = value.strip().lower()
    if v in TRUE or v in FALSE:
        return v in TRUE
    raise ApiError(400, f"{name} must be true or false, got {_short(value)}")


def _face_index(value: str | None) -> int:
    if value is None or value.strip() == "":
        return 0
    v = value.strip()
    if not v.isdigit() or len(v) > 6:
        raise ApiError(400, f"face must be a face index (0 = the largest), got {_short(value)}")
    return int(v)


class AlignedPhoto:
    """One request's photo and the face it edits: the decoded photo (EXIF orientation applied), every face
    found, the chosen crop (the model's input) and the JSON the response carries about them.  Built in the
    ingress's pool: it encodes the crop's PNG."""

    def __init__(self, photo: np.ndarray, faces: "list[AlignedCrop]", face: int, domain: str, ms: float = 0.0):
        from clcae.data.images import encode_png

        self.photo, self.faces, self.face, self.domain, self.ms = photo, faces, faces[face], domain, ms
        self.pixels = np.asarray(self.face.image, np.uint8)  # already the encoder's input size
        self.aligned_png = encode_png(self.face.image)

    def describe(self) -> dict[str, Any]:
        f = self.face
        return {"domain": self.domain, "face": f.index, "quad": f.quad.tolist(),
                "landmarks": None if f.landmarks is None else f.landmarks.tolist(), "score": f.score,
                "source_size": list(f.source_size), "faces": _faces_json(self.faces), "align_ms": round(self.ms, 1),
                "aligned_png": base64.b64encode(self.aligned_png).decode()}


def _faces_json(faces: "list[AlignedCrop]") -> list[dict[str, Any]]:
    return [{"index": c.index, "quad": c.quad.tolist(), "score": c.score} for c in faces]


PHOTO_FORMATS = {"png": "image/png", "jpeg": "image/jpeg"}


def _encode_photo(image: "Image.Image", fmt: str) -> bytes:
    """The whole photo: PNG (lossless: outside the paste mask every byte is the upload's) or JPEG (quality 95,
    4:4:4; a 12 MP photo encodes ~10x faster and several times smaller)."""
    import io

    buf = io.BytesIO()
    if fmt == "jpeg":
        image.save(buf, format="JPEG", quality=95, subsampling=0)
    else:
        image.save(buf, format="PNG", compress_level=1)  # fast: the photo may have 12+ MP; ~10% larger than 6
    return buf.getvalue()


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
        from clcae.data.images import uint8_to_unit

        x = uint8_to_unit(np.stack(images))
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
    return JSONResponse({"error": exc.message, **exc.extra}, status_code=exc.status, headers=exc.headers)


@serve.deployment(name="Api")
@serve.ingress(app)
class Api:
    def __init__(self, inverter: DeploymentHandle, editor: DeploymentHandle, config: dict[str, Any],
                 page: str = ""):
        from clcae.factory import build_directions

        self.inverter, self.editor = inverter, editor
        self.cfg: CLCAEConfig = from_dict(config)
        self.directions = build_directions(self.cfg)
        self.page = page
        # build() already resolved the key into the config (see serve_api_key); resolving again is a no-op then
        self.api_key = serve_api_key(self.cfg.serve)
        self.max_body = int(self.cfg.serve.max_body_mb * 2**20)
        self.shapes = latent_shapes(self.cfg)
        self.admission_limit = admission_limit(self.cfg.serve)
        self.in_flight = 0  # model-bound requests admitted and not finished (one event loop: no lock needed)
        # Decoding a large upload takes up to a second of CPU; on the event loop it would stall every other
        # request, /healthz included.  PIL and torch release the GIL while they work.  Few threads: each
        # decode may hold ~0.5 GB (MAX_PIXELS), and the bound keeps memory bounded too.
        self.pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="clcae-decode")
        # Alignment (align=true) runs here, in the same pool, not in the model replicas: the photo is decoded
        # once, here, and paste-back needs it here too (shipping decoded 12 MP photos to a replica and back costs
        # more than detecting on them: MTCNN at <= 1024 px takes ~0.15-0.5 s of one core).  The detector is
        # built once per process, in the pool while the replica starts: the first align request does not pay
        # for the import and build (~3 s), and no request waits for it unless it aligns.
        self.align_domain = align_domain(self.cfg)
        self.align_size = tuple(self.cfg.encoder.input_size)
        self._aligner_future = self.pool.submit(self._build_aligner)

    # ------------------------------------------------------------------------------------ helpers
    def _auth(self, request: Request) -> None:
        check_api_key(self.api_key, request.headers.get(API_KEY_HEADER))

    async def _offload(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU-bound work (decode, encode, parse) in the pool, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _build_aligner(self) -> "Aligner":
        import torch

        from clcae.align import Aligner

        # One intra-op thread: the pool's threads align several photos at once instead.  On a shared 2-core
        # machine MTCNN took 150-190 ms a photo with 1 thread and 2.2-2.7 s with 2 (oversubscribed cores).
        torch.set_num_threads(1)
        return Aligner(self.align_domain, self.align_size)  # type: ignore[arg-type]

    def _aligner(self) -> "Aligner":
        try:
            return self._aligner_future.result()
        except Exception as exc:  # noqa: BLE001 - e.g. the detector's package is missing on this node
            log.exception("building the aligner failed")
            raise ApiError(503, f"photo alignment is unavailable on this server ({type(exc).__name__}: {exc})",
                           {"Retry-After": "60"}) from None

    def _align_options(self, fields: dict[str, str], align: str | None, face: str | None,
                       photo_format: str | None) -> tuple[bool, int, str]:
        """(align?, face index, whole-photo format) from the form fields, else the query string."""
        on = _flag(fields.get("align", align), "align")
        index = _face_index(fields.get("face", face))
        fmt = (fields.get("photo_format", photo_format) or "png").strip().lower()
        fmt = "jpeg" if fmt == "jpg" else fmt
        if fmt not in PHOTO_FORMATS:
            raise ApiError(400, f"photo_format must be 'png' or 'jpeg', got {_short(fmt)}")
        return on, index, fmt

    def _align(self, data: bytes | None, name: str, face: int) -> AlignedPhoto:
        """Decode the photo, find every face, pick one (runs in the pool, see _offload)."""
        import time

        from clcae.align import NoFaceError
        from clcae.data.images import MIN_IMAGE_SIZE, InputError, UnreadableImageError, decode_image

        if data is None:
            raise ApiError(400, "no image: send the file as the request body or as the multipart field 'image'")
        try:
            photo = decode_image(data, name)  # EXIF orientation applied: quads are in these pixels
        except InputError as exc:
            raise ApiError(415 if isinstance(exc, UnreadableImageError) else 400, f"bad image: {exc}") from None
        if min(photo.size) < MIN_IMAGE_SIZE:
            raise ApiError(400, f"bad image: {name} is {photo.width}x{photo.height}: too small "
                                f"(at least {MIN_IMAGE_SIZE} px a side)")
        aligner = self._aligner()
        start = time.perf_counter()
        pixels = np.asarray(photo)  # an array has no EXIF: the aligner cannot rotate it a second time
        try:
            faces = aligner(pixels, name)
        except NoFaceError as exc:
            raise ApiError(422, str(exc)) from None
        except InputError as exc:
            raise ApiError(400, f"bad image: {exc}") from None
        if face >= len(faces):
            raise ApiError(422, f"face {face} was asked for, but {name} has {len(faces)} "
                                f"face{'s' if len(faces) != 1 else ''} (0 = the largest)",
                           extra={"faces": _faces_json(faces)})
        return AlignedPhoto(pixels, faces, face, self.align_domain, (time.perf_counter() - start) * 1000)

    def _paste(self, aligned: AlignedPhoto, image: "torch.Tensor", fmt: str) -> bytes:
        """A model output (the crop's reconstruction or edit) pasted into the whole photo, encoded (pool)."""
        from clcae.align import paste_back
        from clcae.data.images import tensor_to_pil

        crop = tensor_to_pil(image[None])[0]
        # faces: the soft ellipse, so the background the model gets wrong stays the photo's; cars: the whole crop
        mask = "face" if aligned.domain == "faces" else "square"
        return _encode_photo(paste_back(aligned.photo, crop, aligned.face.quad, mask=mask), fmt)

    @contextlib.contextmanager
    def _admitted(self) -> Iterator[None]:
        """Admission control for model-bound requests: past the limit, a JSON 503 before the body is read (not
        queued, not decoded).  Serve's ingress queue would answer later and in plain text."""
        if self.in_flight >= self.admission_limit:
            raise ApiError(503, "server busy: the request queue is full, retry shortly", {"Retry-After": "1"})
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

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

    async def _image_and_fields(self, request: Request) -> tuple[bytes | None, str, dict[str, str]]:
        """Image bytes from a multipart form (field 'image') or a raw body, the name errors call it by, and the
        other form fields as strings."""
        unnamed = "the uploaded image"
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
                return None, unnamed, fields
            name = _short(upload.filename, 100) if upload.filename else unnamed
            return await upload.read(), name, fields
        if ctype.startswith("application/json"):
            return None, unnamed, {"_json": body.decode("utf-8", "replace")}
        return body, unnamed, {}

    def _decode(self, data: bytes | None, name: str) -> np.ndarray:
        """Runs in the pool (see _offload)."""
        from clcae.data.images import InputError, UnreadableImageError, decode_image, to_pixels

        if data is None:
            raise ApiError(400, "no image: send the file as the request body or as the multipart field 'image'")
        try:
            im = decode_image(data, name)
        except InputError as exc:
            raise ApiError(415 if isinstance(exc, UnreadableImageError) else 400, f"bad image: {exc}") from None
        if min(im.size) < 16:
            raise ApiError(400, f"bad image: {name} is {im.width}x{im.height}: too small (at least 16 px a side)")
        return to_pixels(im, tuple(self.cfg.encoder.input_size))

    async def _call(self, handle: DeploymentHandle, *args: Any) -> Any:
        from clcae.data.images import InputError
        from clcae.editing import EditError

        try:
            return await asyncio.wait_for(handle.remote(*args), timeout=self.cfg.serve.request_timeout_s)
        except BackPressureError:
            raise ApiError(503, "server busy: the request queue is full, retry shortly", {"Retry-After": "1"}) \
                from None
        except DeploymentUnavailableError:
            raise ApiError(503, "model deployment unavailable, retry shortly", {"Retry-After": "5"}) from None
        except TimeoutError:
            raise ApiError(504, f"model did not answer within {self.cfg.serve.request_timeout_s:g} s") from None
        except Exception as exc:
            # The model's own checks are the last line (a checkpoint whose shapes differ from the serving
            # config's): the client's input was wrong, not the server.  Ray wraps the replica's exception and
            # keeps it as .cause; str() of the wrapper is a traceback.
            cause = getattr(exc, "cause", exc)
            if isinstance(cause, InputError | EditError):
                raise ApiError(422, str(cause)) from None
            raise

    def _edits(self, raw: Any) -> list[tuple[str, float]]:
        from clcae.editing import EditError

        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except (ValueError, RecursionError) as exc:  # JSONDecodeError, over-long integers, deep nesting
                raise ApiError(400, f"'edits' is not valid JSON: {_short(str(exc), 200)}") from None
        if isinstance(raw, dict):
            raw = [{"direction": k, "strength": v} for k, v in raw.items()]
        if not isinstance(raw, list) or not raw:
            raise ApiError(400, "'edits' must be a non-empty list of {\"direction\": name, \"strength\": number}")
        edits = []
        for e in raw:
            if not isinstance(e, dict) or "direction" not in e or "strength" not in e:
                raise ApiError(400, "each edit needs 'direction' and 'strength'")
            name, strength = e["direction"], _finite_number(e["strength"])
            if not isinstance(name, str):
                raise ApiError(400, f"'direction' must be a name (a string), got {_short(name)}")
            if strength is None:
                raise ApiError(422, f"strength of {name!r} must be a finite number, got {_short(e['strength'])}")
            if name not in self.directions.names():
                raise ApiError(404, f"unknown direction {_short(name)}; known: {self.directions.names()}")
            cap = self.cfg.serve.max_strength
            if abs(strength) > cap:
                raise ApiError(422, f"strength {strength} of {name!r} is out of range [-{cap:g}, {cap:g}]")
            try:
                self.directions.check_strength(name, strength)
            except EditError as exc:
                raise ApiError(422, str(exc)) from None
            edits.append((name, strength))
        return edits

    def _latents(self, raw: Any) -> dict[str, np.ndarray]:
        if not isinstance(raw, dict):
            raise ApiError(400, "'latents' must be the object returned by /v1/invert (w, w_plus, f[, deltas])")
        missing = [k for k in ("w", "w_plus", "f") if k not in raw]
        if missing:
            raise ApiError(400, f"latents are missing {missing}")
        # every latent the model receives is checked here: shape, numbers only, finite in float32
        return {k: _from_wire(raw[k], k, self.shapes[k]) for k in ("w", "w_plus", "f", "deltas") if k in raw}

    def _edit_request(self, text: str) -> tuple[list[tuple[str, float]], dict[str, np.ndarray], Any]:
        """A JSON /v1/edit body -> (edits, latents, format).  Runs in the pool: parsing megabytes of JSON and
        checking the latents is CPU work."""
        try:
            payload = json.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, over-long integers, deep nesting
            raise ApiError(400, f"malformed JSON body: {_short(str(exc), 200)}") from None
        if not isinstance(payload, dict):
            raise ApiError(400, "the JSON body must be an object with 'latents' and 'edits'")
        edits = self._edits(payload.get("edits"))
        return edits, self._latents(payload.get("latents")), payload.get("format")

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

    @app.post("/v1/invert", responses={200: {"content": {"image/png": {}, "image/jpeg": {}}}})
    async def invert(self, request: Request, format: str = "json", align: str | None = None,
                     face: str | None = None, photo_format: str | None = None) -> Response:
        """Invert an image (raw body or multipart field 'image'): JSON with w, w+, f, residuals and a
        reconstruction PNG (base64), or ``?format=png`` for the reconstruction alone.

        ``align=true`` (query or form field): the upload is any photo; its faces are found and FFHQ-aligned (or
        the car crop is taken), face ``face`` (default 0, the largest) is inverted, and the JSON gains ``align``:
        the quad in the photo's pixels, every face found (index, quad, score) and the aligned crop; with
        ``format=png`` the answer is the whole photo with the reconstruction pasted back (``photo_format``
        png or jpeg)."""
        self._auth(request)
        if format not in ("json", "png"):
            raise ApiError(400, f"format must be 'json' or 'png', got {format!r}")
        with self._admitted():
            data, name, fields = await self._image_and_fields(request)
            aligning, index, photo_fmt = self._align_options(fields, align, face, photo_format)
            aligned = await self._offload(self._align, data, name, index) if aligning else None
            pixels = aligned.pixels if aligned else await self._offload(self._decode, data, name)
            res = await self._call(self.inverter, pixels)
            if format == "png" and aligned:
                whole = await self._offload(self._paste, aligned, res["image"], photo_fmt)
                return Response(whole, media_type=PHOTO_FORMATS[photo_fmt])
            png = await self._offload(_png, res["image"])
        if format == "png":
            return Response(png, media_type="image/png")
        body = {
            "model_id": res["model_id"], "psnr": res["psnr"], "batch_size": res["batch_size"],
            "w": res["w"].tolist(), "w_plus": res["w_plus"].tolist(),
            "latents": {"w": _to_wire(res["w"]), "w_plus": _to_wire(res["w_plus"]), "f": _to_wire(res["f"], "float16"),
                        "deltas": _to_wire(res["deltas"])},
            "reconstruction_png": base64.b64encode(png).decode(),
        }
        if aligned:
            body["align"] = aligned.describe()
        return JSONResponse(body)

    @app.post("/v1/edit", responses={200: {"content": {"image/png": {}, "image/jpeg": {}}}})
    async def edit(self, request: Request, format: str = "png", align: str | None = None,
                   face: str | None = None, photo_format: str | None = None) -> Response:
        """Edit an image (multipart: 'image' + 'edits' JSON) or latents from /v1/invert (JSON body:
        {"latents": ..., "edits": [{"direction": "smile", "strength": 2}]}); PNG by default, or JSON.

        ``align=true`` (with an uploaded photo): as for /v1/invert, then the edited crop is pasted back into the
        whole photo at its own resolution; ``format=png`` answers that photo (``photo_format`` png or jpeg), the
        JSON holds it as ``photo_png`` / ``photo_jpeg`` beside the edited crop, the reconstruction and
        ``align``."""
        self._auth(request)
        with self._admitted():
            data, name, fields = await self._image_and_fields(request)
            aligning, index, photo_fmt = self._align_options(fields, align, face, photo_format)
            aligned = None
            if "_json" in fields:
                if aligning:
                    raise ApiError(400, "align=true needs the photo: send a multipart form with 'image' and "
                                        "'edits' (latents alone cannot be pasted back into a photo)")
                edits, latents, requested = await self._offload(self._edit_request, fields["_json"])
            else:
                edits = self._edits(fields.get("edits"))
                requested = fields.get("format")
            format = format if requested is None else requested
            if format not in ("json", "png"):
                raise ApiError(400, f"format must be 'json' or 'png', got {_short(format)}")
            if "_json" not in fields:
                if aligning:
                    aligned = await self._offload(self._align, data, name, index)
                    pixels = aligned.pixels
                else:
                    pixels = await self._offload(self._decode, data, name)
                inverted = await self._call(self.inverter, pixels)
                latents = {k: inverted[k].numpy() for k in ("w", "w_plus", "f", "deltas")}
            out = await self._call(self.editor, latents, edits)
            whole = await self._offload(self._paste, aligned, out["image"], photo_fmt) if aligned else None
            if format == "png":
                if whole is not None:
                    return Response(whole, media_type=PHOTO_FORMATS[photo_fmt])
                return Response(await self._offload(_png, out["image"]), media_type="image/png")
            png = await self._offload(_png, out["image"])
            recon = await self._offload(_png, out["reconstruction"])
        body = {"edits": [{"direction": n, "strength": s} for n, s in edits],
                "image_png": base64.b64encode(png).decode(),
                "reconstruction_png": base64.b64encode(recon).decode()}
        if aligned:
            body["align"] = aligned.describe()
            body[f"photo_{photo_fmt}"] = base64.b64encode(whole).decode()
        return JSONResponse(body)


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
    # The API key is decided here, once, in the process that validated the config against it (serve.host), and
    # travels with the config: a replica on another node need not have CLCAE_API_KEY in its environment.
    config["serve"]["api_key"] = serve_api_key(s)
    actor = {"num_cpus": s.cpus_per_replica, "num_gpus": 1 if s.use_gpu else 0}
    autoscaling = {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                   "target_ongoing_requests": s.target_ongoing_requests}
    backpressure = BackpressureConfig(status_code=503, retry_after_s=1)
    model_opts = dict(ray_actor_options=actor, max_ongoing_requests=s.max_ongoing_requests,
                      max_queued_requests=s.max_queued_requests, autoscaling_config=autoscaling,
                      backpressure_config=backpressure, health_check_period_s=10)
    inverter = InvertModel.options(**model_opts).bind(config, source)
    editor = EditModel.options(**model_opts).bind(config, source)
    return Api.options(ray_actor_options={"num_cpus": min(0.5, s.cpus_per_replica)}, **ingress_limits(s),
                       backpressure_config=backpressure).bind(inverter, editor, config, page)


def start(cfg: CLCAEConfig, page: str = "", name: str = "clcae", blocking: bool = False):
    """``serve.start`` on the configured host/port, then run the app; returns the ingress handle."""
    s = cfg.serve
    serve.start(http_options={"host": s.host, "port": s.port, "request_timeout_s": s.request_timeout_s})
    return serve.run(build(cfg, page), name=name, route_prefix="/", blocking=blocking)

