"""Image decoding and conversion shared by the shard writer, the batch job and Serve.

Every image that enters the platform goes through :func:`decode_image`: one place decides what is
accepted (any PIL-readable format, converted to RGB) and what is refused with a reason.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clcae.errors import CLCAEError

if TYPE_CHECKING:
    import torch

# What the platform reads as an image file when it lists a folder (the batch job, evaluate).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# Decompression-bomb guard: far above any real photo, far below what would exhaust memory.
MAX_PIXELS = 64_000_000
# The smallest accepted side, in pixels, for every front door (make_shards, the batch job, evaluate, Serve), so an
# image accepted by one is accepted by all. A floor against tracking pixels, icons and broken thumbnails, not a
# quality bar: every input is resized to the encoder's input size anyway. 16 is what the batch job and Serve
# already enforced, so existing latent tables keep their split between latents and errors.
MIN_IMAGE_SIZE = 16


class InputError(CLCAEError, ValueError):
    """An input image or latent that cannot be used, with the reason."""


class UnreadableImageError(InputError):
    """Bytes that are not an image any installed decoder reads (a client sent the wrong kind of file)."""


def decode_image(data: bytes, name: str = "the image") -> Image.Image:
    """Encoded bytes -> RGB PIL image, with an InputError saying why for anything unusable.  ``name`` says which
    input in messages (a file name, "the uploaded image"): PIL would name its in-memory buffer instead."""
    if not data:
        raise InputError(f"{name} is an empty file (0 bytes)")
    buf = io.BytesIO(data)
    try:
        with Image.open(buf) as im:
            if im.width * im.height > MAX_PIXELS:
                raise InputError(f"{name} is {im.width}x{im.height}: over the {MAX_PIXELS:,}-pixel limit")
            im.load()
            # Phone photos store their rotation in EXIF; apply it so what we invert is what a viewer shows.
            return to_rgb(ImageOps.exif_transpose(im))
    except (InputError, MemoryError):  # MemoryError: the process's memory, not the image (bombs are caught above)
        raise
    except Image.DecompressionBombError as exc:
        raise InputError(f"{name} refused as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise UnreadableImageError(f"{name} is not a readable image (no installed decoder knows its format)") \
            from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt data
        detail = str(exc).replace(repr(buf), name)  # some PIL messages quote the file object
        raise UnreadableImageError(f"{name} is not a readable image ({type(exc).__name__}: {detail})") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha is composited on white, 16-bit is scaled, palettes and CMYK converted."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def to_pixels(im: Image.Image | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """RGB image (PIL, or an HxWx3 uint8 array) -> (H, W, 3) uint8 at ``size`` = (H, W), resized bicubic
    (antialiased by PIL): the size policy of every front door, and what Ray Data carries (a quarter of the bytes
    of float32)."""
    if isinstance(im, np.ndarray):
        if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
            raise InputError(f"expected an HxWx3 uint8 array, got {im.shape} {im.dtype}")
        if im.shape[:2] == tuple(size):
            return im
        im = Image.fromarray(im)
    im = to_rgb(im)
    if im.size != (size[1], size[0]):
        im = im.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def uint8_to_unit(pixels: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 pixels (B, H, W, 3) or (H, W, 3), numpy or torch -> float32 (B, 3, H, W) / (3, H, W) in [-1, 1]
    (``v / 127.5 - 1``), contiguous, on ``device`` (default: where the pixels are).

    The uint8 pixels move to the device first and are converted there: the one place the platform turns
    pixels into model input (the batch job, Serve, training, every ``pil_to_tensor``)."""
    import torch  # here, not at the top: decoding (Ray Data's CPU tasks) needs no torch, and importing it costs seconds

    if isinstance(pixels, np.ndarray):
        arr = np.ascontiguousarray(pixels)
        # torch warns on read-only arrays (PIL's, Ray's zero-copy blocks); a uint8 copy is a quarter of the float
        x = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    else:
        x = pixels
    if x.dtype != torch.uint8 or x.ndim not in (3, 4) or x.shape[-1] != 3:
        raise InputError(f"expected uint8 pixels (B, H, W, 3) or (H, W, 3), got {tuple(x.shape)} {x.dtype}")
    if device is not None:
        x = x.to(device, non_blocking=True)
    x = x.permute(2, 0, 1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return (x.float() / 127.5 - 1.0).contiguous()


def unit_to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) or (3, H, W) in [-1, 1] -> uint8 (B, H, W, 3) / (H, W, 3) numpy on the CPU: clamped to
    [-1, 1], ``(x + 1) * 127.5`` rounded to the nearest integer (on the images' device; only uint8 is copied back).
    ``uint8_to_unit(unit_to_uint8(x))`` is ``x`` quantised to 8 bits, and ``unit_to_uint8(uint8_to_unit(p)) == p``
    exactly."""
    import torch

    if images.ndim not in (3, 4) or images.shape[-3] != 3:
        raise InputError(f"expected images (B, 3, H, W) or (3, H, W), got {tuple(images.shape)}")
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arr = arr.permute(1, 2, 0) if arr.ndim == 3 else arr.permute(0, 2, 3, 1)
    return np.ascontiguousarray(arr.cpu().numpy())


def pil_to_tensor(im: Image.Image | np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """RGB image -> (3, H, W) float in [-1, 1], resized (bicubic, antialiased by PIL) to ``size`` = (H, W):
    :func:`to_pixels`, then :func:`uint8_to_unit`."""
    return uint8_to_unit(to_pixels(im, size))


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB PIL images (clamped): :func:`unit_to_uint8`."""
    return [Image.fromarray(a) for a in unit_to_uint8(images)]


# zlib level 1 for a reply that is sent once and not kept: measured (PIL, this 2-core host) 2.3x faster than the
# default 6 at 128 px (1.2 vs 2.7 ms) and 3.7x at 1024 (49 vs 183 ms), for 4% / 24% more bytes.  Stored images
# (shards, a job's edited PNGs) keep the default: they are written once and read many times.
FAST_PNG_LEVEL = 1


def encode_png(image: Image.Image, compress_level: int = 6) -> bytes:
    """PNG bytes (lossless at every level; ``compress_level`` trades CPU for size: see FAST_PNG_LEVEL)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def image_grid(rows: Sequence[Sequence[Image.Image]]) -> Image.Image:
    """Rows of equally sized images -> one grid image."""
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid.paste(im, (j * w, i * h))
    return grid



def check_min_size(im: Image.Image | np.ndarray, min_size: int = MIN_IMAGE_SIZE) -> None:
    """InputError if either side of ``im`` (a PIL image or an HxWx3 array) is below ``min_size`` pixels
    (thumbnails, 1x1 tracking pixels)."""
    width, height = im.size if isinstance(im, Image.Image) else (im.shape[1], im.shape[0])
    if min(width, height) < min_size:
        raise InputError(f"image is {width}x{height}: smaller than the minimum of {min_size} pixels on a side")


def decode_input_image(data: bytes, min_size: int = MIN_IMAGE_SIZE) -> Image.Image:
    """Encoded bytes -> RGB image that every front door accepts: :func:`decode_image`, then
    :func:`check_min_size`. An InputError says why an image is refused."""
    im = decode_image(data)
    check_min_size(im, min_size)
    return im
