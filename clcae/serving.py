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

An uploaded image's edit is one call of the invert deployment: ``Inverter.invert_and_edit``, the same code as
in-process, in the same batch as inversions (two generator passes: the reconstruction's and the edit's; the
encoder's T3 and residuals never leave the replica, so w+ and f follow a w-space edit exactly as in-process).  The
ingress checks the edits once, before the call.  ``EditModel`` serves edits of latents a client sends back.

Between deployments images travel as HxWx3 uint8 arrays and latents as float32 numpy arrays (not torch tensors,
whose pickling costs ~10x more); the ingress does every decode and PNG encode, in its pool.
"""

# No `from __future__ import annotations`: FastAPI must resolve the route signatures at run time.
import asyncio
import base64
import contextlib
import errno
import hmac
import io
import json
import logging
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import Headers
from starlette.requests import Request as StarletteRequest

from clcae.align import AlignedCrop, Aligner, NoFaceError, paste_back
from clcae.config import CLCAEConfig, ServeConfig, from_dict, serve_api_key, to_dict
from clcae.data.images import (
    FAST_PNG_LEVEL,
    InputError,
    UnreadableImageError,
    check_min_size,
    decode_image,
    encode_png,
    to_pixels,
    uint8_to_unit,
    unit_to_uint8,
)
from clcae.editing import EditError
from clcae.errors import CLCAEError
from clcae.factory import build_directions, latent_shapes
from clcae.inference import Inverter
from clcae.metrics import psnr
from clcae.pretrained import prepare
from clcae.train.runtime import fixed_size_cluster, require_resources
from clcae.wire import ApiError, finite_number, from_wire, short, to_wire

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

API_KEY_HEADER = "x-api-key"
# Serve's own concurrency limit on the ingress is the admission limit plus this much room: for cheap routes
# (/healthz, /v1/directions) and for the requests being refused, which hold a slot for a few milliseconds.
INGRESS_HEADROOM = 64
T = TypeVar("T")


def check_api_key(expected: str | None, given: str | None) -> None:
    """401 unless no key is configured or the right one was sent (constant-time comparison)."""
    if expected and not (given and hmac.compare_digest(given.encode(), expected.encode())):
        raise ApiError(401, f"missing or wrong API key: send it in the {API_KEY_HEADER!r} header")


def _inverter(config: dict[str, Any], source: Any):
    """The replica's Inverter: ``source`` (a ModelSource the driver resolved) or the config's own model."""
    cfg = from_dict(config)
    torch.set_num_threads(max(1, int(cfg.serve.cpus_per_replica)))
    device = "cuda" if cfg.serve.use_gpu else "cpu"
    if source is not None:
        return Inverter.load(source, cfg, device=device)
    return Inverter.from_config(cfg, device=device)


class Stages:
    """Where one request's time went, in ms, sent back as a ``Server-Timing`` header (and read by
    bench/serve_load.py): the ingress's own stages as laps (``read`` the body, ``decode``/``align``, ``encode``,
    ...), and each model call split into the replica's stages (``queue``: waiting for a batch, ``model``: the
    batch's model call, ``post``: its outputs made ready to send) and ``handle``: the rest of the call's round trip
    (routing, serialisation, transport).  ``total`` is the ingress's time from the route's start."""

    def __init__(self) -> None:
        self.start = self.mark = time.perf_counter()
        self.ms: dict[str, float] = {}

    def _add(self, stage: str, ms: float) -> None:
        self.ms[stage] = self.ms.get(stage, 0.0) + ms

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self._add(stage, (now - self.mark) * 1000)
        self.mark = now

    def call(self, replica: dict[str, float] | None) -> None:
        """Lap for a model call whose answer carried the replica's ``timing``."""
        now = time.perf_counter()
        round_trip = (now - self.mark) * 1000
        self.mark = now
        inside = 0.0
        for stage, ms in (replica or {}).items():
            self._add(stage, ms)
            inside += ms
        self._add("handle", max(0.0, round_trip - inside))

    def header(self) -> dict[str, str]:
        stages = {**self.ms, "total": (time.perf_counter() - self.start) * 1000}
        return {"Server-Timing": ", ".join(f"{k};dur={v:.2f}" for k, v in stages.items())}


def admission_limit(s: ServeConfig) -> int:
    """Model-bound requests (/v1/invert, /v1/edit) the ingress lets in at once: what the model deployments can
    hold at full scale (running + queued on every replica).  The rest are refused at once with a JSON 503."""
    return s.max_replicas * (s.max_ongoing_requests + s.max_queued_requests)


def model_replica_resources(s: ServeConfig) -> dict[str, float]:
    """Ray resources of one InvertModel or EditModel replica.  With a GPU, a share of one (serve.gpus_per_replica):
    a whole GPU each would leave EditModel pending on a one-GPU machine, and the app never ready."""
    return {"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica if s.use_gpu else 0}


def ingress_limits(s: ServeConfig) -> dict[str, int]:
    """Serve's max_ongoing/max_queued for the ingress: above the admission limit, so the ingress's own JSON 503
    answers overload and Serve's plain-text one is a last resort."""
    ongoing = admission_limit(s) + INGRESS_HEADROOM
    return {"max_ongoing_requests": ongoing, "max_queued_requests": ongoing}


def _png(image: np.ndarray) -> bytes:
    """An HxWx3 uint8 image (a model output, see images.unit_to_uint8) as PNG bytes, at the fast zlib level: a
    reply is encoded for one client and not kept."""
    return encode_png(Image.fromarray(image), FAST_PNG_LEVEL)


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
    raise ApiError(400, f"{name} must be true or false, got {short(value)}")


def _face_index(value: str | None) -> int:
    if value is None or value.strip() == "":
        return 0
    v = value.strip()
    if not v.isdigit() or len(v) > 6:
        raise ApiError(400, f"face must be a face index (0 = the largest), got {short(value)}")
    return int(v)


class AlignedPhoto:
    """One request's photo and the face it edits: the decoded photo (EXIF orientation applied), every face
    found, the chosen crop (the model's input) and the JSON the response carries about them.  Built in the
    ingress's pool: it encodes the crop's PNG."""

    def __init__(self, photo: np.ndarray, faces: "list[AlignedCrop]", face: int, domain: str, ms: float = 0.0):
        self.photo, self.faces, self.face, self.domain, self.ms = photo, faces, faces[face], domain, ms
        self.pixels = np.asarray(self.face.image, np.uint8)  # already the encoder's input size
        self.aligned_png = encode_png(self.face.image, FAST_PNG_LEVEL)

    def describe(self) -> dict[str, Any]:
        f = self.face
        return {"domain": self.domain, "face": f.index, "quad": f.quad.tolist(),
                "landmarks": None if f.landmarks is None else f.landmarks.tolist(), "score": f.score,
                "source_size": list(f.source_size), "faces": _faces_json(self.faces), "align_ms": round(self.ms, 1),
                "aligned_png": base64.b64encode(self.aligned_png).decode()}


def _check_size(im: Image.Image, name: str) -> None:
    """The one minimum size of every front door (images.check_min_size), as a 400."""
    try:
        check_min_size(im)
    except InputError as exc:
        raise ApiError(400, f"bad image: {name} is too small: {exc}") from None


def _faces_json(faces: "list[AlignedCrop]") -> list[dict[str, Any]]:
    return [{"index": c.index, "quad": c.quad.tolist(), "score": c.score} for c in faces]


PHOTO_FORMATS = {"png": "image/png", "jpeg": "image/jpeg"}


def _encode_photo(image: "Image.Image", fmt: str) -> bytes:
    """The whole photo: PNG (lossless: outside the paste mask every byte is the upload's) or JPEG (quality 95,
    4:4:4; a 12 MP photo encodes ~10x faster and several times smaller)."""
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.save(buf, format="JPEG", quality=95, subsampling=0)
    else:
        image.save(buf, format="PNG", compress_level=FAST_PNG_LEVEL)  # the photo may have 12+ MP
    return buf.getvalue()


def _timed(rows: list[dict[str, Any]], start: float, done: float) -> list[dict[str, Any]]:
    """Each answer of a batch gets the batch's ``timing``: its start (made into the queue wait by :func:`_queued`),
    the model call, and the time since (outputs made ready to send), in ms."""
    now = time.perf_counter()
    for row in rows:
        row["timing"] = {"start": start, "model": (done - start) * 1000, "post": (now - done) * 1000}
    return rows


def _queued(row: dict[str, Any], entered: float) -> dict[str, Any]:
    timing = row["timing"]
    timing["queue"] = max(0.0, (timing.pop("start") - entered) * 1000)
    return row


@serve.deployment(name="InvertModel")
class InvertModel:
    """The Inverter with dynamic batching: concurrent requests become one model call.  A request is an image
    (HxWx3 uint8 at the encoder's input size) and, for an uploaded image's edit, its edits (checked by the
    ingress); one batch mixes both (``Inverter.invert_and_edit``)."""

    def __init__(self, config: dict[str, Any], source: Any = None):
        self.inverter = _inverter(config, source)
        cfg = from_dict(config).serve
        self.invert_batch.set_max_batch_size(cfg.max_batch_size)
        self.invert_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        # The model runs in this one thread, off the replica's event loop: while a batch computes (torch releases
        # the GIL), the loop takes in the next requests and sends the last batch's answers.  The thread gets the
        # replica's torch thread count (_inverter set it).

        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clcae-model",
                                               initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def invert_batch(self, images: list[np.ndarray], edits: list[list[tuple[str, float]] | None],
                           latents: list[bool]) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.model_thread, self._run, images, edits, latents)

    def _run(self, images: list[np.ndarray], edits: list[list[tuple[str, float]] | None],
             with_latents: list[bool]) -> list[dict[str, Any]]:

        start = time.perf_counter()
        x = uint8_to_unit(np.stack(images), self.inverter.device)
        res, edited = self.inverter.invert_and_edit(x, per_image=edits, checked=True)
        done = time.perf_counter()
        recon = unit_to_uint8(res.image.cpu())
        edited_u8 = iter(unit_to_uint8(edited.cpu()) if edited is not None else ())
        scores = psnr(res.image.float().cpu().clamp(-1, 1), x.cpu()).tolist()
        wanted = any(e is None and want for e, want in zip(edits, with_latents))  # else no device-to-host copies
        latents = {k: getattr(res, k).cpu().numpy() for k in ("w", "w_plus", "deltas", "f")} if wanted else {}
        meta = {"batch_size": len(images), "model_id": self.inverter.model_id}
        out = []
        for i, e in enumerate(edits):
            if e is None:  # the latents only when the answer carries them (JSON): a 1024 model's f is 512 KB
                mine = {k: v[i] for k, v in latents.items()} if with_latents[i] else {}
                out.append({**mine, "image": recon[i], "psnr": scores[i], **meta})
            else:  # an uploaded image's edit: the edited image and the reconstruction, no latents
                out.append({"image": next(edited_u8), "reconstruction": recon[i], **meta})
        return _timed(out, start, done)

    async def __call__(self, image: np.ndarray, edits: list[tuple[str, float]] | None = None,
                       latents: bool = True) -> dict[str, Any]:
        """``latents=False``: the answer has the image, PSNR and batch facts but not w, w+, deltas and f."""
        entered = time.perf_counter()
        return _queued(await self.invert_batch(image, edits, latents), entered)

    def check_health(self) -> None:
        if self.inverter is None:
            raise RuntimeError("model not loaded")


@serve.deployment(name="EditModel")
class EditModel:
    """Edits of latents a client sends back (JSON /v1/edit); an uploaded image's edit runs in InvertModel."""

    def __init__(self, config: dict[str, Any], source: Any = None):
        self.inverter = _inverter(config, source)

    async def __call__(self, latents: dict[str, np.ndarray], edits: list[tuple[str, float]]):
        start = time.perf_counter()
        inv = self.inverter
        t = {k: torch.from_numpy(np.array(v, np.float32))[None] for k, v in latents.items()}  # a writable copy
        inversion = inv.latents_to_inversion(t["w"], t["w_plus"], t["f"], t.get("deltas"))
        edited = inv.edit(inversion, edits, checked=True)  # the ingress checked the edits
        done = time.perf_counter()
        out = {"image": unit_to_uint8(edited.cpu())[0], "reconstruction": unit_to_uint8(inversion.image.cpu())[0]}
        return {**out, "timing": {"model": (done - start) * 1000, "post": (time.perf_counter() - done) * 1000}}


app = FastAPI(title="CLCAE", version="1", description="StyleGAN2 inversion and editing (CLCAE, CVPR 2023)")


@app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": exc.message, **exc.extra}, status_code=exc.status, headers=exc.headers)


@serve.deployment(name="Api")
@serve.ingress(app)
class Api:
    def __init__(self, inverter: DeploymentHandle, editor: DeploymentHandle, config: dict[str, Any],
                 page: str = ""):
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
            raise ApiError(400, f"photo_format must be 'png' or 'jpeg', got {short(fmt)}")
        return on, index, fmt

    def _align(self, data: bytes | None, name: str, face: int) -> AlignedPhoto:
        """Decode the photo, find every face, pick one (runs in the pool, see _offload)."""
        if data is None:
            raise ApiError(400, "no image: send the file as the request body or as the multipart field 'image'")
        try:
            photo = decode_image(data, name)  # EXIF orientation applied: quads are in these pixels
        except InputError as exc:
            raise ApiError(415 if isinstance(exc, UnreadableImageError) else 400, f"bad image: {exc}") from None
        _check_size(photo, name)
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

    def _paste(self, aligned: AlignedPhoto, image: np.ndarray, fmt: str) -> bytes:
        """A model output (the crop's reconstruction or edit) pasted into the whole photo, encoded (pool)."""
        crop = Image.fromarray(image)
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
            name = short(upload.filename, 100) if upload.filename else unnamed
            return await upload.read(), name, fields
        if ctype.startswith("application/json"):
            return None, unnamed, {"_json": body.decode("utf-8", "replace")}
        return body, unnamed, {}

    def _decode(self, data: bytes | None, name: str) -> np.ndarray:
        """Runs in the pool (see _offload)."""
        if data is None:
            raise ApiError(400, "no image: send the file as the request body or as the multipart field 'image'")
        try:
            im = decode_image(data, name)
        except InputError as exc:
            raise ApiError(415 if isinstance(exc, UnreadableImageError) else 400, f"bad image: {exc}") from None
        _check_size(im, name)
        return to_pixels(im, tuple(self.cfg.encoder.input_size))

    async def _call(self, handle: DeploymentHandle, *args: Any) -> Any:
        """One model call within serve.request_timeout_s.  A replica that dies with the request on it (killed,
        out of memory, node lost: Ray's ActorDiedError) costs one retry, which Serve routes to another replica or
        holds until the replacement is up (both model calls are pure functions of their arguments, so a retry is
        safe); a second death is a 503 + Retry-After, never a 500."""
        timeout = self.cfg.serve.request_timeout_s
        deadline = asyncio.get_running_loop().time() + timeout
        for attempt in (1, 2):
            try:
                left = max(0.0, deadline - asyncio.get_running_loop().time())
                return await asyncio.wait_for(handle.remote(*args), timeout=left)
            except BackPressureError:
                raise ApiError(503, "server busy: the request queue is full, retry shortly", {"Retry-After": "1"}) \
                    from None
            except DeploymentUnavailableError:
                raise ApiError(503, "model deployment unavailable, retry shortly", {"Retry-After": "5"}) from None
            except TimeoutError:
                raise ApiError(504, f"model did not answer within {timeout:g} s") from None
            except Exception as exc:
                # The model's own checks are the last line (a checkpoint whose shapes differ from the serving
                # config's): the client's input was wrong, not the server.  Ray wraps the replica's exception and
                # keeps it as .cause; str() of the wrapper is a traceback.
                cause = getattr(exc, "cause", exc)
                if isinstance(cause, InputError | EditError):
                    raise ApiError(422, str(cause)) from None
                if not isinstance(exc, RayActorError) and not isinstance(cause, RayActorError):
                    raise
                log.warning("model replica died during a request (attempt %d): %s", attempt,
                            str(exc).splitlines()[0])
        raise ApiError(503, "model replica lost while answering, retry shortly", {"Retry-After": "1"})

    def _edits(self, raw: Any) -> list[tuple[str, float]]:
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except (ValueError, RecursionError) as exc:  # JSONDecodeError, over-long integers, deep nesting
                raise ApiError(400, f"'edits' is not valid JSON: {short(str(exc), 200)}") from None
        if isinstance(raw, dict):
            raw = [{"direction": k, "strength": v} for k, v in raw.items()]
        if not isinstance(raw, list) or not raw:
            raise ApiError(400, "'edits' must be a non-empty list of {\"direction\": name, \"strength\": number}")
        edits = []
        for e in raw:
            if not isinstance(e, dict) or "direction" not in e or "strength" not in e:
                raise ApiError(400, "each edit needs 'direction' and 'strength'")
            name, strength = e["direction"], finite_number(e["strength"])
            if not isinstance(name, str):
                raise ApiError(400, f"'direction' must be a name (a string), got {short(name)}")
            if strength is None:
                raise ApiError(422, f"strength of {name!r} must be a finite number, got {short(e['strength'])}")
            if name not in self.directions.names():
                raise ApiError(404, f"unknown direction {short(name)}; known: {self.directions.names()}")
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
        return {k: from_wire(raw[k], k, self.shapes[k]) for k in ("w", "w_plus", "f", "deltas") if k in raw}

    def _edit_request(self, text: str) -> tuple[list[tuple[str, float]], dict[str, np.ndarray], Any]:
        """A JSON /v1/edit body -> (edits, latents, format).  Runs in the pool: parsing megabytes of JSON and
        checking the latents is CPU work."""
        try:
            payload = json.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, over-long integers, deep nesting
            raise ApiError(400, f"malformed JSON body: {short(str(exc), 200)}") from None
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
        st = Stages()
        with self._admitted():
            data, name, fields = await self._image_and_fields(request)
            st.lap("read")
            aligning, index, photo_fmt = self._align_options(fields, align, face, photo_format)
            aligned = await self._offload(self._align, data, name, index) if aligning else None
            pixels = aligned.pixels if aligned else await self._offload(self._decode, data, name)
            st.lap("align" if aligned else "decode")
            res = await self._call(self.inverter, pixels, None, format == "json")  # PNG: no latents back
            st.call(res.get("timing"))
            if format == "png" and aligned:
                whole = await self._offload(self._paste, aligned, res["image"], photo_fmt)
                st.lap("paste")
                return Response(whole, media_type=PHOTO_FORMATS[photo_fmt], headers=st.header())
            png = await self._offload(_png, res["image"])
            st.lap("encode")
        if format == "png":
            return Response(png, media_type="image/png", headers=st.header())
        body = {
            "model_id": res["model_id"], "psnr": res["psnr"], "batch_size": res["batch_size"],
            "w": res["w"].tolist(), "w_plus": res["w_plus"].tolist(),
            "latents": {"w": to_wire(res["w"]), "w_plus": to_wire(res["w_plus"]), "f": to_wire(res["f"], "float16"),
                        "deltas": to_wire(res["deltas"])},
            "reconstruction_png": base64.b64encode(png).decode(),
        }
        if aligned:
            body["align"] = aligned.describe()
        st.lap("json")
        return JSONResponse(body, headers=st.header())

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
        st = Stages()
        with self._admitted():
            data, name, fields = await self._image_and_fields(request)
            st.lap("read")
            aligning, index, photo_fmt = self._align_options(fields, align, face, photo_format)
            aligned = None
            if "_json" in fields:
                if aligning:
                    raise ApiError(400, "align=true needs the photo: send a multipart form with 'image' and "
                                        "'edits' (latents alone cannot be pasted back into a photo)")
                edits, latents, requested = await self._offload(self._edit_request, fields["_json"])
                st.lap("parse")
            else:
                edits = self._edits(fields.get("edits"))
                requested = fields.get("format")
            format = format if requested is None else requested
            if format not in ("json", "png"):
                raise ApiError(400, f"format must be 'json' or 'png', got {short(format)}")
            if "_json" not in fields:
                if aligning:
                    aligned = await self._offload(self._align, data, name, index)
                    pixels = aligned.pixels
                else:
                    pixels = await self._offload(self._decode, data, name)
                st.lap("align" if aligned else "decode")
                out = await self._call(self.inverter, pixels, edits)  # invert and edit in one model call
            else:
                out = await self._call(self.editor, latents, edits)
            st.call(out.get("timing"))
            whole = await self._offload(self._paste, aligned, out["image"], photo_fmt) if aligned else None
            if aligned:
                st.lap("paste")
            if format == "png":
                if whole is not None:
                    return Response(whole, media_type=PHOTO_FORMATS[photo_fmt], headers=st.header())
                png = await self._offload(_png, out["image"])
                st.lap("encode")
                return Response(png, media_type="image/png", headers=st.header())
            png = await self._offload(_png, out["image"])
            recon = await self._offload(_png, out["reconstruction"])
            st.lap("encode")
        body = {"edits": [{"direction": n, "strength": s} for n, s in edits],
                "image_png": base64.b64encode(png).decode(),
                "reconstruction_png": base64.b64encode(recon).decode()}
        if aligned:
            body["align"] = aligned.describe()
            body[f"photo_{photo_fmt}"] = base64.b64encode(whole).decode()
        st.lap("json")
        return JSONResponse(body, headers=st.header())


# ---------------------------------------------------------------------------------------------- building
def build(cfg: CLCAEConfig, page: str = ""):
    """The Serve application for a config: deployment options (replicas, queues, batching, GPUs) from
    ``cfg.serve``."""
    source = None
    if cfg.serve.model:
        # resolved here, in the driver: a missing file fails before any replica starts, and the replicas get
        # the model's architecture with the serving config's settings and directions
        source, cfg = prepare(cfg.serve.model, cfg)
    # Every replica loads the directions; a missing or unreadable file is said here, by name and with its fix,
    # not as Serve's "Deploying application failed" with the cause in a replica's log.
    build_directions(cfg)
    s = cfg.serve
    config = to_dict(cfg)
    # The API key is decided here, once, in the process that validated the config against it (serve.host), and
    # travels with the config: a replica on another node need not have CLCAE_API_KEY in its environment.
    config["serve"]["api_key"] = serve_api_key(s)
    actor = model_replica_resources(s)
    autoscaling = {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                   "target_ongoing_requests": s.target_ongoing_requests, "upscale_delay_s": s.upscale_delay_s,
                   "downscale_delay_s": s.downscale_delay_s, "look_back_period_s": s.look_back_period_s,
                   "metrics_interval_s": s.metrics_interval_s}
    backpressure = BackpressureConfig(status_code=503, retry_after_s=1)
    model_opts = dict(ray_actor_options=actor, max_ongoing_requests=s.max_ongoing_requests,
                      max_queued_requests=s.max_queued_requests, autoscaling_config=autoscaling,
                      backpressure_config=backpressure, health_check_period_s=s.health_check_period_s)
    with warnings.catch_warnings():
        # Ray 2.60 marks metrics_interval_s deprecated (for environment variables it does not read yet), but it is
        # still what sets how often the handles report load: the only way to react in seconds, not tens of them.
        warnings.filterwarnings("ignore", "The `metrics_interval_s` field", DeprecationWarning)
        inverter = InvertModel.options(**model_opts).bind(config, source)
        editor = EditModel.options(**model_opts).bind(config, source)
    return Api.options(ray_actor_options={"num_cpus": min(0.5, s.cpus_per_replica)}, **ingress_limits(s),
                       backpressure_config=backpressure).bind(inverter, editor, config, page)


def resources_at_min_scale(s: ServeConfig) -> dict[str, float]:
    """What the application holds before its first request: ``serve.min_replicas`` replicas of each model
    deployment and the one ingress replica."""
    model = model_replica_resources(s)
    return {"CPU": 2 * s.min_replicas * model["num_cpus"] + min(0.5, s.cpus_per_replica),
            "GPU": 2 * s.min_replicas * model["num_gpus"]}


def check_capacity(s: ServeConfig, available: dict[str, float]) -> None:
    """Refuse an application that a fixed-size Ray cluster (``available``: its total resources) cannot hold: Serve
    would leave the replicas pending, and the start would wait forever without a word."""
    require_resources(
        resources_at_min_scale(s), available,
        f"the app cannot start on this Ray cluster: at serve.min_replicas={s.min_replicas} its two model "
        "deployments and the ingress",
        f"Lower serve.min_replicas, serve.cpus_per_replica{' or serve.gpus_per_replica' if s.use_gpu else ''}, "
        "or start a larger cluster")


def _serve_running() -> bool:
    """Whether Serve already runs on this cluster (its proxy then holds the port, and serve.start changes nothing)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


class ServeAddressError(CLCAEError, ValueError):
    """serve.host / serve.port where this machine cannot listen (in use, or not one of its addresses)."""


def check_port(host: str, port: int) -> None:
    """The HTTP address must be free on this machine before Serve's proxy tries it: its failure arrives as a
    multi-line traceback from the proxy actor.  (Bound with SO_REUSEADDR, as the proxy's server does, so a port
    in TIME_WAIT after a restart counts as free.)"""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServeAddressError(
                    f"serve.port={port}: {host}:{port} is already in use (another program, or another server on "
                    f"this machine); stop it or pick another port, e.g. serve.port={port + 1}") from None
            raise ServeAddressError(
                f"serve.host={host}, serve.port={port}: cannot listen there ({exc.strerror}); use an address of this "
                "machine (127.0.0.1, or 0.0.0.0 with an API key)") from None


def _report_progress(name: str, done: threading.Event, every_s: float) -> None:
    """Until ``done``: every ``every_s`` a line on stderr with the deployments not yet healthy and Serve's word on
    them (on a cluster that must grow first, it says which resources the replicas wait for)."""
    started = time.monotonic()
    while not done.wait(every_s):
        try:
            app = serve.status().applications.get(name)
        except Exception:  # noqa: BLE001 - the controller may be starting; try again next time
            continue
        waiting = [f"{d} {st.status.value}" + (f": {st.message.splitlines()[0]}" if st.message else "")
                   for d, st in (app.deployments.items() if app else ()) if st.status.value != "HEALTHY"]
        if waiting:
            print(f"still starting after {time.monotonic() - started:.0f} s: " + "; ".join(waiting),
                  file=sys.stderr, flush=True)


def start(cfg: CLCAEConfig, page: str = "", name: str = "clcae", blocking: bool = False,
          fixed_size: bool | None = None, progress_every_s: float = 30.0):
    """``serve.start`` on the configured host/port, then run the app; returns the ingress handle.

    ``fixed_size``: the Ray cluster cannot grow (default: :func:`clcae.train.runtime.fixed_size_cluster`),
    so an app larger than it is refused before deploying.  While the app starts, a progress line every
    ``progress_every_s`` names what it waits for."""
    s = cfg.serve
    app = build(cfg, page)
    if fixed_size if fixed_size is not None else fixed_size_cluster():
        import ray

        check_capacity(s, ray.cluster_resources())
    if not _serve_running():
        check_port(s.host, s.port)
    serve.start(http_options={"host": s.host, "port": s.port, "request_timeout_s": s.request_timeout_s})
    done = threading.Event()
    reporter = threading.Thread(target=_report_progress, args=(name, done, progress_every_s), daemon=True)
    reporter.start()
    try:
        return serve.run(app, name=name, route_prefix="/", blocking=blocking)
    finally:
        done.set()

