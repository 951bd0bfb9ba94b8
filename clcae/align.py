"""Real photos -> the crops the models expect (FFHQ-aligned faces, the official car crop), and back.

    aligner = Aligner("faces", size=256)                 # MTCNN from facenet-pytorch: weights in the wheel
    faces = aligner(open("group.jpg", "rb").read())      # every face, largest first; NoFaceError if none
    faces[0].image, faces[0].quad, faces[0].landmarks, faces[0].score, faces[0].index
    results = aligner.align_batch([b1, b2, b3])          # per image: list[AlignedCrop] or the InputError
    photo = paste_back(photo, edited_crop, faces[0].quad)  # the edit in the whole photo, soft seam

Faces follow NVlabs' ``recreate_aligned_images`` (the FFHQ recipe, see ``ffhq_quad``) from five MTCNN
landmarks; detection runs on a copy downscaled to ``detect_size`` on the long side, so a 12 MP photo costs
what a 1 MP one does, and the crop is then cut from the full-resolution photo. Cars have no landmarks: the
authors feed the 4:3 middle of the 512x512 generator image (rows 64:448) resized to 192x256, so a photo
gets its largest centred 4:3 rectangle resized to (h, w) = (192, 256).

Coordinates (quads, landmarks) are source pixels of the photo *after* EXIF orientation, x to the right,
y down, pixel centres at integers (dlib's and NVlabs' convention; PIL's continuous coordinates are these
+ 0.5). A quad is 4 corners [top-left, bottom-left, bottom-right, top-right] of the crop as it lies in the
photo; landmarks are [eye, eye, nose, mouth corner, mouth corner], each pair left to right in the image.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from clcae.data.images import InputError, decode_image, to_rgb

Domain = Literal["faces", "cars"]
DOMAINS: tuple[str, ...] = ("faces", "cars")
# (height, width) of the crop when none is asked for: the encoders' input sizes (configs/ffhq.yaml, cars.yaml).
DEFAULT_SIZE: dict[str, tuple[int, int]] = {"faces": (256, 256), "cars": (192, 256)}
ImageLike = bytes | bytearray | memoryview | Image.Image | np.ndarray


class NoFaceError(InputError):
    """The photo is readable but holds no face the detector accepts. Front doors map it to HTTP 422
    (``http_status``) and to an error row (``key``, ``source``, ``error`` = the message)."""

    http_status = 422


@dataclass(frozen=True)
class AlignedCrop:
    """One aligned face (or the car crop) of a photo.

    ``image`` is the crop; ``quad`` (4, 2) where it lies in the source photo; ``landmarks`` (5, 2) the
    detector's points in the source photo (None for cars); ``score`` the detector's probability (None for
    cars); ``index`` the face's rank in its photo (0 = largest quad); ``source_size`` the photo's (w, h)
    after EXIF orientation, the frame of ``quad`` and ``landmarks``.
    """

    image: Image.Image
    quad: np.ndarray
    landmarks: np.ndarray | None
    score: float | None
    index: int
    source_size: tuple[int, int]

    def row(self) -> dict:
        """The alignment columns of a shard row (see clcae.data.shards.ALIGN_COLUMNS)."""
        return {"quad": self.quad.reshape(-1).tolist(),
                "landmarks": None if self.landmarks is None else self.landmarks.reshape(-1).tolist(),
                "score": self.score, "face_index": self.index}


# ---------------------------------------------------------------------------------------------------
# Geometry


def ffhq_quad(landmarks: np.ndarray) -> np.ndarray:
    """Five landmarks (eyes, nose, mouth corners; image left to right) -> the FFHQ crop quad (4, 2).

    The definition of NVlabs' ``recreate_aligned_images``, which uses eye centres and mouth corners only.
    """
    lm = np.asarray(landmarks, np.float64).reshape(5, 2)
    eye_avg = (lm[0] + lm[1]) / 2
    e2e = lm[1] - lm[0]
    e2m = (lm[3] + lm[4]) / 2 - eye_avg
    x = e2e - np.flipud(e2m) * [-1, 1]  # halfway between the eye line and the perpendicular of eye->mouth
    x *= max(np.hypot(*e2e) * 2.0, np.hypot(*e2m) * 1.8) / np.hypot(*x)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + e2m * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def centre_box(width: int, height: int, aspect: float) -> tuple[int, int, int, int]:
    """The largest whole-pixel box (x0, y0, x1, y1) of ``aspect`` = w / h centred in a width x height photo
    (for a 512x512 car image at 4:3: rows 64:448, the authors' crop)."""
    cw = min(width, round(height * aspect))
    ch = min(height, round(cw / aspect))
    x0, y0 = (width - cw) // 2, (height - ch) // 2
    return x0, y0, x0 + cw, y0 + ch


def box_quad(box: Sequence[float]) -> np.ndarray:
    """A box (x0, y0, x1, y1) in PIL's continuous coordinates -> the quad of its edges (pixel-centre coords)."""
    x0, y0, x1, y1 = (float(v) - 0.5 for v in box)
    return np.array([[x0, y0], [x0, y1], [x1, y1], [x1, y0]])


def _sides(quad: np.ndarray) -> tuple[float, float]:
    """(width, height) of a quad in source pixels."""
    return float(np.hypot(*(quad[3] - quad[0]))), float(np.hypot(*(quad[1] - quad[0])))


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h < 1 or w < 1:
        raise ValueError(f"crop size {size}: both sides must be >= 1")
    return int(h), int(w)


def crop_quad(photo: Image.Image, quad: np.ndarray, size: int | Sequence[int]) -> Image.Image:
    """Resample the part of ``photo`` under ``quad`` to an image of ``size`` ((h, w) or one side).

    The steps of the FFHQ recipe: cut the quad's bounding box plus a border (10% of the quad) out of the
    photo; shrink that cut when the quad is 4x the output or more (so the transform below reads at most ~4
    source pixels per output pixel); where the quad leaves the photo, extend it by reflection and fade the
    extension towards a blur and the median colour (a mirrored face would look like a second face);
    transform the quad to an integer multiple of the output (at most 4x, NVlabs' ratio) and reduce with a
    Lanczos filter.
    """
    out_h, out_w = _hw(size)
    q = np.asarray(quad, np.float64).reshape(4, 2) + 0.5  # PIL's continuous coordinates from here on
    qsize = max(_sides(q))
    photo = to_rgb(photo)

    # 1. cut: only the region the quad needs, so a 12 MP photo is never resampled whole
    border = max(round(qsize * 0.1), 3)
    x0, y0 = np.maximum(np.floor(q.min(0)).astype(int) - border, 0)
    x1, y1 = np.minimum(np.ceil(q.max(0)).astype(int) + border, photo.size)
    if x1 <= x0 or y1 <= y0:
        x0, y0, x1, y1 = 0, 0, *photo.size  # the quad lies outside the photo: pad from the whole photo
    region = photo.crop((int(x0), int(y0), int(x1), int(y1)))
    q -= (x0, y0)

    # 2. shrink: keep at most ~2-4 source pixels per transformed pixel
    shrink = int(math.floor(min(_sides(q)[0] / out_w, _sides(q)[1] / out_h) * 0.5))
    if shrink > 1:
        small = (max(round(region.width / shrink), 1), max(round(region.height / shrink), 1))
        q *= (small[0] / region.width, small[1] / region.height)
        region = region.resize(small, Image.Resampling.LANCZOS, reducing_gap=3.0)  # box-reduce first: fast
        qsize = max(_sides(q))
        border = max(round(qsize * 0.1), 3)

    # 3. pad where the quad (plus border) leaves the photo
    lo = np.floor(q.min(0)).astype(int) - border
    hi = np.ceil(q.max(0)).astype(int) + border
    pad = np.array([max(-lo[0], 0), max(-lo[1], 0), max(hi[0] - region.width, 0), max(hi[1] - region.height, 0)])
    if pad.max() > border - 4:
        pad = np.maximum(pad, round(qsize * 0.3))  # a consistent fade width on every side
        region = _pad_and_fade(region, pad, blur=qsize * 0.02)
        q += pad[:2]

    # 4. transform, then reduce
    k = int(min(max(math.ceil(min(_sides(q)[0] / out_w, _sides(q)[1] / out_h)), 1), 4))
    out = region.transform((out_w * k, out_h * k), Image.Transform.QUAD, tuple(q.reshape(-1)),
                           Image.Resampling.BILINEAR)
    return out.resize((out_w, out_h), Image.Resampling.LANCZOS) if k > 1 else out


def _pad_and_fade(region: Image.Image, pad: np.ndarray, blur: float) -> Image.Image:
    """Reflect-pad by (left, top, right, bottom) and fade the padding to a blur, then to the median colour."""
    left, top, right, bottom = (int(p) for p in pad)
    arr = np.pad(np.asarray(region), ((top, bottom), (left, right), (0, 0)), mode="reflect")
    h, w = arr.shape[:2]
    # ramp: 1 at the padded image's edge, 0 where the photo starts (per side; a side without padding adds 0)
    x = np.arange(w, dtype=np.float32)
    y = np.arange(h, dtype=np.float32)[:, None]

    def ramp(dist: np.ndarray, width: int) -> np.ndarray:
        return 1.0 - dist / width if width > 0 else np.full_like(dist, -np.inf)

    ramp_x = np.maximum(ramp(x, left), ramp(w - 1 - x, right))[None, :]
    ramp_y = np.maximum(ramp(y, top), ramp(h - 1 - y, bottom))
    mask = np.maximum(ramp_x, ramp_y)[..., None]
    img = arr.astype(np.float32)
    blurred = np.asarray(Image.fromarray(arr).filter(ImageFilter.GaussianBlur(blur)), np.float32)
    img += (blurred - img) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
    img += (np.median(img, axis=(0, 1)) - img) * np.clip(mask, 0.0, 1.0)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------------
# Paste-back


def crop_mask(size: int | Sequence[int], kind: Literal["face", "square"] = "face",
              feather: float = 0.08) -> np.ndarray:
    """A soft (h, w) float32 mask in crop space: 1 where the crop replaces the photo, 0 where it must not.

    ``"face"``: an ellipse over the face of an FFHQ-aligned crop (eyes sit at y ~ 0.48, the mouth at
    ~ 0.70 of the side), so the background a reconstruction gets wrong stays the photo's. ``"square"``:
    the whole crop (e.g. cars). ``feather`` is the width of the 1 -> 0 ramp as a fraction of the side.
    """
    h, w = _hw(size)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    u, v = x / max(w - 1, 1), y / max(h - 1, 1)  # 0 and 1 on the outermost pixels, which must get 0
    if kind not in ("face", "square"):
        raise ValueError(f"mask kind {kind!r}: use 'face' or 'square'")
    # signed distance outside the kept area, in fractions of the side; 0 at the crop's edge either way
    dist = feather - np.minimum.reduce([u, v, 1 - u, 1 - v])
    if kind == "face":  # an ellipse over forehead to chin (approximately a distance: exact on the axes)
        cx, cy, ax, ay = 0.5, 0.55, 0.31, 0.34
        dist = np.maximum(dist, (np.hypot((u - cx) / ax, (v - cy) / ay) - 1.0) * min(ax, ay))
    t = np.clip(1.0 - dist / feather, 0.0, 1.0) if feather > 0 else (dist <= 0).astype(np.float64)
    return (t * t * (3 - 2 * t)).astype(np.float32)  # smoothstep: no visible kink at either end


def paste_back(photo: ImageLike, crop: Image.Image | np.ndarray, quad: np.ndarray,
               mask: np.ndarray | Literal["face", "square"] = "face", feather: float = 0.08) -> Image.Image:
    """``crop`` (an edited aligned crop) warped back under ``quad`` into ``photo`` at the photo's resolution.

    ``mask`` is a crop-space (h, w) array in [0, 1] (e.g. from a face parser) or a :func:`crop_mask` kind.
    Pixels where the warped mask is 0 are the photo's bytes, unchanged; elsewhere photo and crop are
    blended by the mask, so there is no seam.
    """
    base = np.asarray(load_photo(photo))
    warped, alpha, (x0, y0) = warp_to_photo(crop, quad, (base.shape[1], base.shape[0]), mask, feather)
    out = base.copy()
    if warped is None:
        return Image.fromarray(out)
    h, w = alpha.shape
    part = base[y0:y0 + h, x0:x0 + w].astype(np.float32)
    a = alpha[..., None]
    blended = np.clip(np.rint(part + (warped.astype(np.float32) - part) * a), 0, 255).astype(np.uint8)
    out[y0:y0 + h, x0:x0 + w] = np.where(a > 0, blended, base[y0:y0 + h, x0:x0 + w])
    return Image.fromarray(out)


def photo_mask(quad: np.ndarray, photo_size: tuple[int, int], crop_size: int | Sequence[int],
               mask: np.ndarray | Literal["face", "square"] = "face", feather: float = 0.08) -> np.ndarray:
    """The (H, W) float32 weight :func:`paste_back` gives the crop at each photo pixel (0 = photo kept)."""
    h, w = _hw(crop_size)
    _, alpha, (x0, y0) = warp_to_photo(np.zeros((h, w, 3), np.uint8), quad, photo_size, mask, feather)
    full = np.zeros(photo_size[::-1], np.float32)
    if alpha is not None:
        full[y0:y0 + alpha.shape[0], x0:x0 + alpha.shape[1]] = alpha
    return full


def warp_to_photo(crop: Image.Image | np.ndarray, quad: np.ndarray, photo_size: tuple[int, int],
                  mask: np.ndarray | Literal["face", "square"] = "face", feather: float = 0.08,
                  ) -> tuple[np.ndarray | None, np.ndarray | None, tuple[int, int]]:
    """The inverse warp: crop and mask resampled onto the photo pixels under ``quad``.

    Returns (RGB uint8 (h, w, 3), weight float32 (h, w), (x0, y0)) for the photo box starting at (x0, y0)
    that the quad covers, or (None, None, (0, 0)) when the quad misses the photo.
    """
    crop_im = to_rgb(crop if isinstance(crop, Image.Image) else Image.fromarray(np.asarray(crop, np.uint8)))
    weight = crop_mask((crop_im.height, crop_im.width), mask, feather) if isinstance(mask, str) else \
        np.asarray(mask, np.float32)
    if weight.shape != (crop_im.height, crop_im.width):
        raise ValueError(f"mask is {weight.shape}, the crop is {(crop_im.height, crop_im.width)}")
    q = np.asarray(quad, np.float64).reshape(4, 2) + 0.5
    side_w, side_h = _sides(q)
    weight_im = Image.fromarray(np.clip(weight, 0, 1).astype(np.float32), "F")
    if side_w < crop_im.width or side_h < crop_im.height:
        # the photo has fewer pixels there than the crop: low-pass first, bilinear/bicubic sampling would alias
        small = (max(math.ceil(side_w), 1), max(math.ceil(side_h), 1))
        crop_im = crop_im.resize(small, Image.Resampling.LANCZOS)
        weight_im = weight_im.resize(small, Image.Resampling.BILINEAR)
    x0, y0 = np.maximum(np.floor(q.min(0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(q.max(0)).astype(int), photo_size)
    if x1 <= x0 or y1 <= y0:
        return None, None, (0, 0)
    # photo point p = q0 + A @ u, u in crop coordinates; PIL wants crop coords of each box pixel: A^-1 (p - q0)
    a = np.stack([(q[3] - q[0]) / crop_im.width, (q[1] - q[0]) / crop_im.height], axis=1)
    inv = np.linalg.inv(a)
    offset = inv @ (np.array([x0, y0], np.float64) - q[0])
    coeffs = (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])
    box = (int(x1 - x0), int(y1 - y0))
    rgb = crop_im.transform(box, Image.Transform.AFFINE, coeffs, Image.Resampling.BICUBIC)
    alpha = weight_im.transform(box, Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR, fillcolor=0.0)
    return np.asarray(rgb), np.clip(np.asarray(alpha, np.float32), 0, 1), (int(x0), int(y0))


# ---------------------------------------------------------------------------------------------------
# Detection


def load_photo(image: ImageLike) -> Image.Image:
    """Encoded bytes, a PIL image or an (H, W, 3) uint8 array -> RGB PIL image, EXIF orientation applied."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(bytes(image))  # decodes, checks the pixel limit, applies EXIF orientation
    if isinstance(image, Image.Image):
        return to_rgb(ImageOps.exif_transpose(image))
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise InputError(f"expected an (H, W, 3) uint8 array, got {arr.shape} {arr.dtype}")
    return to_rgb(Image.fromarray(arr))


@dataclass(frozen=True)
class Detection:
    """A face in source pixels: ``landmarks`` (5, 2), ``score`` in [0, 1], ``box`` (x0, y0, x1, y1)."""

    landmarks: np.ndarray
    score: float
    box: np.ndarray


class FaceDetector:
    """MTCNN (facenet-pytorch, MIT; its three small nets' weights ship in the wheel) on downscaled copies,
    with the landmarks refined in the face's own frame.

    Photos are detected at most ``detect_size`` pixels on the long side and the points mapped back, so the
    cost does not grow with the photo's resolution. Photos whose detection copies have the same size run as
    one batch (MTCNN batches equal sizes only); a photo's result does not depend on its batch beyond float
    rounding (~0.01 px).
    ``min_face_size`` is in detection pixels; faces scoring below ``min_score`` are dropped.

    Refinement (``refine_steps``): MTCNN's points jitter by ~3% of the face with its rotation, scale and
    position in the photo (its last net sees a 48x48 box cut at whatever angle and pyramid level the face
    fell on). Each step cuts the face out upright at a fixed scale (the FFHQ quad of the current points),
    runs that last net (ONet) on the face box there at 3 scales and mirrored, maps the 6 answers back to the
    photo and averages them. Three steps make the crop nearly invariant to rotation, scale and mirroring
    (tests/test_align.py measures it).
    """

    # the face box ONet expects, in FFHQ-crop units (MTCNN's box on a detected face): centre, side
    WINDOW_CENTRE, WINDOW_SIDE, WINDOW_SCALES = (0.5, 0.56), 0.62, (0.95, 1.0, 1.05)
    CANON_SIZE, ONET_SIZE = 112, 48

    def __init__(self, device: str | torch.device = "cpu", detect_size: int = 1024, min_face_size: int = 20,
                 min_score: float = 0.9, batch_size: int = 8, refine_steps: int = 3):
        from facenet_pytorch import MTCNN  # imported here: only face alignment needs it

        self.device = torch.device(device)
        self.detect_size, self.min_score, self.batch_size = detect_size, min_score, batch_size
        self.min_face_size, self.refine_steps = min_face_size, refine_steps
        self.mtcnn = MTCNN(min_face_size=min_face_size, select_largest=False, keep_all=True, device=self.device)
        self.mtcnn.eval()

    def __call__(self, photos: Sequence[Image.Image]) -> list[list[Detection]]:
        """Detections per photo (any order; see :class:`Aligner` for the face order)."""
        small = [self._downscale(p) for p in photos]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(small):
            if min(s.size) >= self.min_face_size:  # smaller: no face fits (and MTCNN fails on an empty pyramid)
                groups.setdefault(s.size, []).append(i)
        out: list[list[Detection]] = [[] for _ in photos]
        for members in groups.values():
            for start in range(0, len(members), self.batch_size):
                idx = members[start:start + self.batch_size]
                batch = torch.from_numpy(np.stack([np.asarray(small[i]) for i in idx])).to(self.device)
                boxes, probs, points = self.mtcnn.detect(batch, landmarks=True)
                for j, i in enumerate(idx):
                    out[i] = self._detections(boxes[j], probs[j], points[j], photos[i].size, small[i].size)
        faces = [(i, d) for i, found in enumerate(out) for d in found]
        if faces and self.refine_steps > 0:
            refined = self.refine([photos[i] for i, _ in faces], [d.landmarks for _, d in faces])
            out = [[] for _ in photos]
            for (i, d), lm in zip(faces, refined):
                out[i].append(Detection(lm, d.score, d.box))
        return out

    def refine(self, photos: Sequence[Image.Image], landmarks: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Landmarks (one (5, 2) array per face, ``photos[k]`` holding face k) refined ``refine_steps`` times."""
        lms = [np.asarray(lm, np.float64).reshape(5, 2) for lm in landmarks]
        n = self.CANON_SIZE
        for _ in range(self.refine_steps):
            windows, frames = [], []
            for photo, lm in zip(photos, lms):
                quad = ffhq_quad(lm)
                canon = crop_quad(photo, quad, n)
                q = quad + 0.5
                frames.append((q[0], (q[3] - q[0]) / n, (q[1] - q[0]) / n))  # canon px -> photo (continuous)
                for s in self.WINDOW_SCALES:
                    half = self.WINDOW_SIDE * s * n / 2
                    cx, cy = self.WINDOW_CENTRE[0] * n, self.WINDOW_CENTRE[1] * n
                    box = (cx - half, cy - half, cx + half, cy + half)
                    win = np.asarray(canon.resize((self.ONET_SIZE,) * 2, Image.Resampling.BILINEAR, box=box))
                    windows += [win, win[:, ::-1]]
            x = torch.from_numpy(np.stack(windows).copy()).to(self.device).permute(0, 3, 1, 2).float()
            with torch.no_grad():
                _, points, _ = self.mtcnn.onet((x - 127.5) * 0.0078125)  # MTCNN's input scaling
            # (N, 10) = 5 x then 5 y in [0, 1] of the window -> (N, 5, 2); un-mirror the mirrored half
            pts = points.float().cpu().numpy().reshape(-1, 2, 5).transpose(0, 2, 1).astype(np.float64)
            pts[1::2, :, 0] = 1.0 - pts[1::2, :, 0]
            pts[1::2] = pts[1::2][:, [1, 0, 2, 4, 3]]  # mirrored: image-left and image-right swap
            per_face = 2 * len(self.WINDOW_SCALES)
            for k, (origin, ex, ey) in enumerate(frames):
                estimates = []
                for m, s in enumerate(self.WINDOW_SCALES):
                    side = self.WINDOW_SIDE * s * n
                    corner = np.array(self.WINDOW_CENTRE) * n - side / 2
                    for p in pts[k * per_face + 2 * m: k * per_face + 2 * m + 2]:
                        canon_xy = corner + p * side
                        estimates.append(origin + canon_xy[:, :1] * ex + canon_xy[:, 1:] * ey - 0.5)
                lms[k] = np.mean(estimates, axis=0)
        return lms

    def _downscale(self, photo: Image.Image) -> Image.Image:
        scale = self.detect_size / max(photo.size)
        if scale >= 1:
            return photo
        size = (max(round(photo.width * scale), 1), max(round(photo.height * scale), 1))
        return photo.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)  # reduce() first: fast

    def _detections(self, boxes, probs, points, full: tuple[int, int], small: tuple[int, int]) -> list[Detection]:
        if boxes is None:
            return []
        # facenet-pytorch packs results in object arrays whose shape depends on the batch: normalise
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        probs = np.asarray(probs, np.float64).reshape(-1)
        points = np.asarray(points, np.float64).reshape(-1, 5, 2)
        sx, sy = full[0] / small[0], full[1] / small[1]

        def back(xy: np.ndarray) -> np.ndarray:  # pixel centres scale about -0.5
            return (xy + 0.5) * (sx, sy) - 0.5

        return [Detection(back(pts), float(p), back(b.reshape(2, 2)).reshape(-1))
                for b, p, pts in zip(boxes, probs, points) if p >= self.min_score]


# ---------------------------------------------------------------------------------------------------
# The aligner


class Aligner:
    """Photos -> aligned crops for ``domain`` "faces" (FFHQ alignment) or "cars" (the official centre crop).

    ``size``: (h, w) or one side of the crop (default: 256x256 faces, 192x256 cars). ``largest_only``: one
    face per photo (the largest quad) instead of all. Detector settings: see :class:`FaceDetector`.
    Thread-safe: one instance can serve a thread pool.
    """

    def __init__(self, domain: Domain = "faces", size: int | Sequence[int] | None = None, *,
                 device: str | torch.device = "cpu", largest_only: bool = False, detect_size: int = 1024,
                 min_face_size: int = 20, min_score: float = 0.9, batch_size: int = 8, refine_steps: int = 3):
        if domain not in DOMAINS:
            raise ValueError(f"domain {domain!r}: use one of {', '.join(DOMAINS)}")
        self.domain, self.size, self.largest_only = domain, _hw(size or DEFAULT_SIZE[domain]), largest_only
        self.detector = FaceDetector(device, detect_size, min_face_size, min_score, batch_size, refine_steps) \
            if domain == "faces" else None

    def __call__(self, image: ImageLike, name: str = "the image") -> list[AlignedCrop]:
        """One photo -> its crops (faces largest first). Raises NoFaceError / InputError with the reason."""
        result = self.align_batch([image], [name])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def align_batch(self, images: Sequence[ImageLike], names: Sequence[str] | None = None,
                    ) -> list[list[AlignedCrop] | InputError]:
        """Photos -> per photo, its crops or the InputError (NoFaceError, unreadable...) that stops it.

        ``names`` (e.g. keys or file names) go into the error messages.
        """
        names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
        results: list[list[AlignedCrop] | InputError] = [[] for _ in images]
        photos: dict[int, Image.Image] = {}
        for i, image in enumerate(images):
            try:
                photos[i] = load_photo(image)
            except InputError as exc:
                results[i] = exc
        if self.domain == "cars":
            for i, photo in photos.items():
                box = centre_box(*photo.size, aspect=self.size[1] / self.size[0])
                # crop, then bilinear resize: the authors' crop + torchvision Resize on a PIL image
                crop = photo.crop(box).resize(self.size[::-1], Image.Resampling.BILINEAR)
                results[i] = [AlignedCrop(crop, box_quad(box), None, None, 0, photo.size)]
            return results
        order = list(photos)
        found = self.detector([photos[i] for i in order]) if order else []
        for i, detections in zip(order, found):
            photo = photos[i]
            if not detections:
                d = self.detector
                results[i] = NoFaceError(
                    f"no face found in {names[i]} ({photo.width}x{photo.height}; MTCNN at {d.detect_size} px "
                    f"on the long side, faces of at least {d.min_face_size} px there, score >= {d.min_score})")
                continue
            quads = [ffhq_quad(d.landmarks) for d in detections]
            # largest first; ties (never in practice) broken left to right, so the order is deterministic
            rank = sorted(range(len(quads)), key=lambda j: (-_sides(quads[j])[0], quads[j][:, 0].mean()))
            if self.largest_only:
                rank = rank[:1]
            results[i] = [AlignedCrop(crop_quad(photo, quads[j], self.size), quads[j], detections[j].landmarks,
                                      detections[j].score, n, photo.size) for n, j in enumerate(rank)]
        return results


_lock = threading.Lock()


@functools.lru_cache(maxsize=4)
def _cached(domain: str, size: tuple[int, int] | None, device: str, largest_only: bool) -> Aligner:
    return Aligner(domain, size, device=device, largest_only=largest_only)


def align(image: ImageLike, domain: Domain = "faces", size: int | Sequence[int] | None = None, *,
          device: str = "cpu", largest_only: bool = False) -> list[AlignedCrop]:
    """One photo -> its aligned crops with a cached :class:`Aligner` (the detector is built once)."""
    with _lock:  # one build per setting even when threads race here
        aligner = _cached(domain, None if size is None else _hw(size), str(device), largest_only)
    return aligner(image)
